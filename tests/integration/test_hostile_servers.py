"""The real CLI against registries that lie, loop and send garbage: a clear error or a clean recovery, never a bad blob.

Every case ends with the same invariant checked on disk: each file named like a blob holds exactly the bytes of
its digest, and a failed pull leaves no manifest. The module prints how many hostile inputs it tried.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ollama_pull.drain import DRAIN_MIN
from tests.fault_registry import Fault, FaultRegistry, ModelFixture

from .conftest import Run, assert_store_holds, interrupted_large_pull, reference, run_cli

pytestmark = pytest.mark.integration

# Short stall timeout and two attempts: a fault "once" is survived by the second attempt, "always" exhausts both.
FLAGS = ("-q", "--insecure", "--stall-timeout", "0.5", "--retries", "2")
ALWAYS = 10
BLOB_NAME = re.compile(r"sha256-[0-9a-f]{64}")
CONFIG = {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": "sha256:" + "a" * 64, "size": 2}
LAYER = {"mediaType": "application/vnd.ollama.image.tensor", "digest": "sha256:" + "b" * 64, "size": 3}


@dataclass
class Tally:
    tried: int = 0
    wrong_blobs: int = 0


@pytest.fixture(scope="module")
def tally(request: pytest.FixtureRequest) -> Iterator[Tally]:
    counts = Tally()
    yield counts
    report(request.config, f"hostile inputs tried: {counts.tried}, wrong blobs stored: {counts.wrong_blobs}")


def report(config: pytest.Config, line: str) -> None:
    """Print past pytest's output capture (as ``capsys.disabled()`` does), so a plain ``pytest -q`` shows it."""
    capture = config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        print(f"\n{line}", flush=True)


def check_store(models: Path, tally: Tally) -> None:
    """Count, then refuse, every file in blobs/ named like a blob whose bytes are not its digest's."""
    tally.tried += 1
    blobs = models / "blobs"
    wrong = []
    if blobs.exists():
        for path in blobs.iterdir():
            if BLOB_NAME.fullmatch(path.name) and hashlib.sha256(path.read_bytes()).hexdigest() != path.name[7:]:
                wrong.append(path.name)
    tally.wrong_blobs += len(wrong)
    assert wrong == []


def assert_one_line_error(run: Run, code: int, *fragments: str) -> str:
    assert run.returncode == code, run.stderr
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def small_model(registry: FaultRegistry, blob_size: int = 64 * 1024) -> ModelFixture:
    return registry.add_synthetic_model("library/demo", blobs=3, blob_size=blob_size)


# Read by the event loop, and drained by the shared receiving thread (ollama_pull.drain).
BLOB_SIZES = [pytest.param(64 * 1024, id="loop"), pytest.param(DRAIN_MIN + 44 * 1024, id="drained")]


# --- hostile blob responses ------------------------------------------------------------------------------------

# (fault on one layer, expected exit code, fragment of the error line; None when the pull must recover)
BLOB_CASES = [
    # A body longer than the manifest's size: cut off at the size, the attempt thrown away and retried.
    pytest.param(Fault("long_body"), 0, None, id="long-body-once"),
    pytest.param(Fault("long_body", times=ALWAYS), 5, "more than the manifest's", id="long-body-always"),
    # A Content-Length larger than the body: every real byte arrives, then the connection closes.
    pytest.param(Fault("lying_length"), 0, None, id="lying-length-once"),
    pytest.param(Fault("lying_length", times=ALWAYS), 1, "connection closed early", id="lying-length-always"),
    # No length at all and bytes without end: the client must stop reading at the manifest's size.
    pytest.param(Fault("endless"), 0, None, id="endless-once"),
    pytest.param(Fault("endless", times=ALWAYS), 5, "more than the manifest's", id="endless-always"),
    pytest.param(Fault("redirect_loop"), 0, None, id="redirect-loop-once"),
    pytest.param(Fault("redirect_loop", times=ALWAYS), 1, "redirect", id="redirect-loop-always"),
    pytest.param(Fault("redirect_scheme"), 0, None, id="redirect-to-ftp-once"),
    pytest.param(Fault("redirect_scheme", times=ALWAYS), 1, "unsupported URL scheme", id="redirect-to-ftp-always"),
    # Blobs are hashed as stored: a compressed body never matches, even if it decompresses to the right bytes.
    pytest.param(Fault("gzip"), 0, None, id="gzip-once"),
    pytest.param(Fault("gzip", times=ALWAYS), 5, "Content-Encoding: gzip", id="gzip-always"),
]


