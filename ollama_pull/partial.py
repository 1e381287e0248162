"""The partial files of blobs in flight: the bytes of a blob before they are verified and get its name.

A blob comes either in one stream into a :class:`BlobFile`, a contiguous prefix hashed as it is written, or, when
it is large, in chunks over several connections at once into a :class:`PartedBlob`, one sparse file. Both are what
:class:`PartialFile` says: checked with ``mismatch()``, started over with ``restart()``, renamed into place with
``commit()`` and otherwise closed, kept for a resume or removed. Where they live is the store's business
(:mod:`ollama_pull.store`).

A parted blob is cut into chunks that the engine's streams take in order, so the bytes land roughly front to back
and the SHA-256 of the contiguous prefix follows close behind them in a worker thread: when the last chunk lands
only the last few chunks are left to hash. Progress is saved beside the partial file as JSON
(``sha256-<hex>-partial.json``) every time another slice of the blob has landed, so a pull killed half way resumes
within a slice of where it stood. The saved state is a hint, not a promise: the whole blob is hashed before it gets
its name, so state that claims bytes the disk lost (after a power cut, say) costs a download, never a wrong blob.

A partial file without state is what a single-stream download leaves, a contiguous prefix, and is resumed as one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .errors import StorageError
from .manifest import Layer
from .store import READ_SIZE, BlobClaim, Store, hash_file, storage_error, storage_errors

# Save progress each time this fraction of the blob has landed: what a kill -9 can cost, at most.
_SAVE_FRACTION = 0.01
# Data only, without the metadata fsync adds; macOS has no fdatasync.
_datasync = getattr(os, "fdatasync", os.fsync)
# Linux takes at most 1024 buffers in one writev; more than this many small pieces are joined first.
_IOV_MAX = 512

# Bytes to write: what the event loop received, or views of a drain's buffer (ollama_pull.drain).
Pieces = Sequence[bytes | memoryview]


class PartialFile(Protocol):
    """What the engine does with the partial file of a blob, whichever kind it is."""

    layer: Layer

    def mismatch(self) -> str | None:
        """Why the bytes are not the blob, or None when they are."""
        ...

    def restart(self) -> None:
        """Forget every byte written."""
        ...

    def commit(self) -> None:
        """Make the verified bytes durable, then give them the blob's name."""
        ...

    def close(self, *, keep: bool) -> None:
        """Close the file; keep it for a later resume, or remove it."""
        ...


