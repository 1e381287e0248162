"""The partial files of blobs: one stream into a hashed prefix; large blobs in chunks, parallel Range requests into
one sparse file, hashed whole, resumable across runs."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import respx

from ollama_pull import engine
from ollama_pull.errors import IntegrityError, StorageError
from ollama_pull.events import BlobProgress, BlobStarted
from ollama_pull.manifest import Layer
from ollama_pull.partial import BlobFile, PartedBlob, PartialFile, plan_chunks
from ollama_pull.store import BlobClaim, Store

from .fakes import BASE, FAST, ChunkStream, Model, assert_store_holds, download, make_model, retries

pytestmark = pytest.mark.anyio

KIB = 1024
CHUNK = 16 * KIB
PARTED = dataclasses.replace(FAST, split_min_size=64 * KIB, chunk_size=CHUNK, streams_per_blob=4)
RANGE = re.compile(r"^bytes=(\d+)-(\d+)$")


Claim = Callable[[Store, Layer], BlobClaim]


@pytest.fixture
def claim() -> Iterator[Claim]:
    """What ``Store.claim_blob`` gives whoever writes a blob, taken at once: its partial file, created if need
    be, open (and let go of after the test, as the claim would)."""
    claims: list[BlobClaim] = []

    def take(store: Store, layer: Layer) -> BlobClaim:
        path = store.partial_path(layer.digest)
        claims.append(BlobClaim(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), path))
        return claims[-1]

    yield take
    for taken in claims:
        taken.release()


def layer_for(data: bytes) -> Layer:
    return Layer("application/vnd.ollama.image.tensor", "sha256:" + hashlib.sha256(data).hexdigest(), len(data))


def test_blob_is_renamed_into_place_only_when_verified(tmp_path: Path, claim: Claim) -> None:
    store = Store(tmp_path)
    store.prepare()
    data = b"hello blob"
    layer = layer_for(data)
    blob = store.open_blob(layer, claim(store, layer), resume=False)
    blob.write_all([data[:5] + b"X" + data[6:]])
    assert blob.mismatch() is not None
    assert "digest mismatch" in (blob.mismatch() or "")
    blob.restart()
    blob.write_all([data[:4]])
    assert blob.mismatch() == f"got 4 bytes, expected {len(data)}"
    blob.write_all([data[4:]])
    assert blob.mismatch() is None
    assert not store.has_blob(layer)
    blob.commit()
    assert store.blob_path(layer.digest).read_bytes() == data
    assert not store.partial_path(layer.digest).exists()
    assert store.has_blob(layer)


def test_a_blob_from_nothing_empties_its_file_with_the_first_write(tmp_path: Path, claim: Claim) -> None:
    store = Store(tmp_path)
    store.prepare()
    data = b"hello blob"
    layer = layer_for(data)
    # What an earlier run left, and would resume only for a resumable blob.
    store.partial_path(layer.digest).write_bytes(b"stale")
    blob = store.open_blob(layer, claim(store, layer), resume=False)
    assert store.partial_path(layer.digest).read_bytes() == b"stale"
    blob.restart()
    blob.write_all([data[:4]])
    assert store.partial_path(layer.digest).read_bytes() == data[:4]
    blob.close(keep=False)
    assert list(store.blobs_dir.iterdir()) == []
    # Closed before any write, it removes what it would have overwritten.
    store.partial_path(layer.digest).write_bytes(b"stale")
    store.open_blob(layer, claim(store, layer), resume=False).close(keep=False)
    assert list(store.blobs_dir.iterdir()) == []


@pytest.mark.parametrize("fresh", [True, False])
def test_only_a_partial_file_the_claim_did_not_make_is_searched_for_chunk_progress(
    tmp_path: Path, fresh: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path)
    store.prepare()
    data = b"a blob"
    layer = layer_for(data)
    state = store.parts_state_path(layer.digest)
    path = store.partial_path(layer.digest)
    if not fresh:
        # A chunked run's leftovers, to be written over in one stream: a sparse file and its progress.
        path.write_bytes(b"\0" * 100)
        state.write_text("{}")
    looked: list[Path] = []
    unlink = Path.unlink

    def recording(target: Path, missing_ok: bool = False) -> None:
        looked.append(target)
        unlink(target, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", recording)
    claim = BlobClaim(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), path, fresh=fresh)
    blob = store.open_blob(layer, claim, resume=False)
    blob.write_all([data])
    blob.commit()
    assert store.blob_path(layer.digest).read_bytes() == data
    # A file the claim made has no progress beside it: looking for some is a search of blobs/ under its lock.
    assert looked == ([] if fresh else [state])
    assert list(store.blobs_dir.iterdir()) == [store.blob_path(layer.digest)]


def test_an_empty_blob_is_committed_without_a_write(tmp_path: Path, claim: Claim) -> None:
    store = Store(tmp_path)
    store.prepare()
    layer = layer_for(b"")
    blob = store.open_blob(layer, claim(store, layer), resume=False)
    blob.commit()
    assert blob.committed
    assert store.blob_path(layer.digest).read_bytes() == b""
    assert not store.partial_path(layer.digest).exists()


def test_resume_rehashes_the_kept_prefix(tmp_path: Path, claim: Claim) -> None:
    store = Store(tmp_path)
    store.prepare()
    data = os.urandom(3000)
    layer = layer_for(data)
    first = store.open_blob(layer, claim(store, layer), resume=True)
    first.write_all([data[:1234]])
    first.close(keep=True)
    second = store.open_blob(layer, claim(store, layer), resume=True)
    assert second.offset == 1234
    second.write_all([data[1234:]])
    assert second.mismatch() is None
    second.close(keep=False)
    assert not store.partial_path(layer.digest).exists()


def test_a_partial_longer_than_the_blob_is_started_over(tmp_path: Path, claim: Claim) -> None:
    store = Store(tmp_path)
    store.prepare()
    layer = layer_for(b"abc")
    store.partial_path(layer.digest).write_bytes(b"abcdef")
    assert store.open_blob(layer, claim(store, layer), resume=True).offset == 0


@pytest.mark.parametrize("kind", [BlobFile, PartedBlob])
def test_either_kind_of_partial_file_is_checked_restarted_committed_or_removed_alike(
    tmp_path: Path, kind: type[PartialFile], claim: Claim
) -> None:
    store = Store(tmp_path)
    store.prepare()
    data = os.urandom(3 * CHUNK + 5)
    layer = layer_for(data)

    def opened() -> PartialFile:
        return (
            store.open_blob(layer, claim(store, layer), resume=False)
            if kind is BlobFile
            else PartedBlob(store, layer, claim(store, layer), chunk_size=CHUNK)
        )

    def filled(blob: PartialFile) -> PartialFile:
        if isinstance(blob, BlobFile):
            blob.write_all([data])
        elif isinstance(blob, PartedBlob):
            for chunk in blob.chunks:
                blob.write(chunk, [data[chunk.start : chunk.end]])
            blob.hash_landed()
        return blob

    blob = filled(opened())
    assert blob.mismatch() is None
    blob.restart()
    assert blob.mismatch() is not None
    blob.close(keep=False)
    assert list(store.blobs_dir.iterdir()) == []
    blob = filled(opened())
    blob.commit()
    assert list(store.blobs_dir.iterdir()) == [store.blob_path(layer.digest)]
    assert store.blob_path(layer.digest).read_bytes() == data


# A piece of a ranged answer: (request, first byte, end exclusive, the bytes) -> the response to send.
Answer = Callable[[httpx.Request, int, int, bytes], httpx.Response]


def partial(_request: httpx.Request, start: int, end: int, piece: bytes) -> httpx.Response:
    return httpx.Response(
        206, headers={"Content-Range": f"bytes {start}-{end - 1}/*"}, stream=ChunkStream(piece, chunk=4 * KIB)
    )


class RangedServer:
    """Serves a model's blobs honouring single ranges; counts the bytes it sends and the streams open at once."""

    def __init__(self, model: Model, answer: Answer = partial) -> None:
        self.model = model
        self.answer = answer
        self.ranges: list[tuple[int, int]] = []
        self.open = 0
        self.most_open = 0

    def mount(self, router: respx.MockRouter) -> None:
        for digest, data in self.model.blobs.items():
            router.get(f"{BASE}/blobs/{digest}").mock(side_effect=lambda request, data=data: self.serve(request, data))

    async def serve(self, request: httpx.Request, data: bytes) -> httpx.Response:
        match = RANGE.match(request.headers.get("Range", ""))
        if match is None:
            return httpx.Response(200, stream=ChunkStream(data, chunk=4 * KIB))
        start, end = int(match[1]), int(match[2]) + 1
        self.ranges.append((start, end))
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            # Let the other streams start before this one answers, so "at once" really happens.
            for _ in range(3):
                await asyncio.sleep(0)
        finally:
            self.open -= 1
        return self.answer(request, start, end, data[start:end])

    @property
    def sent(self) -> int:
        return sum(end - start for start, end in self.ranges)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "models")