@pytest.mark.parametrize("blob_size", BLOB_SIZES)
@pytest.mark.parametrize(("fault", "code", "message"), BLOB_CASES)
def test_a_hostile_blob_response(
    registry: FaultRegistry, models: Path, tally: Tally, fault: Fault, code: int, message: str | None, blob_size: int
) -> None:
    model = small_model(registry, blob_size)
    bad = model.layer_digests[1]
    registry.inject(bad, fault)
    started = time.monotonic()
    run = run_cli(models, *FLAGS, reference(registry, model), timeout=30)
    # Bounded: an endless body or a redirect loop must not hold the pull (two attempts, tiny blobs).
    assert time.monotonic() - started < 15
    check_store(models, tally)
    if message is None:
        assert run.returncode == 0, run.stderr
        assert_store_holds(models, registry, model)
        assert registry.faults_applied == {fault.kind: 1}
    else:
        assert_one_line_error(run, code, bad, message)
        assert not (models / "manifests").exists()
        assert not (models / "blobs" / bad.replace(":", "-")).exists()
        assert registry.faults_applied == {fault.kind: 2}


# --- hostile manifests -----------------------------------------------------------------------------------------


def manifest(**fields: object) -> bytes:
    """A schema 2 manifest with one good-looking config and layer, ``fields`` replacing (or, as None, dropping) keys."""
    document: dict[str, object] = {"schemaVersion": 2, "config": CONFIG, "layers": [LAYER]}
    for key, value in fields.items():
        if value is None:
            document.pop(key)
        else:
            document[key] = value
    return json.dumps(document).encode()


def with_layer(**fields: object) -> bytes:
    return manifest(layers=[{**LAYER, **fields}])


MANIFEST_CASES = [
    pytest.param(b"\x89PNG\r\n\x1a\n not a manifest", "not JSON", id="not-json"),
    pytest.param(b'{"schemaVersion": 2, "layers": [', "not JSON", id="cut-json"),
    pytest.param(b"[1, 2, 3]", "not a JSON object", id="json-array"),
    pytest.param(manifest(config=None), "config is missing", id="config-missing"),
    pytest.param(manifest(layers=None), "'layers' is missing", id="layers-missing"),
    pytest.param(manifest(layers={"0": LAYER}), "not a list", id="layers-not-a-list"),
    pytest.param(manifest(layers=[LAYER["digest"]]), "layers[0] is missing or not an object", id="layer-a-string"),
    pytest.param(with_layer(size="3"), "size '3'", id="size-a-string"),
    pytest.param(with_layer(size=-3), "size -3", id="size-negative"),
    pytest.param(with_layer(size=3.0), "size 3.0", id="size-a-float"),
    pytest.param(with_layer(size=True), "size True", id="size-a-bool"),
    pytest.param(with_layer(digest="sha512:" + "b" * 128), "sha512:", id="digest-sha512"),
    pytest.param(with_layer(digest="sha256:" + "B" * 64), "not sha256:<64 lowercase hex>", id="digest-uppercase"),
    pytest.param(with_layer(digest="sha256:" + "b" * 63), "not sha256:<64 lowercase hex>", id="digest-short"),
    # Path traversal in the digest: it becomes a file name in blobs/ if the client trusts it.
    pytest.param(with_layer(digest="sha256:../../../../tmp/x"), "tmp/x", id="digest-traversal"),
    pytest.param(with_layer(digest="sha256:" + "b" * 64 + "/.."), "not sha256", id="digest-trailing-dots"),
    pytest.param(manifest(schemaVersion=1), "schemaVersion is 1", id="schema-1"),
]