class BlobFile:
    """The partial file of one blob, hashed as it is written and renamed into place only once verified.

    The file is the one the store's claim holds open and locked (:meth:`ollama_pull.store.Store.claim_blob`):
    written through the claim's descriptor, and renamed into place (then let go of at once) or removed before
    the claim lets go of it. A blob that starts from nothing is emptied when the first bytes are written, in the
    worker thread that writes them: on thousands of small blobs, a hand-off to a thread just for that cost about
    as much event-loop time as the download itself. A blob to resume reads back the prefix it holds at once.
    """

    def __init__(self, store: Store, layer: Layer, claim: BlobClaim, *, resume: bool) -> None:
        self.layer = layer
        self.path = claim.path
        self.final_path = store.blob_path(layer.digest)
        self._store = store
        self._claim = claim
        self._fd = claim.fd
        self._hash = hashlib.sha256()
        self.offset = 0
        self.committed = False
        self._closed = False
        # Held while a worker thread writes, so that the file is never truncated or given up under it.
        self._lock = threading.Lock()
        self._started = False
        if resume:
            self._start(resume=True)
            self._rehash_prefix()

    def _start(self, *, resume: bool) -> None:
        if not self._claim.fresh:
            with storage_errors(f"open {self.path}"):
                # Chunk progress describes a sparse file; what this writes is a contiguous prefix.
                self._store.parts_state_path(self.layer.digest).unlink(missing_ok=True)
                if not resume:
                    os.ftruncate(self._fd, 0)
        self._started = True

    def _rehash_prefix(self) -> None:
        with open(self._fd, "rb", closefd=False) as handle:
            handle.seek(0)
            length = hash_file(handle, self._hash)
        if length > self.layer.size:
            self.restart()
        else:
            self.offset = length

    def restart(self) -> None:
        """Forget what was written: the server could not resume, or the bytes were wrong."""
        with self._lock, storage_errors(f"truncate {self.path}"):
            if not self._closed:
                os.ftruncate(self._fd, 0)
        self._hash = hashlib.sha256()
        self.offset = 0

    def write_all(self, pieces: Pieces) -> None:
        """Write and hash the next bytes. Runs in a worker thread; hashlib and writes release the GIL."""
        with self._lock:
            if self._closed:
                return
            if not self._started:
                self._start(resume=False)
            with storage_errors(f"write {self.path}"):
                write_pieces(self._fd, pieces, self.offset)
            for piece in pieces:
                self._hash.update(piece)
                self.offset += len(piece)

    def flush(self) -> None:
        """Write the bytes written so far back to disk, while the download goes on (see PartedBlob.flush)."""
        with self._lock:
            if self._closed:
                return
            fd = os.dup(self._fd)
        write_back(fd, self.path)

    def mismatch(self) -> str | None:
        """Why the bytes written are not the blob, or None when they are."""
        if self.offset != self.layer.size:
            return f"got {self.offset} bytes, expected {self.layer.size}"
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self.layer.digest:
            return f"digest mismatch: got {actual}"
        return None

    def commit(self) -> None:
        """Make the verified bytes durable, then give them the blob's name (still under the claim's lock, so
        that nobody who waited for it writes into the file after it has its name)."""
        failure = BlobFile.commit_all([self], fsync_each)[0]
        if failure is not None:
            raise failure

    @staticmethod
    def commit_all(blobs: Sequence[BlobFile], sync: Callable[[list[int]], None]) -> list[StorageError | None]:
        """Commit verified blobs of one store together: one ``sync`` of all their descriptors, then each gets its
        name (a group commit: :mod:`ollama_pull.commits`). Says, for each blob, what stopped it or None; a blob
        given up meanwhile is left alone. Every blob's lock is held throughout, so none is truncated, removed
        or given up between its sync and its name."""
        with contextlib.ExitStack() as held:
            for blob in blobs:
                held.enter_context(blob._lock)
            outcomes: list[StorageError | None] = [None] * len(blobs)
            live: list[int] = []
            for index, blob in enumerate(blobs):
                if blob._closed:
                    continue
                try:
                    if not blob._started:
                        # An empty blob has had no bytes to empty its file for.
                        blob._start(resume=False)
                except StorageError as exc:
                    outcomes[index] = exc
                else:
                    live.append(index)
            try:
                sync([blobs[index]._fd for index in live])
            except OSError as exc:
                for index in live:
                    outcomes[index] = storage_error(f"finish {blobs[index].final_path}", exc)
            else:
                for index in live:
                    outcomes[index] = blobs[index]._name()
            return outcomes

    def _name(self) -> StorageError | None:
        try:
            with storage_errors(f"finish {self.final_path}"):
                os.replace(self.path, self.final_path)
        except StorageError as exc:
            return exc
        self.committed = True
        self._closed = True
        # Named: nobody who waited for the lock can take this file for the partial one any more.
        self._claim.release()
        return None

    def close(self, *, keep: bool) -> None:
        """Give up the file: keep it for a later resume, or remove it."""
        with self._lock:
            self._closed = True
        if not keep and not self.committed:
            self.path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Chunk:
    """The bytes ``[start, end)`` of a blob, fetched by one ranged request (and its retries)."""

    index: int
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


def plan_chunks(size: int, chunk_size: int) -> tuple[Chunk, ...]:
    """Cut ``size`` bytes into chunks of ``chunk_size``, the last one shorter."""
    starts = range(0, size, chunk_size)
    return tuple(Chunk(index, start, min(start + chunk_size, size)) for index, start in enumerate(starts))


