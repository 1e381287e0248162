"""Ctrl-C and SIGTERM while a request other than a blob's is in flight: a token request, the manifest fetch, a
request to the mirror, the origin's answer after the mirror's refusal; and while a thread of ours drains a blob's
body. Each stops within a second, with one line and an empty store."""

from __future__ import annotations

import importlib.util
import random
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from ollama_pull.drain import DRAIN_MIN, OWN_THREADS_MIN
from tests.fault_registry import Fault, FaultRegistry

from .conftest import interrupted_once_bytes_land, partial_files, reference, start_cli, stop_with, wait_for

pytestmark = pytest.mark.integration

STALL = Fault("stall_before", seconds=30)
SIGNALS = [pytest.param(signal.SIGINT, 130, id="SIGINT"), pytest.param(signal.SIGTERM, 143, id="SIGTERM")]
# Signals reach Python's handlers through the event loop's wake-up: on each loop the CLI may run.
LOOPS = ["asyncio"] + (["uvloop"] if importlib.util.find_spec("uvloop") is not None else [])


def manifest_requests(registry: FaultRegistry) -> int:
    return sum("/manifests/" in r.path for r in registry.requests)


def stalled_token(stack: ExitStack) -> tuple[FaultRegistry, list[str], Callable[[], bool]]:
    registry = stack.enter_context(FaultRegistry(require_auth=True))
    registry.inject("token", STALL)
    return registry, [], lambda: bool(registry.token_requests)


def stalled_manifest(stack: ExitStack) -> tuple[FaultRegistry, list[str], Callable[[], bool]]:
    registry = stack.enter_context(FaultRegistry())
    registry.inject("manifest", STALL)
    return registry, [], lambda: manifest_requests(registry) > 0


def stalled_mirror(stack: ExitStack) -> tuple[FaultRegistry, list[str], Callable[[], bool]]:
    registry = stack.enter_context(FaultRegistry())
    mirror = stack.enter_context(FaultRegistry())
    # Faults bend only answers that would succeed: the mirror holds the model too.
    mirror.add_synthetic_model("library/demo", blobs=3, blob_size=4096)
    mirror.inject("manifest", STALL)
    return registry, ["--mirror", mirror.url], lambda: manifest_requests(mirror) > 0


def fallback_after_the_mirror(stack: ExitStack) -> tuple[FaultRegistry, list[str], Callable[[], bool]]:
    registry = stack.enter_context(FaultRegistry())
    # A mirror without the model: the origin is asked next, and stalls.
    mirror = stack.enter_context(FaultRegistry())
    registry.inject("manifest", STALL)
    return registry, ["--mirror", mirror.url], lambda: manifest_requests(mirror) > 0 and manifest_requests(registry) > 0


@pytest.fixture(params=[stalled_token, stalled_manifest, stalled_mirror, fallback_after_the_mirror])
def phase(
    request: pytest.FixtureRequest,
) -> Iterator[tuple[FaultRegistry, list[str], Callable[[], bool]]]:
    with ExitStack() as stack:
        yield request.param(stack)


@pytest.mark.parametrize(("signum", "code"), SIGNALS)
@pytest.mark.parametrize("loop", LOOPS)
def test_a_signal_mid_request_stops_at_once_and_leaves_nothing(
    models: Path,
    phase: tuple[FaultRegistry, list[str], Callable[[], bool]],
    signum: signal.Signals,
    code: int,
    loop: str,
) -> None:
    registry, flags, in_flight = phase
    model = registry.add_synthetic_model("library/demo", blobs=3, blob_size=4096)
    env = {"OLLAMA_PULL_EVENT_LOOP": loop}
    process = start_cli(models, "--insecure", *flags, reference(registry, model), capture=True, env=env)
    try:
        wait_for(in_flight, process=process)
        # The request has arrived and the server sits on it; give the client a moment to be waiting on it.
        time.sleep(0.1)
        stderr, stopped = stop_with(process, signum)
    finally:
        process.kill()
    assert process.returncode == code, stderr
    assert stopped < 1.0
    [line] = stderr.strip().splitlines()
    assert line.startswith("interrupted: ")
    assert not (models / "manifests").exists()
    assert partial_files(models) == []
    assert not (models / "blobs").exists() or not any((models / "blobs").iterdir())


@pytest.mark.parametrize("size", [OWN_THREADS_MIN * 2, DRAIN_MIN * 2], ids=["own-threads", "shared-thread"])
@pytest.mark.parametrize(("signum", "code"), SIGNALS)
def test_a_signal_while_a_thread_drains_a_body_stops_at_once_and_leaves_nothing(
    models: Path, signum: signal.Signals, code: int, size: int
) -> None:
    with FaultRegistry() as registry:
        # Long enough to be drained by a thread of its own, or short enough for the shared receiving thread
        # (ollama_pull.drain); the server leaves it waiting half way.
        model = registry.add_model(
            "library/big",
            layers=[("application/vnd.ollama.image.model", random.Random(7).randbytes(size), None)],
        )
        registry.inject(model.layer_digests[0], Fault("stall_during", at=0.5, seconds=30))
        returncode, stderr, stopped = interrupted_once_bytes_land(
            models, signum, "--insecure", reference(registry, model)
        )
    assert returncode == code, stderr
    assert stopped < 1.0
    # The plan's line, then the interruption's, and nothing else.
    _plan, line = stderr.strip().splitlines()
    assert line.startswith("interrupted: ")
    assert not (models / "manifests").exists()
    assert partial_files(models) == []
    assert not any(path.name == model.layer_digests[0].replace(":", "-") for path in (models / "blobs").iterdir())
