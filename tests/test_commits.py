"""Group commit: blobs that verify while a sync runs are made durable together by the next, then named."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import respx

from ollama_pull import commits
from ollama_pull.commits import GroupCommit, sync_files
from ollama_pull.errors import StorageError
from ollama_pull.manifest import Layer
from ollama_pull.partial import BlobFile
from ollama_pull.store import BlobClaim, Store

from .fakes import BASE, FAST, ChunkStream, assert_store_holds, download, make_model

pytestmark = pytest.mark.anyio


def layer_for(data: bytes) -> Layer:
    return Layer("application/vnd.ollama.image.tensor", "sha256:" + hashlib.sha256(data).hexdigest(), len(data))


@pytest.fixture
def written(tmp_path: Path) -> Iterator[Callable[[bytes], BlobFile]]:
    """A verified blob, written into its claimed partial file and not yet committed."""
    store = Store(tmp_path)
    store.prepare()
    claims: list[BlobClaim] = []

    def write(data: bytes) -> BlobFile:
        layer = layer_for(data)
        path = store.partial_path(layer.digest)
        claims.append(BlobClaim(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), path, fresh=True))
        blob = store.open_blob(layer, claims[-1], resume=False)
        blob.write_all([data])
        assert blob.mismatch() is None
        return blob

    yield write
    for claim in claims:
        claim.release()


class Syncs:
    """A sync that records the descriptors of each call; the first call waits until told to go on."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.entered = threading.Event()
        self.go_on = threading.Event()
        self.failure: OSError | None = None

    @staticmethod
    def fail(code: int) -> None:
        raise OSError(code, os.strerror(code))

    def __call__(self, fds: list[int]) -> None:
        self.calls.append(list(fds))
        if len(self.calls) == 1:
            self.entered.set()
            assert self.go_on.wait(10)
        if self.failure is not None:
            raise self.failure


async def until_entered(syncs: Syncs) -> None:
    await asyncio.get_running_loop().run_in_executor(None, syncs.entered.wait, 10)


async def test_blobs_that_verify_while_a_batch_syncs_are_synced_together_by_the_next(
    written: Callable[[bytes], BlobFile],
) -> None:
    syncs = Syncs()
    group = GroupCommit(syncs)
    first = written(b"the first blob")
    rest = [written(b"blob %d" % number) for number in range(5)]
    committing = asyncio.ensure_future(group.commit(first))
    await until_entered(syncs)
    others = [asyncio.ensure_future(group.commit(blob)) for blob in rest]
    await asyncio.sleep(0)
    assert not first.committed
    assert not first.final_path.exists()
    syncs.go_on.set()
    await asyncio.gather(committing, *others)
    # One sync for the first, then one for every blob that queued meanwhile.
    assert [len(call) for call in syncs.calls] == [1, 5]
    for blob in [first, *rest]:
        assert blob.committed
        assert blob.final_path.exists()
        assert not blob.path.exists()


