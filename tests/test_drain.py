"""Bodies drained straight from the socket, by threads of their own (long ones) or by the process's shared
receiving thread (shorter ones), against real sockets on 127.0.0.1; and the engine's use of them: a large blob
stays in one stream while the link keeps up, and is split when it does not."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path

import httpx2
import pytest

import ollama_pull.registry
from ollama_pull import engine, http1, pull
from ollama_pull.drain import DRAIN, DRAIN_MIN, OWN_THREADS_MIN, Drain
from ollama_pull.engine import _LinkProbe
from ollama_pull.errors import StorageError
from ollama_pull.network import make_client
from ollama_pull.partial import BlobFile
from ollama_pull.store import Store

from .fakes import FAST
from .fault_registry import Fault, FaultRegistry
from .test_network import Handler, answering, connects, serving

pytestmark = pytest.mark.anyio

__all__ = ["connects"]

MIB = 1024 * 1024
# A body for threads of its own, and one for the shared receiving thread that takes more than one of its reads.
LONG = os.urandom(OWN_THREADS_MIN + 3 * MIB + 12345)
SHORT = os.urandom(3 * DRAIN_MIN + 12345)


@pytest.fixture(params=[LONG, SHORT], ids=["own-threads", "shared-thread"])
def body(request: pytest.FixtureRequest) -> bytes:
    data: bytes = request.param
    return data


class Collected:
    """A drain's writer and progress: every byte written, in order, and every byte reported."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.data = bytearray()
        self.reported = 0
        # Set once the drain has returned: nothing may be written after that.
        self.sealed = False
        self.late = 0
        # The threads that wrote.
        self.writers: set[str] = set()
        self._fail_after = fail_after

    def write(self, pieces: Sequence[memoryview]) -> None:
        self.writers.add(threading.current_thread().name)
        if self.sealed:
            self.late += 1
        if self._fail_after is not None and len(self.data) >= self._fail_after:
            raise OSError(28, "No space left on device")
        for piece in pieces:
            self.data += piece

    def progress(self, count: int) -> None:
        self.reported += count


def drain_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("ollama-pull-drain")]


def receivers() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "ollama-pull-receiver"]


def head(length: int) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % length


async def test_a_body_is_drained_whole_and_its_connection_reused(connects: list[tuple[str, int]], body: bytes) -> None:
    async with serving(answering(body)) as port, make_client(insecure=True) as client:
        for _ in range(2):
            async with client.stream("GET", f"http://127.0.0.1:{port}/blob") as response:
                drain = response.extensions[DRAIN]
                assert isinstance(drain, Drain)
                collected = Collected()
                await drain.into(collected.write, collected.progress)
            assert collected.data == body
            assert collected.reported == len(body) == drain.received
            if body is SHORT:
                assert collected.writers == {"ollama-pull-receiver"}
            else:
                assert "ollama-pull-receiver" not in collected.writers
    assert len(connects) == 1
    assert not drain_threads()


async def test_bodies_drained_at_once_share_one_receiving_thread() -> None:
    bodies = [os.urandom(DRAIN_MIN + 1000 * number) for number in range(1, 9)]
    async with make_client(insecure=True) as client:

        async def fetch(data: bytes) -> bytes:
            async with (
                serving(answering(data)) as port,
                client.stream("GET", f"http://127.0.0.1:{port}/blob") as response,
            ):
                collected = Collected()
                await response.extensions[DRAIN].into(collected.write, collected.progress)
                assert collected.writers == {"ollama-pull-receiver"}
                return bytes(collected.data)

        async with asyncio.TaskGroup() as group:
            fetched = [group.create_task(fetch(data)) for data in bodies]
    assert [task.result() for task in fetched] == bodies
    assert len(receivers()) == 1
    assert not drain_threads()


