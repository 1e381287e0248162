"""The tools run on every workload, ollama-pull and the peers it is measured against, and their command lines."""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dataset import NAMESPACE, TAG, Model
from host import HOST, OLLAMA_PULL, find_program

# Ollama's own downloader for tensor models (x/transfer), built by hand outside the repository (bench/README.md):
# the command line, with {registry}, {repository}, {tag}, {reference} and {models} standing for this run's values.
GO_PEER_VARIABLE = "OLLAMA_PULL_BENCH_GO_PEER"
# Ollama's default of OLLAMA_MAX_TRANSFER_STREAMS, the bodies x/transfer downloads at once, and the setting for
# fast links that the issue compares against when each connection is capped.
GO_DEFAULT_STREAMS = 4
GO_MANY_STREAMS = 64


@dataclass(frozen=True)
class Tool:
    key: str
    label: str
    # Builds the command for one run (writing any input file it needs in the scratch directory).
    command: Callable[[Model, Path, Path, int], list[str]]
    is_ollama_pull: bool = False
    # A peer that writes an Ollama store (blobs/ and manifests/) like ollama-pull: checked byte for byte too.
    writes_store: bool = False
    env: dict[str, str] = field(default_factory=dict)


def ollama_pull_command(model: Model, out: Path, _scratch: Path, port: int) -> list[str]:
    return [str(OLLAMA_PULL), "--insecure", "--models-dir", str(out), "-q", model.reference(port)]


def aria2c_command(model: Model, out: Path, scratch: Path, port: int) -> list[str]:
    listing = scratch / f"aria2-{model.name}.txt"
    with open(listing, "w") as handle:
        for blob in model.blobs:
            handle.write(f"{model.blob_url(port, blob)}\n  out=sha256-{blob.hex}\n  checksum=sha-256={blob.hex}\n")
    program = find_program("aria2c") or "aria2c"
    options = ["-j", "64", "-x", "16", "-s", "16", "--file-allocation=none", "--console-log-level=warn"]
    return [program, *options, "--summary-interval=0", "-d", str(out), "-i", str(listing)]


def curl_config(model: Model, out: Path, scratch: Path, port: int) -> Path:
    # A config file (-K): 4096 URLs and outputs would not fit a command line.
    config = scratch / f"curl-{model.name}.cfg"
    with open(config, "w") as handle:
        for blob in model.blobs:
            handle.write(f'url = "{model.blob_url(port, blob)}"\noutput = "{out}/sha256-{blob.hex}"\n')
    return config


def curl_parallel_command(model: Model, out: Path, scratch: Path, port: int) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    config = curl_config(model, out, scratch, port)
    # --parallel-immediate opens connections at once instead of waiting to learn whether they could be
    # multiplexed (they cannot: HTTP/1.1), which only makes the floor lower, i.e. the comparison harder.
    # --fail makes an HTTP error an exit code, so that a failed run cannot count.
    options = ["--parallel", "--parallel-max", "64", "--parallel-immediate", "-s", "-S", "--fail"]
    return [find_program("curl") or "curl", *options, "-K", str(config)]


def curl_single_command(model: Model, out: Path, scratch: Path, port: int) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    config = curl_config(model, out, scratch, port)
    # No --parallel: one transfer after the other on one kept-alive connection, i.e. one stream.
    return [find_program("curl") or "curl", "-s", "-S", "--fail", "-K", str(config)]


def go_peer_command(model: Model, out: Path, _scratch: Path, port: int) -> list[str]:
    values = {
        "{registry}": f"http://{HOST}:{port}",
        "{repository}": f"{NAMESPACE}/{model.name}",
        "{tag}": TAG,
        "{reference}": model.reference(port),
        "{models}": str(out),
    }
    argv = []
    for word in shlex.split(os.environ[GO_PEER_VARIABLE]):
        for placeholder, value in values.items():
            word = word.replace(placeholder, value)
        argv.append(word)
    return argv


OLLAMA = Tool("ollama-pull", "ollama-pull", ollama_pull_command, is_ollama_pull=True)
ARIA2 = Tool("aria2c", "aria2c -j 64 -x 16 -s 16", aria2c_command)
CURL_PARALLEL = Tool("curl-parallel", "curl --parallel (64)", curl_parallel_command)
CURL_SINGLE = Tool("curl-single", "curl, one stream", curl_single_command)
GO = Tool(
    "go",
    f"x/transfer (Go), {GO_DEFAULT_STREAMS} bodies",
    go_peer_command,
    writes_store=True,
    env={"OLLAMA_MAX_TRANSFER_STREAMS": str(GO_DEFAULT_STREAMS)},
)
GO_WIDE = Tool(
    "go-64",
    f"x/transfer (Go), {GO_MANY_STREAMS} bodies",
    go_peer_command,
    writes_store=True,
    env={"OLLAMA_MAX_TRANSFER_STREAMS": str(GO_MANY_STREAMS)},
)