@pytest.mark.parametrize(("body", "reason"), MANIFEST_CASES)
def test_a_hostile_manifest_writes_nothing(
    registry: FaultRegistry, models: Path, tally: Tally, body: bytes, reason: str
) -> None:
    registry.set_manifest("library/evil", "latest", body)
    run = run_cli(models, *FLAGS, f"{registry.host}/library/evil")
    check_store(models, tally)
    assert_one_line_error(run, 1, "invalid manifest", reason, "nothing was written")
    assert not models.exists() or not any(models.rglob("*"))


def test_a_huge_manifest_is_refused(registry: FaultRegistry, models: Path, tally: Tally) -> None:
    # Valid JSON, so only its size can be the reason: 5 MiB of whitespace inside a real manifest.
    body = manifest().replace(b'"layers"', b" " * (5 * 1024 * 1024) + b'"layers"')
    registry.set_manifest("library/huge", "latest", body)
    run = run_cli(models, *FLAGS, f"{registry.host}/library/huge")
    check_store(models, tally)
    assert_one_line_error(run, 1, "invalid manifest", "larger than 4194304 bytes")
    assert not models.exists() or not any(models.rglob("*"))


# The same hostile behaviours on the manifest request; a manifest is small and never resumed.
MANIFEST_FAULTS = [
    # An endless manifest: stopped at the size limit, not read until the server gives up.
    pytest.param(Fault("endless", times=ALWAYS), 1, "larger than", id="endless"),
    # The body no longer hashes to the Docker-Content-Digest the registry announced.
    pytest.param(Fault("long_body", times=ALWAYS), 1, "Docker-Content-Digest", id="long-body"),
    # ... once: bytes damaged in transit are fetched again.
    pytest.param(Fault("long_body"), 0, None, id="long-body-once"),
    pytest.param(Fault("lying_length"), 0, None, id="lying-length-once"),
    pytest.param(Fault("redirect_loop", times=ALWAYS), 1, "redirect", id="redirect-loop"),
    pytest.param(Fault("redirect_scheme", times=ALWAYS), 1, "unsupported URL scheme", id="redirect-to-ftp"),
    pytest.param(Fault("redirect_loop"), 0, None, id="redirect-loop-once"),
]


@pytest.mark.parametrize(("fault", "code", "message"), MANIFEST_FAULTS)
def test_a_hostile_manifest_response(
    registry: FaultRegistry, models: Path, tally: Tally, fault: Fault, code: int, message: str | None
) -> None:
    model = small_model(registry)
    registry.inject("manifest", fault)
    started = time.monotonic()
    run = run_cli(models, *FLAGS, reference(registry, model), timeout=30)
    assert time.monotonic() - started < 15
    check_store(models, tally)
    if message is None:
        assert run.returncode == 0, run.stderr
        assert_store_holds(models, registry, model)
    else:
        assert_one_line_error(run, code, message)
        assert not models.exists() or not any(models.rglob("*"))


# --- a resume the server ignores ------------------------------------------------------------------------------


def test_a_resume_answered_with_the_whole_blob_starts_over(registry: FaultRegistry, models: Path, tally: Tally) -> None:
    model, big, kept = interrupted_large_pull(registry, models)
    registry.reset_log()
    registry.inject(big, Fault("range_ignored"))
    run = run_cli(models, *FLAGS, reference(registry, model))
    check_store(models, tally)
    assert run.returncode == 0, run.stderr
    assert_store_holds(models, registry, model)
    [ignored] = registry.blob_requests(big)
    assert (ignored.range, ignored.status, ignored.fault) == (f"bytes={kept}-", 200, "range_ignored")
    assert ignored.bytes_sent == len(model.blobs[big])
