"""Helper processes against the project's registry on 127.0.0.1: the work shared, a helper's error raised as the
parent's, a cancel that stops the helpers and leaves nothing unverified, a helper whose parent is gone; spawned
helpers in this process, and the CLI's forked ones (spares) in a CLI of its own."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
import signal
import subprocess
import sys
import time
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

from .conftest import assert_store_holds, reference, start_cli, wait_for

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
        return all(helper.returncode is not None for helper in self.helpers)


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


# 64 KiB blobs at two seconds each.
SLOWER = 32 * 1024
# The CLI forks a spare only where it may use a second CPU.
needs_two_cpus = pytest.mark.skipif(processes.usable_cpus() < 2, reason="a helper needs a second CPU")


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as handle:
        return [int(child) for child in handle.read().split()]


def proc(pid: int, name: str) -> bytes:
    with open(f"/proc/{pid}/{name}", "rb") as handle:
        return handle.read()


def running(pid: int) -> bool:
    """Alive: neither gone nor ended and waiting to be reaped (a zombie)."""
    try:
        return proc(pid, "stat").rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False


def connected(pid: int) -> bool:
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:") for fd in os.listdir(f"/proc/{pid}/fd"))
    except FileNotFoundError:
        return False


def forked_helper_at_work(
    registry: FaultRegistry, models: Path, rate: int, *, own_group: bool = False
) -> tuple[ModelFixture, subprocess.Popen[str], int]:
    """The CLI pulling 24 blobs of 64 KiB at ``rate`` bytes a second each, with one stream in each process, once
    its helper has connections of its own."""
    model = registry.add_synthetic_model("library/demo", blobs=24, blob_size=64 * 1024)
    registry.inject("blobs", Fault("slow", rate=rate, times=100))
    process = start_cli(models, "--insecure", "-j", "2", reference(registry, model), capture=True, own_group=own_group)
    wait_for(lambda: children(process.pid) != [], process=process)
    [helper] = children(process.pid)
    # A copy of the CLI, not a new interpreter.
    assert proc(helper, "cmdline") == proc(process.pid, "cmdline")
    wait_for(lambda: connected(helper), process=process)
    return model, process, helper


@needs_two_cpus
def test_the_cli_forks_its_helper_and_every_blob_comes_once(registry: FaultRegistry, models: Path) -> None:
    model, process, helper = forked_helper_at_work(registry, models, 256 * 1024)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert not running(helper)
    assert_store_holds(models, registry, model)
    for digest in model.blobs:
        assert len(registry.blob_requests(digest)) == 1, digest


@needs_two_cpus
@pytest.mark.parametrize(
    ("signum", "code", "group"),
    [
        pytest.param(signal.SIGINT, 130, False, id="SIGINT"),
        pytest.param(signal.SIGTERM, 143, False, id="SIGTERM"),
        # A terminal's Ctrl-C, which reaches the helper too.
        pytest.param(signal.SIGINT, 130, True, id="SIGINT-to-the-group"),
    ],
)
def test_a_signalled_cli_stops_its_forked_helper_and_keeps_nothing_unverified(
    registry: FaultRegistry, models: Path, signum: signal.Signals, code: int, group: bool
) -> None:
    # Two seconds a blob: the whole pull would take 24 s, so a helper that went on with its share would show.
    _, process, helper = forked_helper_at_work(registry, models, SLOWER, own_group=group)
    if group:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    started = time.monotonic()
    _, stderr = process.communicate(timeout=30)
    assert time.monotonic() - started < 10
    assert process.returncode == code, stderr
    assert not running(helper)
    assert partial_files(models) == []
    assert not (models / "manifests").exists()


@needs_two_cpus
def test_a_forked_helper_whose_cli_is_killed_stops(registry: FaultRegistry, models: Path) -> None:
    _, process, helper = forked_helper_at_work(registry, models, SLOWER)
    process.kill()
    process.communicate(timeout=30)
    # Sooner than its share of 12 blobs would take.
    wait_for(lambda: not running(helper), timeout=10)


@needs_two_cpus
def test_a_spare_the_plan_does_not_want_ends_before_the_pull_does(registry: FaultRegistry, models: Path) -> None:
    model = registry.add_synthetic_model("library/demo", blobs=3, blob_size=256 * 1024)
    registry.inject("blobs", Fault("slow", rate=256 * 1024, times=100))
    process = start_cli(models, "--insecure", reference(registry, model), capture=True)
    wait_for(lambda: children(process.pid) != [], process=process)
    [spare] = children(process.pid)
    # Ended (a zombie until the CLI reaps it on its way out) while the pull still runs: before the manifest,
    # which comes last, a second or so after the plan.
    wait_for(lambda: not running(spare), process=process)
    assert not (models / "manifests").exists()
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert_store_holds(models, registry, model)
    assert not os.path.exists(f"/proc/{spare}")