def big_model() -> Model:
    # One blob of ten chunks and a half, over the split size; a config blob that stays whole.
    return make_model(10 * CHUNK + CHUNK // 2)


async def test_a_large_blob_comes_in_ranged_chunks_and_is_verified_whole(store: Store) -> None:
    model = big_model()
    server = RangedServer(model)
    with respx.mock(using="httpcore2") as router:
        server.mount(router)
        events = await download(router, model, store, settings=PARTED)
    assert_store_holds(store, model)
    size = model.layers[1].size
    assert sorted(server.ranges) == [(chunk.start, chunk.end) for chunk in plan_chunks(size, CHUNK)]
    assert server.most_open == PARTED.streams_per_blob
    progress = [event.completed for event in events if isinstance(event, BlobProgress) and event.size == size]
    assert progress == sorted(progress)
    assert progress[-1] == size
    assert not retries(events)


async def test_extra_streams_share_the_pulls_connection_budget(store: Store) -> None:
    model = big_model()
    server = RangedServer(model)
    with respx.mock(using="httpcore2") as router:
        server.mount(router)
        await download(router, model, store, settings=dataclasses.replace(PARTED, concurrency=2))
    assert_store_holds(store, model)
    assert server.most_open <= 2


async def test_one_connection_is_enough_for_a_chunked_blob(store: Store) -> None:
    model = big_model()
    server = RangedServer(model)
    with respx.mock(using="httpcore2") as router:
        server.mount(router)
        await asyncio.wait_for(download(router, model, store, settings=dataclasses.replace(PARTED, concurrency=1)), 10)
    assert_store_holds(store, model)
    assert server.most_open == 1


async def test_small_blobs_stay_whole(store: Store) -> None:
    model = make_model(3 * CHUNK, 2 * CHUNK)
    server = RangedServer(model)
    with respx.mock(using="httpcore2") as router:
        server.mount(router)
        await download(router, model, store, settings=PARTED)
    assert_store_holds(store, model)
    assert server.ranges == []


async def test_a_failed_chunk_is_retried_from_where_it_stopped(store: Store) -> None:
    model = big_model()
    cut = {3 * CHUNK: CHUNK // 4}

    def truncating(request: httpx.Request, start: int, end: int, piece: bytes) -> httpx.Response:
        keep = cut.pop(start, None)
        return partial(request, start, end, piece[:keep] if keep is not None else piece)

    server = RangedServer(model, truncating)
    with respx.mock(using="httpcore2") as router:
        server.mount(router)
        events = await download(router, model, store, settings=PARTED)
    assert_store_holds(store, model)
    assert (3 * CHUNK + CHUNK // 4, 4 * CHUNK) in server.ranges
    [retry] = retries(events)
    assert retry.reason == f"bytes {3 * CHUNK}-{4 * CHUNK - 1}: the body ended after {CHUNK // 4} of {CHUNK} bytes"


async def test_a_server_that_ignores_ranges_gets_one_stream(store: Store) -> None:
    model = big_model()

    def whole(_request: httpx.Request, _start: int, _end: int, _piece: bytes) -> httpx.Response:
        return httpx.Response(200, stream=ChunkStream(model.blobs[model.layers[1].digest], chunk=4 * KIB))

    server = RangedServer(model, whole)
    with respx.mock(using="httpcore2") as router:
        server.mount(router)
        events = await download(router, model, store, settings=PARTED)
    assert_store_holds(store, model)
    assert [retry.reason for retry in retries(events)] == [
        "the server ignores Range requests: downloading in one stream"
    ]
    assert sum(isinstance(event, BlobStarted) for event in events) == len(model.blobs)


async def test_a_corrupt_chunk_fails_the_whole_blob_and_it_starts_over(store: Store) -> None:
    model = big_model()
    corrupt = [True]

    def flipping(request: httpx.Request, start: int, end: int, piece: bytes) -> httpx.Response:
        if start == 5 * CHUNK and corrupt.pop(0):
            corrupt.append(False)
            piece = bytes([piece[0] ^ 1]) + piece[1:]
        return partial(request, start, end, piece)

    server = RangedServer(model, flipping)
    with respx.mock(using="httpcore2") as router:
        server.mount(router)
        events = await download(router, model, store, settings=PARTED)
    assert_store_holds(store, model)
    [retry] = retries(events)
    assert retry.reason.startswith("digest mismatch")
    assert server.sent == 2 * model.layers[1].size


async def test_a_blob_whose_chunks_never_verify_fails_with_nothing_left(store: Store) -> None:
    model = big_model()

    def flipping(request: httpx.Request, start: int, end: int, piece: bytes) -> httpx.Response:
        return partial(request, start, end, bytes([piece[0] ^ 1]) + piece[1:] if start == 0 else piece)

    server = RangedServer(model, flipping)
    with respx.mock(using="httpcore2", assert_all_called=False) as router:
        server.mount(router)
        with pytest.raises(IntegrityError, match="digest mismatch"):
            await download(router, model, store, settings=dataclasses.replace(PARTED, attempts=2))
    digest = model.layers[1].digest
    assert not store.blob_path(digest).exists()
    # The last attempt's bytes were wrong and are gone; an empty partial is not worth keeping.
    assert not store.partial_path(digest).exists()
    assert not store.parts_state_path(digest).exists()


def saved_bytes(store: Store, digest: str) -> int:
    """The bytes a chunked blob's saved progress says have landed (0 before the first save)."""
    try:
        return sum(json.loads(store.parts_state_path(digest).read_text())["done"])
    except FileNotFoundError:
        return 0


async def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting"
        await asyncio.sleep(0.005)


async def test_an_interrupted_blob_resumes_only_its_missing_chunks(store: Store) -> None:
    model = big_model()
    layer = model.layers[1]
    data = model.blobs[layer.digest]
    stop = asyncio.Event()

    def stalling_late(request: httpx.Request, start: int, end: int, piece: bytes) -> httpx.Response:
        if start >= 6 * CHUNK:
            stop.set()
            return httpx.Response(
                206,
                headers={"Content-Range": f"bytes {start}-{end - 1}/*"},
                stream=ChunkStream(piece, chunk=4 * KIB, stall_after=1),
            )
        return partial(request, start, end, piece)

    first = RangedServer(model, stalling_late)
    with respx.mock(using="httpcore2", assert_all_called=False) as router:
        first.mount(router)
        pull = asyncio.create_task(download(router, model, store, settings=PARTED))
        await stop.wait()
        # The first six chunks are in flight or landing (worker threads write them): cancel once the saved
        # progress says they are in, however long a loaded machine takes.
        await wait_until(lambda: saved_bytes(store, layer.digest) >= 6 * CHUNK)
        pull.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pull
    assert store.partial_path(layer.digest).exists()
    saved = json.loads(store.parts_state_path(layer.digest).read_text())
    had = sum(saved["done"])
    assert had >= 6 * CHUNK

    second = RangedServer(model)
    with respx.mock(using="httpcore2", assert_all_called=False) as router:
        second.mount(router)
        await download(router, model, store, settings=PARTED)
    assert_store_holds(store, model)
    assert second.sent == len(data) - had
    assert all(start >= 6 * CHUNK for start, _end in second.ranges)


async def test_a_single_stream_partial_is_resumed_as_a_prefix(store: Store) -> None:
    model = big_model()
    layer = model.layers[1]
    store.prepare()
    prefix = 3 * CHUNK + 100
    store.partial_path(layer.digest).write_bytes(model.blobs[layer.digest][:prefix])
    server = RangedServer(model)
    with respx.mock(using="httpcore2") as router:
        server.mount(router)
        await download(router, model, store, settings=PARTED)
    assert_store_holds(store, model)
    assert min(server.ranges) == (prefix, 4 * CHUNK)
    assert server.sent == layer.size - prefix


@pytest.mark.parametrize(
    "state",
    ["not json", "[]", '{"size": 1, "chunk_size": 16384, "done": []}', None],
    ids=["garbage", "not an object", "another blob", "wrong counts"],
)
async def test_state_that_does_not_describe_the_file_is_not_trusted(
    store: Store, state: str | None, claim: Claim
) -> None:
    model = big_model()
    layer = model.layers[1]
    store.prepare()
    store.partial_path(layer.digest).write_bytes(b"\0" * (2 * CHUNK))
    if state is None:
        state = json.dumps({"size": layer.size, "chunk_size": CHUNK, "done": [CHUNK + 1] + [0] * 10})
    store.parts_state_path(layer.digest).write_text(state)
    blob = PartedBlob(store, layer, claim(store, layer), chunk_size=CHUNK)
    try:
        # Without trustworthy state the file counts as a prefix: two chunks of zeros, which the hash will refuse.
        assert blob.done == [CHUNK, CHUNK] + [0] * 9
    finally:
        blob.close(keep=False)
    assert not store.parts_state_path(layer.digest).exists()


def test_progress_is_saved_before_any_byte_and_dropped_on_commit(store: Store, claim: Claim) -> None:
    model = big_model()
    layer = model.layers[1]
    data = model.blobs[layer.digest]
    store.prepare()
    blob = PartedBlob(store, layer, claim(store, layer), chunk_size=CHUNK)
    # Saved at once, so a kill before the first save cannot leave a sparse file that reads as a prefix.
    assert json.loads(store.parts_state_path(layer.digest).read_text())["done"] == [0] * 11
    for chunk in reversed(blob.chunks):
        blob.write(chunk, [data[chunk.start : chunk.end]])
    blob.hash_landed()
    assert blob.mismatch() is None
    blob.commit()
    assert store.blob_path(layer.digest).read_bytes() == data
    assert sorted(path.name for path in store.blobs_dir.iterdir()) == [layer.digest.replace(":", "-")]


async def test_landed_bytes_are_written_back_during_the_download(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every 2 chunks hashed, a write-back starts in a thread (one at a time), on its own descriptor.
    monkeypatch.setattr(engine, "_FLUSH_EVERY", 2 * CHUNK)
    flushed: list[int] = []

    def datasync(fd: int) -> None:
        flushed.append(fd)
        os.fsync(fd)

    monkeypatch.setattr("ollama_pull.partial._datasync", datasync)
    model = big_model()
    with respx.mock(using="httpcore2") as router:
        RangedServer(model).mount(router)
        await download(router, model, store, settings=PARTED)
    assert_store_holds(store, model)
    assert len(flushed) >= 2


def test_a_write_back_error_fails_the_blob_and_a_closed_blob_has_none(
    store: Store, monkeypatch: pytest.MonkeyPatch, claim: Claim
) -> None:
    layer = big_model().layers[1]
    store.prepare()
    blob = PartedBlob(store, layer, claim(store, layer), chunk_size=CHUNK)

    def failing(_fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr("ollama_pull.partial._datasync", failing)
    try:
        with pytest.raises(StorageError, match="Input/output error"):
            blob.flush()
    finally:
        blob.close(keep=False)
    blob.flush()  # closed: nothing to write back, and no descriptor of someone else's touched


def test_a_named_blob_lets_go_of_its_claim_in_the_thread_that_named_it(tmp_path: Path, claim: Claim) -> None:
    # Closing the fsynced file was 6% of the event loop's time on 4,096 small blobs when the claim did it there.
    store = Store(tmp_path)
    store.prepare()
    data = b"a blob"
    layer = layer_for(data)
    named = claim(store, layer)
    blob = store.open_blob(layer, named, resume=False)
    blob.write_all([data])
    blob.commit()
    assert blob.committed
    assert named.released
    # One that is given up instead stays claimed: the claim removes or keeps it, under its lock.
    other = claim(store, layer_for(b"another"))
    given_up = store.open_blob(layer_for(b"another"), other, resume=False)
    given_up.write_all([b"anoth"])
    given_up.close(keep=False)
    assert not other.released