async def test_where_a_socket_cannot_be_lent_a_large_blob_comes_in_chunks_from_the_event_loop(
    registry: FaultRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Windows: no descriptor to duplicate. No body is offered a drain, and with nothing to judge the link by, a
    # large blob comes in chunks from the start, as over TLS.
    monkeypatch.setattr(http1, "SUPPORTED", False)
    monkeypatch.setattr(ollama_pull.registry, "SUPPORTED", False)
    reference, digest, data = big_blob_model(registry)
    async with make_client(insecure=True) as client:
        async with client.stream("GET", f"{registry.url}/v2/ns/big/blobs/{digest}") as response:
            assert DRAIN not in response.extensions
        registry.reset_log()
        await pull(reference, models_dir=tmp_path, insecure=True, settings=SPLIT, client=client)
    assert Store(tmp_path).blob_path(digest).read_bytes() == data
    ranges = [request.range for request in registry.blob_requests(digest)]
    assert len(ranges) == -(-len(data) // SPLIT.chunk_size)
    assert all(ranges)


async def test_short_bodies_are_read_by_the_event_loop() -> None:
    async with (
        serving(answering(b"x" * (DRAIN_MIN - 1))) as port,
        make_client(insecure=True) as client,
        client.stream("GET", f"http://127.0.0.1:{port}/blob") as response,
    ):
        assert DRAIN not in response.extensions
        assert len(await response.aread()) == DRAIN_MIN - 1


def cut_after(body: bytes, sent: int) -> Handler:
    """A server that sends ``sent`` bytes of the body, then closes the connection."""

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(head(len(body)) + body[:sent])
        await writer.drain()
        writer.close()

    return cut


async def test_a_body_cut_short_fails_after_writing_what_came(connects: list[tuple[str, int]], body: bytes) -> None:
    sent = len(body) * 2 // 3
    async with serving(cut_after(body, sent)) as port, make_client(insecure=True) as client:
        async with client.stream("GET", f"http://127.0.0.1:{port}/blob") as response:
            collected = Collected()
            with pytest.raises(httpx2.RemoteProtocolError, match=f"received {sent} bytes, expected {len(body)}"):
                await response.extensions[DRAIN].into(collected.write, collected.progress)
        assert collected.data == body[:sent]
        assert collected.reported == sent
        # Not reusable: the next request opens a connection of its own.
        async with client.stream("GET", f"http://127.0.0.1:{port}/blob"):
            pass
    assert len(connects) == 2


async def test_a_body_whose_connection_closed_before_the_drain_fails_after_writing_what_came(body: bytes) -> None:
    sent = 64 * 1024
    async with serving(cut_after(body, sent)) as port, make_client(insecure=True) as client:
        async with client.stream("GET", f"http://127.0.0.1:{port}/blob") as response:
            drain = response.extensions[DRAIN]
            # The event loop sees the end of the connection before the body is lent: no socket is left to lend.
            transport = drain._lender._transport  # type: ignore[attr-defined]
            for _ in range(500):
                if transport.get_extra_info("socket").fileno() < 0:
                    break
                await asyncio.sleep(0.01)
            assert transport.get_extra_info("socket").fileno() < 0
            collected = Collected()
            with pytest.raises(httpx2.RemoteProtocolError, match=f"received {sent} bytes"):
                await drain.into(collected.write, collected.progress)
        assert collected.data == body[:sent]


async def silent_after(body: bytes, count: int) -> tuple[Callable[..., Awaitable[None]], asyncio.Event]:
    """A server that sends ``count`` bytes of the body, then nothing until the event is set, then the rest."""
    release = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(head(len(body)) + body[:count])
        await writer.drain()
        await release.wait()
        writer.write(body[count:])
        await writer.drain()
        writer.close()

    return hold, release


async def test_a_cancelled_drain_stops_its_threads_before_it_returns(body: bytes) -> None:
    count = len(body) // 3
    hold, release = await silent_after(body, count)
    async with (
        serving(hold) as port,
        make_client(insecure=True) as client,
        client.stream("GET", f"http://127.0.0.1:{port}/blob") as response,
    ):
        collected = Collected()
        task = asyncio.create_task(response.extensions[DRAIN].into(collected.write, collected.progress))
        while collected.reported < count:
            await asyncio.sleep(0.01)
        assert drain_threads() if body is LONG else receivers()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
        # Nothing runs behind the caller's back: it may close or truncate the file at once.
        collected.sealed = True
        assert not drain_threads()
        assert collected.data == body[:count]
        # The rest of the body arrives; another body goes through the shared thread after it: neither
        # reaches the cancelled drain's writer.
        release.set()
        async with (
            serving(answering(SHORT)) as other,
            client.stream("GET", f"http://127.0.0.1:{other}/") as following,
        ):
            after = Collected()
            await following.extensions[DRAIN].into(after.write, after.progress)
        assert after.data == SHORT
        assert collected.late == 0


async def test_a_write_that_fails_ends_the_drain_with_its_error(body: bytes) -> None:
    async with (
        serving(answering(body)) as port,
        make_client(insecure=True) as client,
        client.stream("GET", f"http://127.0.0.1:{port}/blob") as response,
    ):
        # The first write goes through, the next fails.
        collected = Collected(fail_after=1)
        with pytest.raises(OSError, match="No space left"):
            await asyncio.wait_for(response.extensions[DRAIN].into(collected.write, collected.progress), 10)
    assert not drain_threads()


def test_the_probe_splits_once_a_window_was_mostly_spent_waiting() -> None:
    probe = _LinkProbe()
    window = engine._PROBE_WINDOW
    # Too early to judge, however much it waited.
    assert not probe.link_is_slower(window / 2, window / 2)
    # A window of a fast link: the thread hardly waited.
    assert not probe.link_is_slower(window, 0.01)
    # The next window is judged on its own: it waited for most of it.
    assert probe.link_is_slower(2 * window + 0.01, 0.01 + 0.9 * window)


@pytest.fixture
def registry() -> Iterator[FaultRegistry]:
    with FaultRegistry() as server:
        yield server


# Large blobs: over the split size and long enough for threads of their own; chunks of an eighth of it, drained
# by the shared thread.
SPLIT = dataclasses.replace(FAST, split_min_size=OWN_THREADS_MIN, chunk_size=2 * MIB, streams_per_blob=4)


def big_blob_model(registry: FaultRegistry) -> tuple[str, str, bytes]:
    data = os.urandom(4 * OWN_THREADS_MIN + 777)
    model = registry.add_model("ns/big", layers=[("application/vnd.ollama.image.model", data, None)])
    return f"{registry.host}/ns/big:latest", model.layer_digests[0], data


async def test_a_large_blob_stays_in_one_stream_while_the_link_keeps_up(
    registry: FaultRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference, digest, data = big_blob_model(registry)
    # Never judged slow, however loaded the machine (the judgement has its own test above); written back to disk
    # every MiB.
    monkeypatch.setattr(engine, "_WAITING_SHARE", 1.0)
    monkeypatch.setattr(engine, "_FLUSH_EVERY", MIB)
    flushes: list[int] = []
    flush = BlobFile.flush

    def counted(self: BlobFile) -> None:
        flushes.append(self.offset)
        flush(self)

    monkeypatch.setattr(BlobFile, "flush", counted)
    async with make_client(insecure=True) as client:
        await pull(reference, models_dir=tmp_path, insecure=True, settings=SPLIT, client=client)
    assert Store(tmp_path).blob_path(digest).read_bytes() == data
    requests = registry.blob_requests(digest)
    assert [request.range for request in requests] == [None]
    assert flushes


async def test_a_large_blob_on_a_capped_link_is_split_after_its_first_stream(
    registry: FaultRegistry, tmp_path: Path
) -> None:
    reference, digest, data = big_blob_model(registry)
    registry.inject(digest, Fault("slow", rate=MIB))
    async with make_client(insecure=True) as client:
        await pull(reference, models_dir=tmp_path, insecure=True, settings=SPLIT, client=client)
    store = Store(tmp_path)
    assert hashlib.sha256(store.blob_path(digest).read_bytes()).digest() == hashlib.sha256(data).digest()
    assert not store.parts_state_path(digest).exists()
    first, *chunks = registry.blob_requests(digest)
    assert first.range is None
    assert first.bytes_sent < len(data) // 2
    # The chunks go on from what the first stream wrote: its chunk is resumed, none before it is asked for again.
    starts = sorted(int(request.range.removeprefix("bytes=").split("-")[0]) for request in chunks if request.range)
    assert len(starts) == len(chunks) >= 2
    assert starts[0] >= first.bytes_sent - SPLIT.chunk_size


async def test_a_write_back_runs_one_at_a_time_and_its_failure_fails_the_blob(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "_FLUSH_EVERY", 10)
    release = threading.Event()
    flushes: list[int] = []

    def flush() -> None:
        flushes.append(1)
        release.wait(5)
        raise StorageError("cannot write the blob: No space left on device")

    write_back = engine._WriteBack(flush, 0)
    write_back.landed(10)
    # Another 10 bytes while the first flush runs: no second one beside it.
    write_back.landed(20)
    release.set()
    with pytest.raises(StorageError, match="No space left"):
        await write_back.wait()
    assert flushes == [1]
    # Once it has ended, the next bytes start the next flush, and its failure is raised there.
    write_back.landed(30)

    async def land_until_it_fails() -> None:
        for _ in range(500):
            await asyncio.sleep(0.01)
            write_back.landed(40)

    with pytest.raises(StorageError):
        await land_until_it_fails()
    await write_back.wait(check=False)