class PartedBlob:
    """The sparse partial file of a blob downloaded in chunks, with its saved progress and its prefix hash."""

    def __init__(self, store: Store, layer: Layer, claim: BlobClaim, *, chunk_size: int) -> None:
        self.layer = layer
        self.path = claim.path
        self.state_path = store.parts_state_path(layer.digest)
        self.final_path = store.blob_path(layer.digest)
        self.chunks = plan_chunks(layer.size, chunk_size)
        self._chunk_size = chunk_size
        # Bytes landed at the front of each chunk; only ever grows, except in restart().
        self.done = [0] * len(self.chunks)
        self.received = 0
        self.hashed = 0
        self._hash = hashlib.sha256()
        self._save_every = max(1, int(layer.size * _SAVE_FRACTION))
        self._saved = 0
        # Held by the writing and hashing threads while they use the descriptor, so that once the file is given
        # up (and the claim that owns the descriptor closes it) no thread writes through a reused number.
        self._fd_lock = threading.Lock()
        self._state_lock = threading.Lock()
        # The claim's (:meth:`ollama_pull.store.Store.claim_blob`); -1 once given up.
        self._claim = claim
        self._fd = claim.fd
        self._load()

    def _load(self) -> None:
        done = self._read_state()
        if done is None:
            with storage_errors(f"read {self.path}"):
                prefix = os.fstat(self._fd).st_size
            if prefix > self.layer.size:
                prefix = 0
            done = [min(max(prefix - chunk.start, 0), chunk.size) for chunk in self.chunks]
        self.done = done
        self.received = sum(done)
        # Written before any byte goes into the file: a sparse file must never pass for a contiguous prefix.
        self.save()

    def _read_state(self) -> list[int] | None:
        """The saved progress, or None when there is none we can trust to describe this blob."""
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(state, dict) or state.get("size") != self.layer.size:
            return None
        if state.get("chunk_size") != self._chunk_size:
            return None
        done = state.get("done")
        if not isinstance(done, list) or len(done) != len(self.chunks):
            return None
        for value, chunk in zip(done, self.chunks, strict=True):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= chunk.size:
                return None
        return done

    def save(self) -> None:
        """Write the progress beside the file (no fsync: it is a hint, and the hash judges the bytes)."""
        with self._state_lock:
            self._save()

    def _save(self) -> None:
        state = {"size": self.layer.size, "chunk_size": self._chunk_size, "done": self.done}
        temp = self.state_path.with_name(self.state_path.name + ".tmp")
        with storage_errors(f"write {self.state_path}"):
            temp.write_text(json.dumps(state, separators=(",", ":")), encoding="utf-8")
            os.replace(temp, self.state_path)
        self._saved = self.received

    def missing(self) -> list[Chunk]:
        """The chunks not yet complete, front to back."""
        return [chunk for chunk in self.chunks if self.done[chunk.index] < chunk.size]

    def position(self, chunk: Chunk) -> int:
        """Where the next byte of ``chunk`` goes."""
        return chunk.start + self.done[chunk.index]

    def write(self, chunk: Chunk, pieces: Pieces) -> None:
        """Write the next bytes of ``chunk``. Runs in a worker thread, one call per chunk at a time."""
        position = self.position(chunk)
        with self._fd_lock:
            if self._fd < 0:
                return
            with storage_errors(f"write {self.path}"):
                written = write_pieces(self._fd, pieces, position)
        # Several chunks' writes finish at once in different threads.
        with self._state_lock:
            self.done[chunk.index] += written
            self.received += written
            if self.received - self._saved >= self._save_every:
                self._save()

    def frontier(self) -> int:
        """The end of the contiguous run of landed bytes from the start of the blob."""
        for chunk, done in zip(self.chunks, self.done, strict=True):
            if done < chunk.size:
                return chunk.start + done
        return self.layer.size

    def hash_landed(self) -> None:
        """Hash the landed prefix not yet hashed. Runs in a worker thread; hashlib and reads release the GIL."""
        buffer = bytearray(READ_SIZE)
        end = self.frontier()
        while self.hashed < end:
            wanted = min(READ_SIZE, end - self.hashed)
            with self._fd_lock:
                if self._fd < 0:
                    return
                with storage_errors(f"read {self.path}"):
                    got = os.preadv(self._fd, [memoryview(buffer)[:wanted]], self.hashed)
            if got <= 0:
                # Only a file shortened behind our back does this; the final check then fails and restarts.
                return
            self._hash.update(memoryview(buffer)[:got])
            self.hashed += got

    def flush(self) -> None:
        """Write the landed bytes back to disk now, in a worker thread while the download goes on, so that the
        fsync before the rename has only the last few to wait for. Through a duplicate descriptor: closed
        meanwhile, ours could be reused for another file. A write-back error here fails the blob, as it would
        at the fsync (which, sharing the open file, might not be told of it again)."""
        with self._fd_lock:
            if self._fd < 0:
                return
            fd = os.dup(self._fd)
        write_back(fd, self.path)

    def mismatch(self) -> str | None:
        """Once every byte is hashed: why they are not the blob, or None when they are."""
        if self.hashed != self.layer.size:
            return f"hashed {self.hashed} bytes, expected {self.layer.size}"
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self.layer.digest:
            return f"digest mismatch: got {actual}"
        return None

    def restart(self) -> None:
        """Forget every byte: the whole blob did not verify, and nothing says which chunk was wrong."""
        with storage_errors(f"truncate {self.path}"):
            os.ftruncate(self._fd, 0)
        self.done = [0] * len(self.chunks)
        self.received = 0
        self.hashed = 0
        self._hash = hashlib.sha256()
        self.save()

    def commit(self) -> None:
        """Make the verified bytes durable, then give them the blob's name, under the claim's lock still."""
        with storage_errors(f"finish {self.final_path}"):
            os.fsync(self._fd)
            # State first: killed in between, the full file left is read as a prefix of every byte and re-hashed.
            self.state_path.unlink(missing_ok=True)
            os.replace(self.path, self.final_path)
            self._give_up()
            # Named: let go of it here, as a blob in one stream does (see BlobFile.commit).
            self._claim.release()

    def empty(self) -> None:
        """Give the file up emptied, to be written in one stream instead: what one stream writes is a contiguous
        prefix, which neither the chunks landed so far nor their progress describe."""
        with storage_errors(f"truncate {self.path}"):
            os.ftruncate(self._fd, 0)
            self.state_path.unlink(missing_ok=True)
        self._give_up()

    def close(self, *, keep: bool) -> None:
        """Give the file up; keep it and its progress for a later resume, or remove both."""
        self._give_up()
        if keep:
            # On a full disk the last saved state stands: older, so it only under-claims.
            with contextlib.suppress(StorageError):
                self.save()
        else:
            # Progress first, as the store keeps it: never left without its file.
            self.state_path.unlink(missing_ok=True)
            self.path.unlink(missing_ok=True)

    def _give_up(self) -> None:
        with self._fd_lock:
            self._fd = -1


