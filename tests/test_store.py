from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from pathlib import Path

import pytest

from ollama_pull.errors import StorageError
from ollama_pull.manifest import TENSOR_MEDIA_TYPE, Layer
from ollama_pull.reference import parse_reference
from ollama_pull.store import Store, default_models_dir, storage_error


def test_default_models_dir_follows_ollama(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OLLAMA_MODELS", f"  {tmp_path}/m \n")
    assert default_models_dir() == tmp_path / "m"
    monkeypatch.setenv("OLLAMA_MODELS", "   ")
    assert default_models_dir() == Path.home() / ".ollama" / "models"


def test_paths_match_ollamas_layout(tmp_path: Path) -> None:
    store = Store(tmp_path)
    digest = "sha256:" + "ab" * 32
    assert store.blob_path(digest) == tmp_path / "blobs" / ("sha256-" + "ab" * 32)
    assert store.partial_path(digest).name == "sha256-" + "ab" * 32 + "-partial"
    ref = parse_reference("127.0.0.1:5000/ns/model:tag")
    assert store.manifest_path(ref) == tmp_path / "manifests" / "127.0.0.1:5000" / "ns" / "model" / "tag"


@pytest.mark.parametrize(
    "digest", ["sha256:../../x", "sha256:" + "0" * 63, "../" + "0" * 64, "sha256:" + "0" * 64 + "/"]
)
def test_a_digest_cannot_escape_the_store(tmp_path: Path, digest: str) -> None:
    with pytest.raises(ValueError, match="not a sha256 digest"):
        Store(tmp_path).blob_path(digest)


def test_manifest_write_is_atomic_and_exact(tmp_path: Path) -> None:
    store = Store(tmp_path)
    ref = parse_reference("h:1/ns/m:t")
    path = store.write_manifest(ref, b'{"exact":  "bytes"}')
    assert path.read_bytes() == b'{"exact":  "bytes"}'
    assert [p.name for p in path.parent.iterdir()] == ["t"]


def test_unwritable_store_is_a_storage_error(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # root ignores permissions; a file where the directory should be fails for everyone.
        (tmp_path / "blobs").write_text("not a directory")
    else:
        tmp_path.chmod(0o500)
    with pytest.raises(StorageError, match="cannot create the models directory"):
        Store(tmp_path).prepare()


@pytest.mark.parametrize(
    ("code", "fix"),
    [
        (errno.EMFILE, "too many open files: pull with fewer streams (-j) or raise the limit (ulimit -n)"),
        (errno.ENFILE, "the system has too many open files: pull with fewer streams (-j)"),
    ],
)
def test_too_many_open_files_says_what_to_do(code: int, fix: str) -> None:
    error = storage_error("open /m/blobs/x-partial", OSError(code, os.strerror(code)))
    assert str(error) == f"cannot open /m/blobs/x-partial: {fix}"


def blob_layer(data: bytes) -> Layer:
    return Layer(TENSOR_MEDIA_TYPE, "sha256:" + hashlib.sha256(data).hexdigest(), len(data))


@pytest.mark.anyio
async def test_a_claim_excludes_a_second_claimer_until_released_and_is_the_partial_file(tmp_path: Path) -> None:
    import asyncio

    store = Store(tmp_path)
    store.prepare()
    layer = blob_layer(b"some bytes")
    order: list[str] = []

    async def second() -> None:
        async with store.claim_blob(layer) as claim:
            assert claim is not None
            order.append("second")

    async with store.claim_blob(layer) as claim:
        assert claim is not None
        os.pwrite(claim.fd, b"some", 0)
        waiter = asyncio.create_task(second())
        await asyncio.sleep(0.1)
        order.append("first done")
        # The lock is the file that is written: no other file is made for it.
        assert os.listdir(store.blobs_dir) == [store.partial_path(layer.digest).name]
        assert ".ollama-pull" not in os.listdir(tmp_path)
    await waiter
    assert order == ["first done", "second"]


@pytest.mark.anyio
@pytest.mark.parametrize("outcome", ["named", "removed", "kept"])
async def test_a_claim_that_waited_follows_what_its_holder_did_with_the_file(tmp_path: Path, outcome: str) -> None:
    import asyncio

    store = Store(tmp_path)
    store.prepare()
    data = b"a blob"
    layer = blob_layer(data)
    partial = store.partial_path(layer.digest)
    waited: list[str] = []
    got: list[bytes | None] = []

    async def claim() -> None:
        async with store.claim_blob(layer, on_wait=lambda: waited.append("waiting")) as claim:
            got.append(None if claim is None else os.pread(claim.fd, 100, 0))
            assert claim is None or os.path.samestat(os.fstat(claim.fd), os.stat(partial))

    async with store.claim_blob(layer) as held:
        assert held is not None
        claiming = asyncio.create_task(claim())
        while not waited:
            await asyncio.sleep(0.01)
        os.pwrite(held.fd, data, 0)
        # What a holder does before it lets go: the verified file takes the blob's name, or is removed, or is
        # kept for a resume.
        if outcome == "named":
            os.replace(partial, store.blob_path(layer.digest))
        elif outcome == "removed":
            partial.unlink()
    await claiming
    assert waited == ["waiting"]
    if outcome == "named":
        # The file it waited on is the blob now: the waiter never gets to write into it, and leaves no file.
        assert got == [None]
        assert [path.name for path in store.blobs_dir.iterdir()] == [store.blob_path(layer.digest).name]
    elif outcome == "removed":
        # A new, empty partial file, linked under the name.
        assert got == [b""]
        assert list(store.blobs_dir.iterdir()) == []
    else:
        assert got == [data]
        assert partial.read_bytes() == data


@pytest.mark.anyio
async def test_a_claim_says_whether_the_blob_is_there_and_leaves_no_empty_partial_file(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.prepare()
    data = b"a blob"
    layer = blob_layer(data)
    async with store.claim_blob(layer) as claim:
        assert claim is not None
    # Nothing was written: nothing is left.
    assert list(store.blobs_dir.iterdir()) == []
    store.blob_path(layer.digest).write_bytes(data)
    store.parts_state_path(layer.digest).write_text("{}")
    async with store.claim_blob(layer) as claim:
        # There: no partial file, and none of its progress either.
        assert claim is None
        assert [path.name for path in store.blobs_dir.iterdir()] == [store.blob_path(layer.digest).name]


@pytest.mark.anyio
async def test_a_claim_cancelled_while_its_file_opens_leaks_no_descriptor_and_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio
    import threading

    from ollama_pull import store as store_module

    opened: list[int] = []
    release = threading.Event()
    real_claim = store_module._claim

    def slow_claim(store: Store, layer: Layer, path: Path, fd: int | None) -> tuple[int, bool | None, bool]:
        release.wait(5)
        got = real_claim(store, layer, path, fd)
        opened.append(got[0])
        return got

    monkeypatch.setattr(store_module, "_claim", slow_claim)
    store = Store(tmp_path)
    store.prepare()
    layer = blob_layer(b"d")

    async def hold() -> None:
        async with store.claim_blob(layer):
            pass

    task = asyncio.create_task(hold())
    await asyncio.sleep(0.05)
    task.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert opened, "the thread never opened the partial file"
    partial = str(store.partial_path(layer.digest))
    held = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            held.append(os.readlink(f"/proc/self/fd/{fd}"))
    assert partial not in held
    # Nor the empty file the thread made: it was never written.
    assert os.listdir(store.blobs_dir) == []


@pytest.mark.anyio
async def test_a_claim_says_whether_it_made_the_partial_file(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.prepare()
    layer = blob_layer(b"a blob")
    async with store.claim_blob(layer) as claim:
        assert claim is not None
        assert claim.fresh
        os.pwrite(claim.fd, b"a b", 0)
    # Kept for a resume, or left by a killed run: it may have chunk progress beside it.
    async with store.claim_blob(layer) as claim:
        assert claim is not None
        assert not claim.fresh


@pytest.mark.anyio
async def test_chunk_progress_goes_before_its_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What makes a fresh claim's word good: progress never outlives its file, even if killed between the two.
    store = Store(tmp_path)
    store.prepare()
    data = b"a blob"
    layer = blob_layer(data)
    removed: list[str] = []
    unlink = Path.unlink

    def recording(path: Path, missing_ok: bool = False) -> None:
        removed.append(path.name)
        unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", recording)
    order = [store.parts_state_path(layer.digest).name, store.partial_path(layer.digest).name]
    for there in (False, True):
        # A killed chunked run's leftovers: an empty partial file and its progress; the blob itself, or not.
        store.partial_path(layer.digest).write_bytes(b"")
        store.parts_state_path(layer.digest).write_text("{}")
        if there:
            store.blob_path(layer.digest).write_bytes(data)
        removed.clear()
        async with store.claim_blob(layer) as claim:
            assert (claim is None) is there
        assert removed == order
        assert [path.name for path in store.blobs_dir.iterdir()] == ([store.blob_path(layer.digest).name] * there)
