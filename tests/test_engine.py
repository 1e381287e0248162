"""The download engine's rules, driven through respx with an injected clock: no test waits for real seconds."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import gzip
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import httpx2
import pytest
import respx

from ollama_pull import commits, worker
from ollama_pull import engine as engine_module
from ollama_pull import store as store_module
from ollama_pull.engine import Downloader
from ollama_pull.errors import AuthenticationError, BlobError, IntegrityError
from ollama_pull.events import BlobProgress
from ollama_pull.partial import BlobFile
from ollama_pull.progress import Tally
from ollama_pull.store import Store

from .fakes import (
    BASE,
    FAST,
    REF,
    ChunkStream,
    FakeClock,
    Model,
    assert_store_holds,
    cancel_while_in_thread,
    download,
    make_model,
    registry_for,
    retries,
)

pytestmark = pytest.mark.anyio

Handler = Callable[[httpx.Request], httpx.Response]


class TickingClock(FakeClock):
    """A clock that moves a second every time it is read: a stalled stream ages fast, with no real waiting."""

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def serve(router: respx.MockRouter, model: Model, handler: Callable[[httpx.Request, bytes], httpx.Response]) -> None:
    for digest, data in model.blobs.items():
        router.get(f"{BASE}/blobs/{digest}").mock(side_effect=lambda request, data=data: handler(request, data))


def ok(_request: httpx.Request, data: bytes) -> httpx.Response:
    return httpx.Response(200, stream=ChunkStream(data))


def ranged(request: httpx.Request, data: bytes) -> httpx.Response:
    """The blob, or the bytes its Range asks for (``bytes=<first>-<last>`` or ``bytes=<first>-``)."""
    asked = request.headers.get("Range")
    if asked is None:
        return ok(request, data)
    first, _, last = asked.removeprefix("bytes=").partition("-")
    start, end = int(first), int(last) + 1 if last else len(data)
    headers = {"Content-Range": f"bytes {start}-{end - 1}/{len(data)}"}
    return httpx.Response(206, headers=headers, stream=ChunkStream(data[start:end]))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "models")


async def test_downloads_every_blob_verified_within_the_concurrency_limit(store: Store) -> None:
    model = make_model(*[50_000 + i for i in range(12)])
    in_flight = peak = 0
    overlapping = asyncio.Event()

    class Counting(ChunkStream):
        async def __aiter__(self):  # type: ignore[no-untyped-def]
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            if in_flight > 1:
                overlapping.set()
            try:
                # A body waits (a little) for a second one to start: blobs open their lock files in worker threads,
                # and on a loaded machine each could otherwise finish before the next one is under way.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(overlapping.wait(), 1.0)
                async for chunk in super().__aiter__():
                    yield chunk
            finally:
                in_flight -= 1

    with respx.mock(using="httpcore2") as router:
        serve(router, model, lambda _r, data: httpx.Response(200, stream=Counting(data, chunk=4096)))
        events = await download(router, model, store, settings=dataclasses.replace(FAST, concurrency=3))
    assert_store_holds(store, model)
    assert 1 < peak <= 3
    assert retries(events) == []


@pytest.mark.parametrize("chunked", [False, True], ids=["one stream", "chunks"])
async def test_a_blob_waiting_for_its_sync_holds_no_stream_and_one_stream_s_worth_of_blobs_wait_at_most(
    store: Store, monkeypatch: pytest.MonkeyPatch, chunked: bool
) -> None:
    # One stream, and the tensors' syncs held. While the first tensor waits for its sync, the second downloads over
    # the stream the first has given back, then waits for a sync of its own; the third waits for a claim, of which
    # there are twice as many as streams.
    model = make_model(30_000, 31_000, 32_000)
    asked_meanwhile: list[str] = []
    syncing = threading.Event()
    asked = threading.Event()
    go_on = threading.Event()
    fsync = os.fsync

    def held(fd: int) -> None:
        # The config blob's sync goes through: the tensors' are held.
        if os.fstat(fd).st_size >= 30_000:
            syncing.set()
            assert go_on.wait(10)
        fsync(fd)

    def handler(request: httpx.Request, data: bytes) -> httpx.Response:
        if syncing.is_set():
            asked_meanwhile.append(request.url.path)
            asked.set()
        return ranged(request, data)

    monkeypatch.setattr(os, "fsync", held)
    settings = dataclasses.replace(FAST, concurrency=1)
    if chunked:
        settings = dataclasses.replace(settings, split_min_size=20_000, chunk_size=8192)
    with respx.mock(using="httpcore2") as router:
        serve(router, model, handler)
        pulling = asyncio.ensure_future(download(router, model, store, settings=settings))
        try:
            assert await asyncio.get_running_loop().run_in_executor(None, asked.wait, 10)
            # Room for the third tensor's request, were there a claim for it.
            await asyncio.sleep(0.2)
            assert len(set(asked_meanwhile)) == 1
        finally:
            go_on.set()
            await pulling
    assert_store_holds(store, model)


async def test_corrupted_bytes_are_discarded_and_the_blob_retried(store: Store) -> None:
    model = make_model(40_000)
    corrupt_once = {"left": 1}

    def handler(_request: httpx.Request, data: bytes) -> httpx.Response:
        if len(data) == 40_000 and corrupt_once["left"]:
            corrupt_once["left"] -= 1
            data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
        return httpx.Response(200, stream=ChunkStream(data))

    with respx.mock(using="httpcore2") as router:
        serve(router, model, handler)
        events = await download(router, model, store)
    assert_store_holds(store, model)
    [retry] = retries(events)
    assert "digest mismatch" in retry.reason


async def test_a_blob_that_never_verifies_fails_with_an_integrity_error(store: Store) -> None:
    model = make_model(40_000)
    bad = model.layers[1]

    def handler(_request: httpx.Request, data: bytes) -> httpx.Response:
        return httpx.Response(200, stream=ChunkStream(data[:-1] + b"\0" if len(data) == bad.size else data))

    with respx.mock(using="httpcore2") as router:
        serve(router, model, handler)
        with pytest.raises(IntegrityError) as caught:
            await download(router, model, store, settings=dataclasses.replace(FAST, attempts=4))
        assert router.get(f"{BASE}/blobs/{bad.digest}").call_count == 4
    assert caught.value.digest == bad.digest
    assert caught.value.attempts == 4
    assert "digest mismatch" in str(caught.value)
    assert bad.digest in str(caught.value)
    assert not store.blob_path(bad.digest).exists()
    assert not store.partial_path(bad.digest).exists()


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        # Each row: the first answer for the blob, and the reason the retry event must give.
        (httpx.Response(503, headers={"Retry-After": "0"}), "HTTP 503"),
        (httpx.Response(404), "HTTP 404"),
        (httpx2.ReadError("reset by peer"), "connection reset"),
        (httpx2.RemoteProtocolError("peer closed connection"), "connection closed early"),
        (httpx2.ConnectError("refused"), "connection failed"),
        (httpx.Response(200, stream=ChunkStream(b"x" * 50_000)), "more than the manifest's 40000 bytes"),
        (httpx.Response(200, stream=ChunkStream(b"x" * 1000)), "the body ended after 1000 of 40000 bytes"),
        (httpx.Response(200, headers={"Content-Encoding": "gzip"}, stream=ChunkStream(gzip.compress(b"x"))), "gzip"),
    ],
)
async def test_failures_are_retried_with_their_reason(store: Store, failure: object, reason: str) -> None:
    model = make_model(40_000)
    target = model.layers[1]
    with respx.mock(using="httpcore2") as router:
        serve(router, model, ok)
        router.get(f"{BASE}/blobs/{target.digest}").mock(
            side_effect=[failure, httpx.Response(200, stream=ChunkStream(model.blobs[target.digest]))]
        )
        events = await download(router, model, store)
    assert_store_holds(store, model)
    [retry] = retries(events)
    assert reason in retry.reason


async def test_retry_after_is_honoured(store: Store) -> None:
    model = make_model(1000)
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    target = model.layers[1]
    with respx.mock(using="httpcore2") as router:
        serve(router, model, ok)
        router.get(f"{BASE}/blobs/{target.digest}").mock(
            side_effect=[
                httpx.Response(429, headers={"Retry-After": "7"}),
                httpx.Response(200, stream=ChunkStream(model.blobs[target.digest])),
            ]
        )
        store.prepare()
        registry = registry_for(router)
        async with registry.client:
            await Downloader(registry, store, settings=FAST, sleep=sleep).download(REF, model.layers, model="m")
    assert slept == [7.0]


async def test_a_rejected_token_is_final_not_retried(store: Store) -> None:
    model = make_model(1000)
    # The first 403 cancels the other blob, whose route may then never be called.
    with respx.mock(using="httpcore2", assert_all_called=False) as router:
        serve(router, model, lambda _r, _d: httpx.Response(403))
        with pytest.raises(AuthenticationError, match="HTTP 403"):
            await download(router, model, store)


async def test_a_token_service_that_stalls_during_a_blob_counts_against_its_attempts(store: Store) -> None:
    model = make_model(1000)
    challenge = 'Bearer realm="https://auth.test/token",service="registry.test"'
    with respx.mock(using="httpcore2", assert_all_called=False) as router:
        serve(router, model, lambda _r, _d: httpx.Response(401, headers={"WWW-Authenticate": challenge}))

        async def token(_request: httpx.Request) -> httpx.Response:
            await asyncio.Event().wait()
            raise AssertionError("never answered")

        router.get("https://auth.test/token").mock(side_effect=token)
        settings = dataclasses.replace(FAST, attempts=2, concurrency=1)
        with pytest.raises(BlobError) as caught:
            await download(router, model, store, settings=settings, clock=TickingClock())
    # Two attempts, not the ten free stalls of a blob's own server.
    assert caught.value.attempts == 2
    assert "from the token service at auth.test" in caught.value.reason


@pytest.mark.parametrize("lag", range(12))
async def test_blobs_failing_together_leave_no_unretrieved_error(store: Store, lag: int) -> None:
    # The other blobs' streams fail `lag` turns of the loop after the first one's. For some lag that lands while the
    # first failure is cancelling the others, each of which must still collect its stream's error (asyncio otherwise
    # reports "Task exception was never retrieved").
    model = make_model(1000, 1000)
    first = model.layers[0].digest
    failed = asyncio.Event()
    unretrieved: list[object] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, context: unretrieved.append(context))

    async def refuse_first(_request: httpx.Request) -> httpx.Response:
        failed.set()
        return httpx.Response(403)

    async def refuse_second(_request: httpx.Request) -> httpx.Response:
        await failed.wait()
        for _ in range(lag):
            await asyncio.sleep(0)
        return httpx.Response(403)

    with respx.mock(using="httpcore2", assert_all_called=False) as router:
        for digest in model.blobs:
            router.get(f"{BASE}/blobs/{digest}").mock(side_effect=refuse_first if digest == first else refuse_second)
        with pytest.raises(AuthenticationError):
            await download(router, model, store)
    gc.collect()
    assert unretrieved == []


async def test_stalls_are_retried_without_using_up_attempts(store: Store) -> None:
    model = make_model(40_000)
    target = model.layers[1]
    stalls = [httpx.Response(200, stream=ChunkStream(model.blobs[target.digest], stall_after=n % 2)) for n in range(8)]
    with respx.mock(using="httpcore2") as router:
        serve(router, model, ok)
        router.get(f"{BASE}/blobs/{target.digest}").mock(
            side_effect=[*stalls, httpx.Response(200, stream=ChunkStream(model.blobs[target.digest]))]
        )
        settings = dataclasses.replace(FAST, attempts=2)
        events = await download(router, model, store, settings=settings, clock=TickingClock())
    assert_store_holds(store, model)
    # Eight stalls, before the first byte and after one chunk, with only two attempts allowed: stalls are free.
    assert len(retries(events)) == 8
    assert all(retry.reason.startswith("stalled: no data for 10.0s") for retry in retries(events))


async def test_a_retry_names_the_counted_attempt_that_failed_as_retries_counts_them(store: Store) -> None:
    model = make_model(40_000)
    target = model.layers[1]
    data = model.blobs[target.digest]

    def stall() -> httpx.Response:
        return httpx.Response(200, stream=ChunkStream(data, stall_after=0))

    answers = [stall(), httpx.Response(503), stall(), stall(), httpx.Response(503)]
    answers.append(httpx.Response(200, stream=ChunkStream(data)))
    with respx.mock(using="httpcore2") as router:
        serve(router, model, ok)
        router.get(f"{BASE}/blobs/{target.digest}").mock(side_effect=answers)
        settings = dataclasses.replace(FAST, attempts=3)
        events = await download(router, model, store, settings=settings, clock=TickingClock())
    assert_store_holds(store, model)
    # The stalls are free: each is retried as the attempt it interrupted; each 503 ends one. The third attempt,
    # the last --retries 3 allows, succeeds.
    assert [(retry.attempt, retry.reason.split(":")[0]) for retry in retries(events)] == [
        (1, "stalled"),
        (1, "HTTP 503"),
        (2, "stalled"),
        (2, "stalled"),
        (2, "HTTP 503"),
    ]


async def test_a_server_that_always_stalls_cannot_hang_the_pull(store: Store) -> None:
    model = make_model(40_000)
    with respx.mock(using="httpcore2") as router:
        serve(router, model, lambda _r, data: httpx.Response(200, stream=ChunkStream(data, stall_after=0)))
        with pytest.raises(BlobError, match="stalled 4 times"):
            await download(router, model, store, settings=dataclasses.replace(FAST, max_stalls=3), clock=TickingClock())
    assert not any(store.blobs_dir.iterdir())


async def test_slow_attempts_are_aborted_and_only_the_third_counts(store: Store) -> None:
    # Six fast blobs set the median; the seventh trickles at 1 KiB per fake second, far below 10% of it.
    model = make_model(*[200_000] * 6, 60_000)
    clock = FakeClock()
    slow = model.layers[-1]

    def handler(_request: httpx.Request, data: bytes) -> httpx.Response:
        if len(data) == slow.size:
            return httpx.Response(200, stream=ChunkStream(data, chunk=1024, clock=clock, seconds_per_chunk=1.0))
        return httpx.Response(200, stream=ChunkStream(data, chunk=50_000, clock=clock, seconds_per_chunk=0.01))

    with respx.mock(using="httpcore2") as router:
        serve(router, model, handler)
        settings = dataclasses.replace(FAST, concurrency=1, attempts=2)
        with pytest.raises(BlobError) as caught:
            await download(router, model, store, settings=settings, clock=clock)
        # Two free slow aborts, then two that count against attempts=2.
        assert router.get(f"{BASE}/blobs/{slow.digest}").call_count == 4
    assert caught.value.digest == slow.digest
    assert "below 10% of the median" in caught.value.reason


async def test_slow_detection_waits_for_five_samples(store: Store) -> None:
    # With only four finished blobs there is no median yet, so a slow blob is left alone.
    model = make_model(*[200_000] * 3, 20_000)
    clock = FakeClock()

    def handler(_request: httpx.Request, data: bytes) -> httpx.Response:
        per_chunk = 1.0 if len(data) == 20_000 else 0.01
        return httpx.Response(200, stream=ChunkStream(data, chunk=1024, clock=clock, seconds_per_chunk=per_chunk))

    with respx.mock(using="httpcore2") as router:
        serve(router, model, handler)
        events = await download(router, model, store, settings=dataclasses.replace(FAST, concurrency=1), clock=clock)
    assert retries(events) == []
    assert_store_holds(store, model)


async def test_progress_never_goes_backwards_when_an_attempt_fails(store: Store) -> None:
    model = make_model(100_000)
    target = model.layers[1]
    data = model.blobs[target.digest]
    with respx.mock(using="httpcore2") as router:
        serve(router, model, ok)
        router.get(f"{BASE}/blobs/{target.digest}").mock(
            side_effect=[
                httpx.Response(200, stream=ChunkStream(data[:70_000] + b"\0" * 30_000, chunk=10_000)),
                httpx.Response(200, stream=ChunkStream(data, chunk=10_000)),
            ]
        )
        events = await download(router, model, store)
    tally = Tally()
    overall: list[int] = []
    for event in events:
        tally.apply(event)
        overall.append(tally.completed)
    progress = [
        event.completed for event in events if isinstance(event, BlobProgress) and event.digest == target.digest
    ]
    assert progress == sorted(progress)
    assert progress[-1] == 100_000
    assert overall == sorted(overall)
    assert len(retries(events)) == 1


@pytest.mark.parametrize(
    ("answer", "expected_requests"),
    [
        # The server resumes as asked: the second request asks for exactly the missing bytes and gets them.
        ("206", ["", "bytes=30000-"]),
        # The server ignores Range and sends everything: start over from zero, still verified.
        ("200", ["", "bytes=30000-"]),
        # The server resumes at the wrong offset: refuse it, throw the prefix away, start over.
        ("wrong", ["", "bytes=30000-", ""]),
        # The resumed bytes do not make the digest: the prefix may be what is wrong, so start over.
        ("corrupt", ["", "bytes=30000-", ""]),
    ],
)
async def test_a_failed_attempt_resumes_with_range_whatever_the_blob_size(
    store: Store, answer: str, expected_requests: list[str]
) -> None:
    # 100 kB, far below resume_min_size: that threshold is about keeping partial files across runs only.
    model = make_model(100_000)
    target = model.layers[1]
    data = model.blobs[target.digest]
    ranges: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        header = request.headers.get("Range", "")
        ranges.append(header)
        if len(ranges) == 1:
            return httpx.Response(200, stream=ChunkStream(data[:30_000], chunk=10_000))
        if not header or answer == "200":
            return httpx.Response(200, stream=ChunkStream(data))
        start = 20_000 if answer == "wrong" else 30_000
        body = data[start:] if answer != "corrupt" else b"\0" * (len(data) - start)
        headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
        return httpx.Response(206, headers=headers, stream=ChunkStream(body))

    with respx.mock(using="httpcore2") as router:
        serve(router, model, ok)
        router.get(f"{BASE}/blobs/{target.digest}").mock(side_effect=handler)
        events = await download(router, model, store)
    assert ranges == expected_requests
    assert_store_holds(store, model)
    progress = [e.completed for e in events if isinstance(e, BlobProgress) and e.digest == target.digest]
    assert progress == sorted(progress)


async def test_cancellation_leaves_no_task_and_no_unverified_blob(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every piece handed to the writing thread as it comes: the small blob's file opens with its first write.
    monkeypatch.setattr(engine_module, "_WRITE_DELAY", 0.0)
    model = make_model(40_000, 200_000)
    small, large = model.layers[1], model.layers[2]
    with respx.mock(using="httpcore2") as router:
        serve(router, model, lambda _r, data: httpx.Response(200, stream=ChunkStream(data, chunk=8192, stall_after=2)))
        store.prepare()
        tasks_before = asyncio.all_tasks()
        registry = registry_for(router)
        engine = Downloader(registry, store, settings=dataclasses.replace(FAST, resume_min_size=100_000))
        async with registry.client:
            task = asyncio.create_task(engine.download(REF, model.layers, model="m"))
            while not (store.partial_path(small.digest).exists() and store.partial_path(large.digest).exists()):
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.02)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    assert asyncio.all_tasks() == tasks_before
    assert not store.blob_path(small.digest).exists()
    assert not store.blob_path(large.digest).exists()
    # A small blob's partial file is removed; a large one's is kept for the next run to resume.
    assert not store.partial_path(small.digest).exists()
    assert store.partial_path(large.digest).stat().st_size == 16384


# Two batches, where the first write starts the file; and one, where the thread that starts it writes it whole.
# Either way the cancel that came meanwhile removes it: a blob gets its name only from a commit after its writes.
@pytest.mark.parametrize("size", [engine_module._WRITE_BATCH + 40_000, 1000])
async def test_a_download_cancelled_while_its_file_opens_leaves_no_partial_file(
    store: Store, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    # The file is started (emptied) in a worker thread, which a cancel does not stop: the thread writes the
    # partial file after the task that asked for it is gone. Seen on a loaded CI machine when another blob failed
    # the pull.
    model = make_model(size)
    target = model.layers[-1]
    opening = threading.Event()
    go_on = threading.Event()
    start_file = BlobFile._start
    opened = threading.Event()

    def slow_start(self: BlobFile, *, resume: bool) -> None:
        if self.layer != target:
            return start_file(self, resume=resume)
        opening.set()
        go_on.wait(10)
        try:
            return start_file(self, resume=resume)
        finally:
            opened.set()

    monkeypatch.setattr(BlobFile, "_start", slow_start)
    with respx.mock(using="httpcore2", assert_all_called=False) as router:
        serve(router, model, ok)
        began = time.monotonic()
        await cancel_while_in_thread(opening, go_on, download(router, model, store))
    # The cancelled download waited for the thread without holding up the event loop (which would have kept
    # the test from letting the thread go on, until its ten-second wait ran out).
    assert time.monotonic() - began < 5
    assert opened.wait(10)
    config = store.blob_path(model.layers[0].digest).name
    names = {path.name for path in store.blobs_dir.iterdir()} - {config}
    assert names == set()


async def test_a_small_blob_costs_two_hand_offs_to_a_worker_thread(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each hand-off is a tenth of a millisecond of the event loop's time, the bulk of a 64 KiB blob's: taking the
    # lock and checking presence is one, writing and hashing the blob the other. The commit's (the sync and the
    # name) is shared by the blobs of a batch (tests/test_commits.py).
    model = make_model(*[60_000 + i for i in range(8)])
    calls: list[str] = []

    def counted(work: Callable[..., object], /, *args: object) -> asyncio.Future[object]:
        calls.append(getattr(work, "__qualname__", repr(work)))
        return worker.in_thread(work, *args)

    for module in (engine_module, store_module, commits):
        monkeypatch.setattr(module, "in_thread", counted)
    with respx.mock(using="httpcore2") as router:
        serve(router, model, lambda _request, data: httpx.Response(200, content=data))
        await download(router, model, store)
    assert_store_holds(store, model)
    batches = calls.count("BlobFile.commit_all")
    assert len(calls) - batches == 2 * len(model.layers), calls
    assert 1 <= batches <= len(model.layers)