if TYPE_CHECKING:
    # Both kinds keep to the interface: mypy checks it here.
    _KINDS: tuple[type[PartialFile], ...] = (BlobFile, PartedBlob)


def write_back(fd: int, path: Path) -> None:
    """Write a file's data back to disk through ``fd``, a duplicate descriptor that this closes."""
    try:
        with storage_errors(f"write {path}"):
            _datasync(fd)
    finally:
        os.close(fd)


def fsync_each(fds: list[int]) -> None:
    """Make each file's written bytes durable, one at a time."""
    for fd in fds:
        os.fsync(fd)


def write_pieces(fd: int, pieces: Pieces, position: int | None = None) -> int:
    """Write every byte of ``pieces`` in one system call where the kernel allows (at ``position``, if given);
    returns how many bytes that was."""
    if len(pieces) > _IOV_MAX:
        pieces = [b"".join(pieces)]
    total = sum(len(piece) for piece in pieces)
    written = os.writev(fd, pieces) if position is None else os.pwritev(fd, pieces, position)
    if written < total:
        # Cut short (by a signal, say): the rest piece by piece.
        rest = memoryview(b"".join(pieces))[written:]
        while rest:
            step = os.write(fd, rest) if position is None else os.pwrite(fd, rest, position + written)
            rest = rest[step:]
            written += step
    return written
