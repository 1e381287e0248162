"""Group commit: blobs that verify at about the same time are made durable by one sync, then named.

Every blob is on disk before it gets its name. One ``fsync`` per blob made that the largest single cost of a
model of thousands of small blobs: each one waits for its own write-back and its own flush of the disk's cache,
a round trip to the host on a virtual machine (4,096 blobs of 64 KiB took x0.68 the time with the fsync stubbed
out; bench/PROFILE.md). ``syncfs`` writes back every file of the filesystem and flushes once. So one batch syncs
in a worker thread while the blobs that verify meanwhile queue for the next: the more blobs finish together, the
fewer syncs each, and a blob that finishes alone is fsynced alone, with no wait added.

syncfs has reported write-back errors only since Linux 5.8: before, it returned 0 whatever happened to the bytes.
On older kernels, off Linux, and on filesystems where syncfs may not make the bytes as durable as fsync does, the
blobs of a batch are fsynced one by one (still one hand-off per batch).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import re
import sys
from collections.abc import Callable

from .errors import StorageError
from .partial import BlobFile, fsync_each
from .worker import in_thread

_Outcomes = list[StorageError | None]
# The first kernel whose syncfs says when a write-back failed.
_SYNCFS_REPORTS = (5, 8)
# Filesystems whose syncfs writes back and flushes what an fsync of each file would: local ones, and tmpfs, which
# has nothing to flush. Over NFS, SMB, 9p or FUSE (before Linux 5.15), syncfs may hand the pages to the client or
# the daemon without the commit that an fsync asks of the server, and overlayfs's depends on the kernel.
_SYNCFS_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "bcachefs", "jfs", "tmpfs"})
# A batch whose blobs are this large on average is fsynced blob by blob, still in one hand-off. syncfs waits for
# the write-back of every dirty page of the filesystem, the other streams' bytes too, and their writes wait
# behind it: on 256 blobs of 0.5-3.5 MiB, a syncfs for every batch took the peak memory to 73-98 MiB (median 84)
# against 71-80 MiB (median 76) with this rule, and was no faster (1.27 s against 1.25 s; 10 alternated runs).
# On blobs of 64 KiB, where an fsync is mostly its flush of the disk's cache, syncfs is the whole gain.
_TOGETHER_BELOW = 1024 * 1024
# What a sandbox (a seccomp filter, gVisor) answers for a system call it does not allow or have.
_REFUSED = frozenset({errno.ENOSYS, errno.EPERM})


@functools.cache
def _syncfs() -> Callable[[int], None] | None:
    """syncfs(2) from the C library, or None where it cannot be trusted to report a failed write-back."""
    release = re.match(r"(\d+)\.(\d+)", os.uname().release) if sys.platform == "linux" else None
    if release is None or (int(release[1]), int(release[2])) < _SYNCFS_REPORTS:
        return None
    # Here, not at the top: ctypes is 5 ms of start-up that only a pull of many small blobs gets anything for.
    import ctypes

    function = getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None)
    if function is None:
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int

    def syncfs(fd: int) -> None:
        if function(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    return syncfs


@functools.cache
def _filesystem(device: int, mounts: str = "/proc/self/mountinfo") -> str | None:
    """The type of the filesystem mounted from ``device`` (a file's ``st_dev``), as the kernel lists its mounts."""
    wanted = f"{os.major(device)}:{os.minor(device)}"
    try:
        with open(mounts, encoding="utf-8", errors="replace") as listing:
            for line in listing:
                # ID, parent ID, major:minor, root, mount point, options, optional fields, "-", type, source, ...
                fields = line.split()
                if len(fields) > 7 and fields[2] == wanted and "-" in fields[6:-1]:
                    return fields[fields.index("-", 6) + 1]
    except OSError:
        return None
    return None


def sync_files(fds: list[int]) -> None:
    """Make the written bytes of every file in ``fds``, all on one filesystem, durable."""
    syncfs = _syncfs() if len(fds) > 1 else None
    if syncfs is not None and _filesystem(os.fstat(fds[0]).st_dev) in _SYNCFS_FILESYSTEMS:
        try:
            syncfs(fds[0])
        except OSError as exc:
            if exc.errno not in _REFUSED:
                raise
        else:
            return
    fsync_each(fds)


class GroupCommit:
    """Commits the blobs of one store, a batch at a time, on the running event loop.

    :meth:`commit` returns once the blob is durable and named. A batch is whatever queued while the one before it
    ran; one runs at a time, in a worker thread, so the blobs' names come in batches no later than their syncs."""

    def __init__(self, sync: Callable[[list[int]], None] = sync_files) -> None:
        self._sync = sync
        self._queued: list[tuple[BlobFile, asyncio.Future[None]]] = []
        self._running: asyncio.Future[_Outcomes] | None = None

    async def commit(self, blob: BlobFile) -> None:
        """Make the verified ``blob`` durable and give it its name, or raise the :class:`StorageError` that
        stopped it. Cancelled before its batch began, the blob is left as it is, for its owner to close; after,
        the batch names it all the same."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queued.append((blob, done))
        if self._running is None:
            self._next()
        await done

    async def wait(self) -> None:
        """Return once no batch is running: a pull that ends, even cancelled, leaves no commit behind it."""
        while self._running is not None:
            await asyncio.wait({self._running})

    def _next(self) -> None:
        batch = [(blob, done) for blob, done in self._queued if not done.cancelled()]
        self._queued = []
        if not batch:
            return
        blobs = [blob for blob, _ in batch]
        small = sum(blob.layer.size for blob in blobs) < _TOGETHER_BELOW * len(blobs)
        running = self._running = in_thread(BlobFile.commit_all, blobs, self._sync if small else fsync_each)
        running.add_done_callback(lambda _: self._settle(batch, running))

    def _settle(self, batch: list[tuple[BlobFile, asyncio.Future[None]]], running: asyncio.Future[_Outcomes]) -> None:
        self._running = None
        error = running.exception()
        outcomes: list[BaseException | None] = [error] * len(batch) if error is not None else [*running.result()]
        for (_blob, done), failure in zip(batch, outcomes, strict=True):
            if done.cancelled():
                continue
            if failure is None:
                done.set_result(None)
            else:
                done.set_exception(failure)
        if self._queued:
            self._next()
