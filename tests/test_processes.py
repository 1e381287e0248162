"""Several processes for one pull, the parts that need no registry: errors that cross a process boundary, how many
helpers and what each gets, when a spare is forked, a helper that is gone, claims that do not wait, and the
engine's shared mode."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import respx

from ollama_pull import processes
from ollama_pull.engine import Downloader, DownloadSettings
from ollama_pull.errors import BlobError, IntegrityError, InvalidReference, OllamaPullError, StorageError
from ollama_pull.events import BlobFinished, Event
from ollama_pull.manifest import Layer
from ollama_pull.processes import (
    Helper,
    HelperFailed,
    HelperJob,
    Spare,
    divided,
    forked_helpers,
    helpers_for,
    share_first,
    worth_helpers,
    worth_spawning,
)
from ollama_pull.store import BlobHeld, Store

from .fakes import BASE, FAST, REF, make_model, no_sleep, registry_for
from .test_store import blob_layer


@pytest.mark.parametrize(
    "error",
    [
        BlobError("sha256:" + "a" * 64, "connection reset", 6),
        IntegrityError("sha256:" + "b" * 64, "digest mismatch", 2),
        InvalidReference("Bad:Name", "uppercase"),
        StorageError("disk full"),
        HelperFailed(-9),
    ],
)
def test_an_error_crosses_a_process_boundary_whole(error: OllamaPullError) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert vars(copy) == vars(error)


def test_a_pull_starts_one_helper_per_cpu_beyond_its_own_up_to_its_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(processes, "usable_cpus", lambda: 2)
    assert helpers_for(DownloadSettings(processes=2)) == 1
    assert helpers_for(DownloadSettings(processes=8)) == 1
    assert helpers_for(DownloadSettings(processes=1)) == 0
    monkeypatch.setattr(processes, "usable_cpus", lambda: 1)
    assert helpers_for(DownloadSettings(processes=2)) == 0


def blobs(count: int, size: int) -> list[Layer]:
    return [Layer("application/vnd.ollama.image.tensor", f"sha256:{index:064x}", size) for index in range(count)]


def test_helpers_are_for_many_missing_blobs_and_spawned_ones_for_small_blobs_only() -> None:
    assert worth_helpers(blobs(16, 1 << 30))
    assert not worth_helpers(blobs(15, 64 * 1024))
    assert worth_spawning(blobs(4096, 64 * 1024))
    assert worth_spawning(blobs(16, 1024 * 1024 - 1))
    assert not worth_spawning(blobs(256, 2 * 1024 * 1024))
    # One large blob among small ones tips the average.
    assert not worth_spawning(
        [*blobs(16, 64 * 1024), Layer("application/vnd.ollama.image.model", "sha256:" + "f" * 64, 1 << 30)]
    )


def test_each_process_gets_its_part_of_the_connections_and_of_the_rate() -> None:
    part = divided(DownloadSettings(concurrency=64, max_rate=1000.0), 2)
    assert (part.concurrency, part.max_rate) == (32, 500.0)
    assert divided(DownloadSettings(concurrency=1), 2).concurrency == 1
    assert divided(DownloadSettings(), 2).max_rate is None


def test_each_process_takes_its_share_first_then_the_rest_from_the_far_end() -> None:
    blobs = tuple("abcdef")
    assert share_first(blobs, 0, 3) == tuple("abcfed")
    assert share_first(blobs, 3, 6) == tuple("defcba")
    assert share_first(blobs, 2, 4) == tuple("cdfeba")


@pytest.mark.anyio
async def test_a_helper_that_cannot_start_leaves_the_pull_in_fewer_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    async def cannot(*_args: object, **_kwargs: object) -> object:
        raise FileNotFoundError("no interpreter")

    monkeypatch.setattr(processes.asyncio, "create_subprocess_exec", cannot)
    assert await processes.start_helpers(3, blobs(16, 64 * 1024)) == []


async def spawned(command: tuple[str, ...], monkeypatch: pytest.MonkeyPatch) -> Helper:
    monkeypatch.setattr(processes, "HELPER_COMMAND", command)
    return await Helper.start()


async def adopted(command: tuple[str, ...], _monkeypatch: pytest.MonkeyPatch) -> Helper:
    return await Helper.adopt(spare_of(command))


def spare_of(command: tuple[str, ...]) -> Spare:
    """A spare as the CLI's fork makes one, but of any program: its job pipe as its stdin, its frames' as its
    stdout."""
    jobs_read, jobs_write = os.pipe()
    events_read, events_write = os.pipe()
    pid = os.posix_spawn(
        command[0],
        command,
        os.environ,
        file_actions=[(os.POSIX_SPAWN_DUP2, jobs_read, 0), (os.POSIX_SPAWN_DUP2, events_write, 1)],
    )
    os.close(jobs_read)
    os.close(events_write)
    return Spare(pid, os.pidfd_open(pid), jobs_write, events_read)


@pytest.mark.anyio
@pytest.mark.parametrize("make", [spawned, adopted])
async def test_a_helper_gone_before_its_job_is_a_failed_helper_not_a_broken_pipe(
    make: Callable[[tuple[str, ...], pytest.MonkeyPatch], Awaitable[Helper]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    helper = await make((sys.executable, "-c", "import os; os._exit(3)"), monkeypatch)
    # A job larger than a pipe holds: its write fails once the helper has gone.
    layers = tuple(blobs(4096, 1))
    job = HelperJob(tmp_path, False, DownloadSettings(), None, None, REF, "m", layers, False, (700, 10, 10))
    with pytest.raises(HelperFailed, match="exit code 3"):
        await helper.run(job, lambda _event: None)
    assert helper.returncode == 3


@pytest.mark.anyio
@pytest.mark.parametrize("make", [spawned, adopted])
async def test_a_closed_helper_is_stopped_and_waited_for(
    make: Callable[[tuple[str, ...], pytest.MonkeyPatch], Awaitable[Helper]], monkeypatch: pytest.MonkeyPatch
) -> None:
    helper = await make((sys.executable, "-c", "import time; time.sleep(60)"), monkeypatch)
    await asyncio.wait_for(helper.close(), 10)
    assert helper.returncode == -signal.SIGTERM


def test_no_spare_is_forked_beside_a_thread_in_a_loop_or_off_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_fork() -> int:
        raise AssertionError("forked")

    monkeypatch.setattr(os, "fork", no_fork)
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        with forked_helpers(1):
            pass
    finally:
        stop.set()
        thread.join()
    monkeypatch.setattr(threading, "active_count", lambda: 1)

    async def in_a_loop() -> None:
        with forked_helpers(1):
            pass

    asyncio.run(in_a_loop())
    monkeypatch.setattr(sys, "platform", "darwin")
    with forked_helpers(1):
        pass


@pytest.mark.anyio
async def test_a_claim_that_does_not_wait_leaves_a_held_blob_to_its_holder(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.prepare()
    layer = blob_layer(b"some bytes")
    async with store.claim_blob(layer) as held:
        assert held is not None
        os.pwrite(held.fd, b"some", 0)
        with pytest.raises(BlobHeld):
            async with store.claim_blob(layer, wait=False):
                pytest.fail("claimed a blob another claim holds")
        # The holder's file is untouched.
        assert store.partial_path(layer.digest).read_bytes() == b"some"
    async with store.claim_blob(layer, wait=False) as claim:
        assert claim is not None


@pytest.mark.anyio
async def test_a_shared_download_leaves_held_blobs_and_says_nothing_of_present_ones(tmp_path: Path) -> None:
    model = make_model(2000, 3000)
    present, held, missing = model.layers
    store = Store(tmp_path)
    store.prepare()
    store.blob_path(present.digest).write_bytes(model.blobs[present.digest])
    events: list[Event] = []
    with respx.mock(using="httpcore2") as router:
        # The only one asked for: the blob in the store is looked at, the held one left to its holder.
        router.get(f"{BASE}/blobs/{missing.digest}").respond(200, content=model.blobs[missing.digest])
        registry = registry_for(router)
        downloader = Downloader(registry, store, settings=FAST, on_event=events.append, sleep=no_sleep)
        async with registry.client, store.claim_blob(held) as claim:
            assert claim is not None
            stats = await downloader.download(REF, model.layers, model="m", shared=True)
    assert stats.deferred == (held,)
    assert (stats.downloaded_blobs, stats.downloaded_bytes) == (1, missing.size)
    finished = [event.digest for event in events if isinstance(event, BlobFinished)]
    assert finished == [missing.digest]
    assert store.has_blob(missing)
    assert not store.has_blob(held)