async def test_a_batch_of_large_blobs_is_fsynced_blob_by_blob(
    written: Callable[[bytes], BlobFile], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A syncfs would wait for every dirty page of the filesystem, the other streams' too.
    fsynced: list[int] = []
    monkeypatch.setattr(os, "fsync", fsynced.append)
    syncs = Syncs()
    syncs.go_on.set()
    group = GroupCommit(syncs)
    small = [written(b"blob %d" % number) for number in range(2)]
    await asyncio.gather(*(group.commit(blob) for blob in small))
    assert fsynced == []
    monkeypatch.setattr(commits, "_TOGETHER_BELOW", len(b"blob 0"))
    large = [written(b"large blob %d" % number) for number in range(2)]
    await asyncio.gather(*(group.commit(blob) for blob in large))
    assert sorted(fsynced) == sorted(blob._claim.fd for blob in large)
    assert sorted(fd for call in syncs.calls for fd in call) == sorted(blob._claim.fd for blob in small)
    assert all(blob.committed for blob in [*small, *large])


async def test_a_failed_sync_fails_every_blob_of_its_batch_and_names_none(
    written: Callable[[bytes], BlobFile],
) -> None:
    syncs = Syncs()
    syncs.failure = OSError(errno.EIO, os.strerror(errno.EIO))
    syncs.go_on.set()
    group = GroupCommit(syncs)
    blobs = [written(b"blob %d" % number) for number in range(3)]
    outcomes = await asyncio.gather(*(group.commit(blob) for blob in blobs), return_exceptions=True)
    for blob, outcome in zip(blobs, outcomes, strict=True):
        assert isinstance(outcome, StorageError)
        assert str(outcome) == f"cannot finish {blob.final_path}: Input/output error"
        assert not blob.committed
        assert not blob.final_path.exists()
        # Its owner decides what becomes of the partial file.
        assert blob.path.exists()
    syncs.failure = None
    await group.commit(blobs[0])
    assert blobs[0].committed


async def test_a_commit_cancelled_before_its_batch_is_never_synced_or_named(
    written: Callable[[bytes], BlobFile],
) -> None:
    syncs = Syncs()
    group = GroupCommit(syncs)
    first, queued = written(b"the first blob"), written(b"a queued blob")
    committing = asyncio.ensure_future(group.commit(first))
    await until_entered(syncs)
    cancelled = asyncio.ensure_future(group.commit(queued))
    await asyncio.sleep(0)
    cancelled.cancel()
    # Cancelled after its batch began, a blob is named all the same: it is verified and synced.
    committing.cancel()
    syncs.go_on.set()
    await group.wait()
    assert syncs.calls == [[first._claim.fd]]
    assert first.committed
    assert first.final_path.exists()
    assert not queued.committed
    assert not queued.final_path.exists()
    assert queued.path.exists()
    for task in (committing, cancelled):
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_wait_returns_only_once_the_running_batch_has_ended(written: Callable[[bytes], BlobFile]) -> None:
    syncs = Syncs()
    group = GroupCommit(syncs)
    blob = written(b"a blob")
    committing = asyncio.ensure_future(group.commit(blob))
    await until_entered(syncs)
    waiting = asyncio.ensure_future(group.wait())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    syncs.go_on.set()
    await waiting
    assert blob.committed
    await committing


@pytest.fixture
def files(tmp_path: Path) -> Iterator[list[int]]:
    fds = [os.open(tmp_path / f"file-{number}", os.O_RDWR | os.O_CREAT, 0o644) for number in range(3)]
    yield fds
    for fd in fds:
        os.close(fd)


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every fsync and syncfs, recorded instead of made, on a filesystem that syncfs is trusted on."""
    calls: list[tuple[str, int]] = []
    monkeypatch.setattr(commits, "_syncfs", lambda: lambda fd: calls.append(("syncfs", fd)))
    monkeypatch.setattr(commits, "_filesystem", lambda _device: "ext4")
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(("fsync", fd)))
    return calls


def test_one_file_is_fsynced_and_several_take_one_syncfs(files: list[int], recorded: list[tuple[str, int]]) -> None:
    sync_files(files[:1])
    sync_files(files)
    assert recorded == [("fsync", files[0]), ("syncfs", files[0])]


@pytest.mark.parametrize("filesystem", ["nfs4", "fuse.sshfs", "overlay", "cifs", None])
def test_files_where_syncfs_may_not_reach_the_disk_are_fsynced_each(
    files: list[int], recorded: list[tuple[str, int]], monkeypatch: pytest.MonkeyPatch, filesystem: str | None
) -> None:
    monkeypatch.setattr(commits, "_filesystem", lambda _device: filesystem)
    sync_files(files)
    assert recorded == [("fsync", fd) for fd in files]


def test_where_syncfs_cannot_be_trusted_every_file_is_fsynced(
    files: list[int], recorded: list[tuple[str, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(commits, "_syncfs", lambda: None)
    sync_files(files[:2])
    assert recorded == [("fsync", files[0]), ("fsync", files[1])]


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.EPERM])
def test_a_syncfs_a_sandbox_refuses_falls_back_to_fsync(
    files: list[int], recorded: list[tuple[str, int]], monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    def refused(_fd: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(commits, "_syncfs", lambda: refused)
    sync_files(files)
    assert recorded == [("fsync", fd) for fd in files]
    # Any other failure is the bytes' own, and fails them.
    monkeypatch.setattr(commits, "_syncfs", lambda: lambda _fd: Syncs.fail(errno.EIO))
    with pytest.raises(OSError, match="Input/output error"):
        sync_files(files)


def test_the_filesystem_of_a_device_is_read_from_the_mount_table(tmp_path: Path) -> None:
    table = tmp_path / "mountinfo"
    table.write_text(
        "22 27 0:21 / /proc rw,relatime - proc proc rw\n"
        "27 1 254:0 / / rw,relatime shared:1 master:2 - ext4 /dev/vda rw,discard\n"
        "40 27 254:0 /srv /mnt/bind rw,relatime - ext4 /dev/vda rw\n"
        "41 27 0:52 / /mnt/with\\040space rw - fuse.sshfs host:/ rw\n"
    )
    filesystem = commits._filesystem.__wrapped__
    assert filesystem(os.makedev(254, 0), str(table)) == "ext4"
    assert filesystem(os.makedev(0, 52), str(table)) == "fuse.sshfs"
    assert filesystem(os.makedev(8, 1), str(table)) is None
    assert filesystem(os.makedev(254, 0), str(tmp_path / "absent")) is None
    if sys.platform == "linux":
        # The kernel's own table: /proc is always in it.
        assert commits._filesystem(os.stat("/proc").st_dev) == "proc"


@pytest.mark.parametrize(("release", "trusted"), [("5.4.0-150-generic", False), ("5.8.0", True), ("6.18.44-fc", True)])
def test_syncfs_is_trusted_only_on_kernels_that_report_write_back_errors(
    monkeypatch: pytest.MonkeyPatch, release: str, trusted: bool
) -> None:
    if sys.platform != "linux":
        pytest.skip("syncfs is Linux's")
    monkeypatch.setattr(os, "uname", lambda: os.uname_result(("Linux", "host", release, "#1", "x86_64")))
    assert (commits._syncfs.__wrapped__() is not None) is trusted


def test_syncfs_makes_files_durable_and_reports_a_bad_descriptor(tmp_path: Path) -> None:
    syncfs = commits._syncfs()
    if syncfs is None:
        pytest.skip("no syncfs that reports a failed write-back here")
    fds = [os.open(tmp_path / name, os.O_RDWR | os.O_CREAT, 0o644) for name in ("a", "b")]
    try:
        for fd in fds:
            os.write(fd, b"bytes")
        sync_files(fds)
    finally:
        for fd in fds:
            os.close(fd)
    with pytest.raises(OSError, match="Bad file descriptor") as raised:
        syncfs(fds[0])
    assert raised.value.errno == errno.EBADF


async def test_a_pull_of_many_small_blobs_syncs_each_blob_before_its_name_in_fewer_syncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log: list[tuple[str, int | str]] = []
    first = threading.Event()

    def syncfs(fd: int) -> None:
        log.append(("syncfs", fd))

    def fsync(fd: int) -> None:
        log.append(("fsync", fd))
        if not first.is_set():
            # The first blob's sync is slow, as a real one is beside a download: the others verify meanwhile.
            first.set()
            threading.Event().wait(0.2)

    replace = os.replace

    def renaming(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
        log.append(("replace", os.fspath(target)))
        replace(source, target)

    monkeypatch.setattr(commits, "_syncfs", lambda: syncfs)
    monkeypatch.setattr(commits, "_filesystem", lambda _device: "ext4")
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", renaming)
    model = make_model(*[1000 + number for number in range(32)])
    store = Store(tmp_path / "models")
    with respx.mock(using="httpcore2") as router:
        for digest, data in model.blobs.items():
            router.get(f"{BASE}/blobs/{digest}").mock(return_value=httpx.Response(200, stream=ChunkStream(data)))
        await download(router, model, store, settings=FAST)
    assert_store_holds(store, model)
    blob_names = [entry for entry in log if entry[0] == "replace" and "sha256-" in str(entry[1])]
    assert len(blob_names) == len(model.blobs)
    # Durable before named: no blob's rename comes before the first sync.
    syncs = [index for index, entry in enumerate(log) if entry[0] != "replace"]
    assert syncs
    assert all(log.index(name) > syncs[0] for name in blob_names)
    assert len(syncs) <= len(model.blobs) // 2
