"""Helper processes against the project's registry on 127.0.0.1: the work shared, a helper's error raised as the
parent's, a cancel that stops the helpers and leaves nothing unverified, a helper whose parent is gone."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ollama_pull import processes
from ollama_pull.api import Plan, Puller
from ollama_pull.engine import DownloadSettings, DownloadStats
from ollama_pull.errors import IntegrityError
from ollama_pull.events import BlobFinished, BlobStarted, Event, EventCallback
from ollama_pull.processes import Helper, HelperJob, frame, read_frame
from ollama_pull.reference import ModelReference, parse_reference
from tests.fault_registry import Fault, FaultRegistry, ModelFixture

from .conftest import assert_store_holds, reference

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

TWO = DownloadSettings(processes=2)
# Two streams in each process, on blobs that take a quarter of a second each: the parent cannot claim every blob
# before its helper has started, as it does when all the pull's blobs fit in its connections at once.
SHARED = dataclasses.replace(TWO, concurrency=4)


@dataclasses.dataclass
class Seen:
    """What the helpers of the pulls in a test did: the events they relayed, and their processes."""

    relayed: list[Event] = dataclasses.field(default_factory=list)
    helpers: list[Helper] = dataclasses.field(default_factory=list)

    def exited(self) -> bool:
        return all(helper._process.returncode is not None for helper in self.helpers)


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> Seen:
    """Two CPUs whatever the machine has, and a record of each helper: the processes started, the events relayed."""
    monkeypatch.setattr(processes, "usable_cpus", lambda: 2)
    record = Seen()
    start = Helper.start.__func__  # type: ignore[attr-defined]
    run = Helper.run

    async def starting(cls: type[Helper]) -> Helper:
        helper: Helper = await start(cls)
        record.helpers.append(helper)
        return helper

    async def running(self: Helper, job: HelperJob, on_event: EventCallback) -> DownloadStats:
        def both(event: Event) -> None:
            record.relayed.append(event)
            on_event(event)

        return await run(self, job, both)

    monkeypatch.setattr(Helper, "start", classmethod(starting))
    monkeypatch.setattr(Helper, "run", running)
    return record


async def pull(
    registry: FaultRegistry,
    model: ModelFixture,
    models: Path,
    settings: DownloadSettings = TWO,
    events: list[Event] | None = None,
) -> None:
    async with Puller(models_dir=models, insecure=True, settings=settings) as puller:
        await puller.pull(reference(registry, model), on_event=(events if events is not None else []).append)


def partial_files(models: Path) -> list[str]:
    return sorted(path.name for path in (models / "blobs").glob("*partial*"))


async def test_a_helper_takes_a_share_of_the_blobs_and_every_blob_comes_once(
    registry: FaultRegistry, models: Path, seen: Seen
) -> None:
    model = registry.add_synthetic_model("library/demo", blobs=24, blob_size=32 * 1024)
    registry.inject("blobs", Fault("slow", rate=128 * 1024, times=100))
    events: list[Event] = []
    await pull(registry, model, models, SHARED, events)
    assert_store_holds(models, registry, model)
    for digest in model.blobs:
        assert len(registry.blob_requests(digest)) == 1, digest
    finished = [event.digest for event in events if isinstance(event, BlobFinished)]
    assert sorted(finished) == sorted(model.blobs)
    assert any(isinstance(event, BlobFinished) for event in seen.relayed)
    assert len(seen.helpers) == 1
    assert seen.exited()


async def test_a_helpers_error_is_the_pulls_and_stops_the_parent(
    registry: FaultRegistry, models: Path, seen: Seen
) -> None:
    model = registry.add_synthetic_model("library/demo", blobs=24, blob_size=64 * 1024)
    settings = dataclasses.replace(TWO, concurrency=2, attempts=1)
    puller = Puller(models_dir=models, insecure=True, settings=settings)
    async with puller:
        plan = await puller.resolve(reference(registry, model))
    layers = plan.missing
    # One stream each. The parent's first blobs (after the config, which is tiny) take 4 s each, so the parent
    # cannot get to the helper's share before the helper has failed on its first blob, which is corrupt.
    for layer in layers[:3]:
        registry.inject(layer.digest, Fault("slow", rate=16 * 1024))
    bad = layers[len(layers) // 2]
    registry.inject(bad.digest, Fault("corrupt", times=5))
    with pytest.raises(IntegrityError) as failure:
        await pull(registry, model, models, settings)
    assert failure.value.digest == bad.digest
    assert len(registry.blob_requests(bad.digest)) == 1
    assert any(isinstance(event, BlobStarted) and event.digest == bad.digest for event in seen.relayed)
    assert seen.exited()
    assert partial_files(models) == []
    assert not (models / "manifests").exists()


async def test_a_cancelled_pull_stops_its_helpers_and_keeps_nothing_unverified(
    registry: FaultRegistry, models: Path, seen: Seen
) -> None:
    model = registry.add_synthetic_model("library/demo", blobs=24, blob_size=256 * 1024)
    registry.inject("blobs", Fault("slow", rate=64 * 1024, times=100))
    task = asyncio.ensure_future(pull(registry, model, models, SHARED))

    async def helper_started() -> None:
        while not any(isinstance(event, BlobStarted) for event in seen.relayed):
            await asyncio.sleep(0.02)

    await asyncio.wait_for(helper_started(), 30)
    task.cancel()
    # Bounded: a helper that never ends would otherwise hang the test instead of failing it.
    await asyncio.wait({task}, timeout=30)
    assert task.cancelled()
    assert seen.exited()
    assert partial_files(models) == []
    assert not (models / "manifests").exists()


async def test_a_pull_of_few_blobs_starts_no_helper(registry: FaultRegistry, models: Path, seen: Seen) -> None:
    model = registry.add_synthetic_model("library/demo", blobs=3, blob_size=64 * 1024)
    await pull(registry, model, models)
    assert_store_holds(models, registry, model)
    assert seen.helpers == []


def downloading_helper(
    registry: FaultRegistry, models: Path, *, ignore_sigint: bool = False
) -> subprocess.Popen[bytes]:
    """A helper on its own, given a job of slow blobs, once its first frame says it is downloading; with
    ``ignore_sigint``, started with SIGINT ignored, as a shell starts a script's background job."""
    model = registry.add_synthetic_model("library/demo", blobs=4, blob_size=256 * 1024)
    registry.inject("blobs", Fault("slow", rate=32 * 1024, times=100))
    ref = parse_reference(reference(registry, model))
    puller = Puller(models_dir=models, insecure=True)
    plan = asyncio.run(_resolve(puller, ref))
    puller.store.prepare()
    job = HelperJob(
        models_dir=models,
        insecure=True,
        settings=DownloadSettings(),
        mirror=None,
        ca_cert=None,
        reference=ref,
        model=ref.short,
        layers=plan.missing,
        uvloop=False,
        collector=gc.get_threshold(),
    )
    previous = signal.getsignal(signal.SIGINT)
    if ignore_sigint:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        helper = subprocess.Popen(
            [sys.executable, "-m", "ollama_pull.helper"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    assert helper.stdin is not None
    assert helper.stdout is not None
    helper.stdin.write(frame(job))
    helper.stdin.flush()
    messages = read_frame(helper.stdout)
    assert isinstance(messages, list)
    assert any(kind == "event" for kind, _ in messages)
    return helper


def test_a_helper_whose_parent_is_gone_stops_and_cleans_up(registry: FaultRegistry, models: Path) -> None:
    helper = downloading_helper(registry, models)
    assert helper.stdin is not None
    helper.stdin.close()
    assert helper.wait(timeout=30) == 1
    assert partial_files(models) == []


def test_a_helper_started_with_sigint_ignored_keeps_it_ignored(registry: FaultRegistry, models: Path) -> None:
    helper = downloading_helper(registry, models, ignore_sigint=True)
    assert helper.stdin is not None
    helper.send_signal(signal.SIGINT)
    with pytest.raises(subprocess.TimeoutExpired):
        helper.wait(timeout=0.5)
    helper.stdin.close()
    assert helper.wait(timeout=30) == 1


async def _resolve(puller: Puller, ref: ModelReference) -> Plan:
    async with puller:
        return await puller.resolve(ref)
