from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from ollama_pull.errors import StorageError
from ollama_pull.manifest import TENSOR_MEDIA_TYPE, Layer
from ollama_pull.reference import parse_reference
from ollama_pull.store import Store, default_models_dir


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


@pytest.mark.anyio
async def test_the_blob_lock_excludes_a_second_holder_until_released(tmp_path: Path) -> None:
    import asyncio

    store = Store(tmp_path)
    digest = "sha256:" + "c" * 64
    order: list[str] = []

    async def second() -> None:
        async with store.blob_lock(digest):
            order.append("second")

    async with store.blob_lock(digest):
        waiter = asyncio.create_task(second())
        await asyncio.sleep(0.1)
        order.append("first done")
    await waiter
    assert order == ["first done", "second"]
    # Outside blobs/, where Ollama expects nothing but blobs.
    assert not (tmp_path / "blobs").exists()
    assert (tmp_path / ".ollama-pull" / "locks" / ("sha256-" + "c" * 64 + ".lock")).exists()


@pytest.mark.anyio
async def test_a_blob_lock_cancelled_while_its_file_opens_leaks_no_descriptor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio
    import threading

    from ollama_pull import store as store_module

    opened: list[int] = []
    release = threading.Event()
    real_open = store_module._open_lock

    def slow_open(path: Path, operation: int, then: Callable[[], object]) -> tuple[int, tuple[object] | None]:
        release.wait(5)
        fd, answer = real_open(path, operation, then)
        opened.append(fd)
        return fd, answer

    monkeypatch.setattr(store_module, "_open_lock", slow_open)

    async def hold() -> None:
        async with Store(tmp_path).blob_lock("sha256:" + "d" * 64):
            pass

    task = asyncio.create_task(hold())
    await asyncio.sleep(0.05)
    task.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):
        await asyncio.sleep(0.01)
        if opened:
            break
    await asyncio.sleep(0.01)
    assert opened, "the thread never opened the lock file"
    lock = str(tmp_path / ".ollama-pull" / "locks" / ("sha256-" + "d" * 64 + ".lock"))
    held = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            held.append(os.readlink(f"/proc/self/fd/{fd}"))
    assert lock not in held


@pytest.mark.anyio
async def test_claiming_a_blob_says_whether_it_is_there_once_the_lock_is_held(tmp_path: Path) -> None:
    import asyncio

    store = Store(tmp_path)
    store.prepare()
    data = b"a blob"
    layer = Layer(TENSOR_MEDIA_TYPE, "sha256:" + hashlib.sha256(data).hexdigest(), len(data))
    async with store.claim_blob(layer) as present:
        assert not present
    store.blob_path(layer.digest).write_bytes(data)
    async with store.claim_blob(layer) as present:
        assert present
    store.blob_path(layer.digest).unlink()
    waited: list[str] = []

    async def claim() -> bool:
        async with store.claim_blob(layer, on_wait=lambda: waited.append("waiting")) as present:
            return present

    # Held elsewhere (another process, as far as flock knows): the answer is what is there once it is released.
    async with store.blob_lock(layer.digest):
        claiming = asyncio.create_task(claim())
        while not waited:
            await asyncio.sleep(0.01)
        store.blob_path(layer.digest).write_bytes(data)
    assert await claiming
    assert waited == ["waiting"]
