"""Integration fixtures: the project's fault-injecting registry on 127.0.0.1 and the real CLI in a subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fault_registry import Fault, FaultRegistry, ModelFixture

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str

    @property
    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stdout.splitlines()]


def cli_env(models: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if "proxy" not in key.lower()}
    env.update(OLLAMA_MODELS=str(models), PYTHONUNBUFFERED="1", NO_COLOR="1")
    env.pop("OLLAMA_PULL_DEBUG", None)
    return env


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "ollama_pull", *args]


def run_cli(models: Path, *args: str, timeout: float = 60) -> Run:
    done = subprocess.run(
        cli_command(*args),
        env=cli_env(models),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return Run(done.returncode, done.stdout, done.stderr)


def start_cli(
    models: Path,
    *args: str,
    capture: bool = False,
    env: Mapping[str, str] | None = None,
    own_group: bool = False,
) -> subprocess.Popen[str]:
    """The CLI in the background (``env`` on top of the test's environment); with ``own_group``, in a process
    group of its own, as a terminal's foreground job is, for a Ctrl-C that reaches every process of it. Without
    ``capture`` its output goes nowhere: a pipe nobody reads until the end could fill up and block the pull
    mid-test."""
    pipe = subprocess.PIPE if capture else subprocess.DEVNULL
    return subprocess.Popen(
        cli_command(*args),
        env={**cli_env(models), **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=pipe,
        stderr=pipe,
        text=True,
        process_group=0 if own_group else None,
    )


def wait_for(
    condition: Callable[[], bool], *, timeout: float = 20.0, process: subprocess.Popen[str] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None:
            assert process.poll() is None, "the CLI ended before the moment the test waits for"
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def stop_with(process: subprocess.Popen[str], signum: signal.Signals) -> tuple[str, float]:
    """Send ``signum`` to a running CLI: what it wrote to stderr, and the seconds it took to end."""
    started = time.monotonic()
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=10)
    return stderr, time.monotonic() - started


def interrupted_once_bytes_land(models: Path, signum: signal.Signals, *args: str) -> tuple[int, str, float]:
    """Run the CLI with ``args``, send it ``signum`` once a partial file holds bytes: its exit code, what it
    wrote to stderr, and the seconds it took to end after the signal."""
    process = start_cli(models, *args, capture=True)
    try:
        wait_for(lambda: bytes_landed(models), process=process)
        stderr, stopped = stop_with(process, signum)
    finally:
        process.kill()
    return process.returncode, stderr, stopped


def partial_files(models: Path) -> list[Path]:
    blobs = models / "blobs"
    return [p for p in blobs.iterdir() if p.name.endswith("-partial")] if blobs.exists() else []


def bytes_landed(models: Path) -> bool:
    """Whether some partial file holds bytes. A blob that is not slowed (the config) finishes in moments: its
    partial file can be renamed between the listing and the stat, which is no bytes landed."""
    for path in partial_files(models):
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_size > 0:
                return True
    return False


def interrupted_large_pull(registry: FaultRegistry, models: Path) -> tuple[ModelFixture, str, int]:
    """A 65 MiB blob (over the 64 MiB resume threshold) pulled and killed with -9 once its partial file passes
    8 MiB; returns the model, the blob's digest and the bytes the partial file kept."""
    size = 65 * 1024 * 1024
    model = registry.add_model("library/big", layers=[("application/vnd.ollama.image.model", os.urandom(size), None)])
    big = model.layer_digests[0]
    registry.inject(big, Fault("slow", rate=32 * 1024 * 1024))
    process = start_cli(models, "--insecure", reference(registry, model))
    partial = models / "blobs" / (big.replace(":", "-") + "-partial")
    try:
        wait_for(lambda: partial.exists() and partial.stat().st_size > 8 * 1024 * 1024, process=process)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    kept = partial.stat().st_size
    assert 0 < kept < size
    return model, big, kept


@pytest.fixture
def registry() -> Iterator[FaultRegistry]:
    with FaultRegistry() as server:
        yield server


@pytest.fixture
def models(isolated_environment: Path) -> Path:
    return isolated_environment


def reference(registry: FaultRegistry, model: ModelFixture) -> str:
    return f"{registry.host}/{model.name}:{model.tag}"


def assert_store_holds(models: Path, registry: FaultRegistry, *fixtures: ModelFixture) -> None:
    """Byte for byte: every blob, nothing else in blobs/, and each manifest exactly as served."""
    expected = {digest: data for fixture in fixtures for digest, data in fixture.blobs.items()}
    blobs = models / "blobs"
    assert sorted(path.name for path in blobs.iterdir()) == sorted(d.replace(":", "-") for d in expected)
    for digest, data in expected.items():
        assert (blobs / digest.replace(":", "-")).read_bytes() == data, digest
    for fixture in fixtures:
        namespace, model = fixture.name.split("/")
        manifest = models / "manifests" / registry.host / namespace / model / fixture.tag
        assert manifest.read_bytes() == fixture.manifest


def assert_nothing_unverified(models: Path, fixture: ModelFixture) -> None:
    """Every file named like a blob holds exactly the bytes of its digest."""
    blobs = models / "blobs"
    if not blobs.exists():
        return
    for path in blobs.iterdir():
        if path.name.endswith("-partial"):
            continue
        digest = path.name.replace("-", ":", 1)
        assert fixture.blobs[digest] == path.read_bytes(), path.name
