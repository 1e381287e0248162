"""The local Ollama model store: where blobs and manifests live, and how they get there safely.

Only a verified blob ever carries a ``sha256-<hex>`` name. Bytes in flight live in ``sha256-<hex>-partial``
(with ``sha256-<hex>-partial.json`` beside it when the blob comes in chunks), names Ollama never takes for a blob,
and a manifest appears only once all its blobs are in place. The files themselves, how bytes are written into
them and checked, are :mod:`ollama_pull.partial`'s; the store says where they live.

Processes that share a store take an exclusive ``flock`` on a blob's partial file while they write it (see
:meth:`Store.claim_blob`): the file that is written is the lock, so a blob costs the filesystem one new file, not
two (on 4,096 small blobs a lock file each was a tenth of the wall time, in ext4's inode allocation). The kernel
drops the lock when its process dies, even by kill -9, so a lock is never stale. A holder renames the file into
place, or removes it, before it lets go; whoever waited then finds that the name no longer leads to the file it
locked, and starts again. Chunk progress (the ``.json``) is written only once its partial file exists and removed
before it, so a partial file that a claim has just made has none beside it. The store's own lock (pulls against
prune) is ``.ollama-pull/locks/store.lock``, outside ``blobs/`` where Ollama expects only blobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import hashlib
import os
import shutil
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TypeVar

from .errors import InvalidReference, NotInStore, StorageError
from .manifest import DIGEST_PATTERN, Layer, Manifest, parse_manifest
from .reference import ModelReference, parse_reference
from .units import format_size
from .worker import in_thread

F = TypeVar("F")

if TYPE_CHECKING:
    from .partial import BlobFile

PARTIAL_SUFFIX = "-partial"
LOCKS_DIR = Path(".ollama-pull") / "locks"
# How much of a file is read at a time to hash it: big enough that the hash runs at full speed, small in memory.
READ_SIZE = 1024 * 1024
# How often a lock held by another process is tried again.
_POLL = 0.05
_EXCLUSIVE = fcntl.LOCK_EX | fcntl.LOCK_NB


def default_models_dir() -> Path:
    """``$OLLAMA_MODELS``, else ``~/.ollama/models``; read as Ollama reads it (envconfig.Var): surrounding white
    space, then surrounding quotes, stripped, so ``OLLAMA_MODELS="'/data/models'"`` from a unit file works."""
    configured = os.environ.get("OLLAMA_MODELS", "").strip().strip("\"'")
    return Path(configured).expanduser() if configured else Path.home() / ".ollama" / "models"


def open_store(models_dir: str | Path | None = None) -> Store:
    """The store at ``models_dir``, else the default one."""
    return Store(Path(models_dir) if models_dir is not None else default_models_dir())


@contextlib.contextmanager
def storage_errors(action: str) -> Iterator[None]:
    """Translate an ``OSError`` into a :class:`StorageError` that says what we were doing and what to check."""
    try:
        yield
    except OSError as exc:
        raise storage_error(action, exc) from exc


def storage_error(action: str, exc: OSError) -> StorageError:
    """The :class:`StorageError` for ``exc``, met while doing ``action``."""
    hint = {
        errno.ENOSPC: "the disk is full: free some space and run again",
        errno.EDQUOT: "the disk quota is exhausted: free some space and run again",
        errno.EACCES: "permission denied: check the owner of the models directory or pass --models-dir",
        errno.EPERM: "permission denied: check the owner of the models directory or pass --models-dir",
        errno.EROFS: "the filesystem is read-only: pass a writable --models-dir",
        errno.EMFILE: "too many open files: pull with fewer streams (-j) or raise the limit (ulimit -n)",
        errno.ENFILE: "the system has too many open files: pull with fewer streams (-j)",
    }.get(exc.errno or 0, exc.strerror or str(exc))
    error = StorageError(f"cannot {action}: {hint}")
    error.__cause__ = exc
    return error


class Store:
    """An Ollama models directory (the one ``$OLLAMA_MODELS`` names)."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().absolute()
        self.blobs_dir = self.root / "blobs"
        self._locks_dir = self.root / LOCKS_DIR

    def blob_path(self, digest: str) -> Path:
        return self.blobs_dir / _blob_name(digest)

    def partial_path(self, digest: str) -> Path:
        return self.blobs_dir / (_blob_name(digest) + PARTIAL_SUFFIX)

    def parts_state_path(self, digest: str) -> Path:
        """Where a blob downloaded in chunks keeps its progress, beside its partial file."""
        return self.blobs_dir / (_blob_name(digest) + PARTIAL_SUFFIX + ".json")

    def manifest_path(self, reference: ModelReference) -> Path:
        parts = (reference.host, reference.namespace, reference.model, reference.tag)
        return self._inside(self.root.joinpath("manifests", *parts))

    def has_blob(self, layer: Layer) -> bool:
        """A blob with the manifest's size is taken as present, as Ollama does: only verified bytes get its name."""
        path = self.blob_path(layer.digest)
        try:
            return path.stat().st_size == layer.size
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror}") from exc

    def free_bytes(self) -> int:
        """Free space on the filesystem that holds (or will hold) the store."""
        path = self.root
        while not path.exists() and path != path.parent:
            path = path.parent
        with storage_errors(f"read the free space of {path}"):
            return shutil.disk_usage(path).free

    def check_space(self, needed: int) -> None:
        """Stop before downloading when the bytes still needed cannot fit: a full disk mid-pull helps nobody."""
        free = self.free_bytes()
        if needed > free:
            raise StorageError(
                f"not enough free space in {self.root}: {format_size(needed)} needed, {format_size(free)} free; "
                "free some space or pass another --models-dir"
            )

    def load_manifest(self, reference: ModelReference) -> Manifest:
        """The stored manifest of a model; :class:`InvalidManifest` when it does not parse."""
        path = self.manifest_path(reference)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise NotInStore(reference.short, str(path)) from None
        except OSError as exc:
            raise StorageError(f"cannot read the manifest {path}: {exc.strerror}") from exc
        return parse_manifest(raw, model=reference.short)

    def check_blob(self, layer: Layer, *, stop: threading.Event | None = None) -> str | None:
        """Re-hash a stored blob: why it is bad, or None when its bytes are the digest's. Setting ``stop`` ends the
        hashing early (it runs in a thread, which a Ctrl-C cannot cancel), with the reason "stopped"."""
        path = self.blob_path(layer.digest)
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as handle:
                size = hash_file(handle, digest, stop=stop)
                if stop is not None and stop.is_set():
                    return "stopped"
        except FileNotFoundError:
            return "missing"
        except OSError as exc:
            return f"unreadable: {exc.strerror}"
        if size != layer.size:
            return f"{size} bytes, expected {layer.size}"
        if "sha256:" + digest.hexdigest() != layer.digest:
            return "bytes do not match the digest"
        return None

    def prepare(self) -> None:
        with storage_errors(f"create the models directory {self.blobs_dir}"):
            self.blobs_dir.mkdir(parents=True, exist_ok=True)

    def claim_blob(
        self, layer: Layer, *, on_wait: Callable[[], None] | None = None, wait: bool = True
    ) -> contextlib.AbstractAsyncContextManager[BlobClaim | None]:
        """The blob's partial file, created if need be, open and under an exclusive flock until the claim lets go
        of it, so that no other process sharing the store writes the blob meanwhile; None when the blob is in the
        store once the lock is held (another process downloaded it meanwhile).

        Whoever writes through the claim renames the file into place or removes it before letting go, at the
        latest when the context ends. ``on_wait`` is called once if another process holds the blob, before
        waiting for it. Opening, locking and the presence check share one worker thread's trip when the lock is
        free at once. Without ``wait``, a blob another process holds raises :class:`BlobHeld` instead."""
        return _claimed(self, layer, on_wait, wait)

    def store_lock(self, *, exclusive: bool) -> contextlib.AbstractAsyncContextManager[None]:
        """Pulls share this lock for their whole run; pruning takes it alone, so it never removes a blob that a
        running pull has finished but not yet named in a manifest."""
        return _flock(self._locks_dir / "store.lock", exclusive=exclusive)

    def manifests(self) -> Iterator[ModelReference]:
        """Every model in the store, as Ollama lays them out: ``manifests/<host>/<namespace>/<model>/<tag>``."""
        top = self.root / "manifests"
        if not top.is_dir():
            return
        for path in sorted(top.glob("*/*/*/*")):
            host, namespace, model, tag = path.relative_to(top).parts
            if not path.is_file():
                continue
            try:
                reference = parse_reference(f"{host}/{namespace}/{model}:{tag}")
            except InvalidReference:
                # A temp file of an interrupted manifest write, or something not Ollama's: not a model.
                continue
            yield reference

    def blob_files(self) -> Iterator[tuple[str, Path]]:
        """Every finished blob: ``(digest, path)``; partial files and foreign names are not blobs."""
        if not self.blobs_dir.is_dir():
            return
        for path in sorted(self.blobs_dir.iterdir()):
            digest = path.name.replace("-", ":", 1)
            if DIGEST_PATTERN.fullmatch(digest):
                yield digest, path

    def open_blob(self, layer: Layer, claim: BlobClaim, *, resume: bool) -> BlobFile:
        """The partial file of a blob that comes in one stream (:class:`ollama_pull.partial.BlobFile`), the one
        ``claim`` (from :meth:`claim_blob`) holds. To ``resume`` it reads back the prefix kept (in a worker
        thread, then); otherwise it touches the file only at the first write."""
        # Imported here: the partial files are built on the store's paths and helpers.
        from .partial import BlobFile

        return BlobFile(self, layer, claim, resume=resume)

    def write_manifest(self, reference: ModelReference, raw: bytes) -> Path:
        """Write the registry's exact bytes atomically: temp file, fsync, rename, fsync of the directory."""
        path = self.manifest_path(reference)
        temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with storage_errors(f"write the manifest {path}"):
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                with open(temp, "wb") as handle:
                    handle.write(raw)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(temp, path)
            finally:
                temp.unlink(missing_ok=True)
            _fsync_dir(path.parent)
        return path

    def _inside(self, path: Path) -> Path:
        # Reference and digest validation already keep paths inside; this is the last line of defence.
        if not path.is_relative_to(self.root) or ".." in path.relative_to(self.root).parts:
            raise ValueError(f"{path} is outside the models directory {self.root}")
        return path


def _blob_name(digest: str) -> str:
    """``sha256-<hex>``: checked against the digest pattern, which admits hex only, so a name built from it
    cannot leave the directory it is joined to (the paths of a pull are built a dozen times per blob)."""
    if not DIGEST_PATTERN.fullmatch(digest):
        # The manifest parser already refuses such digests; this guards every other caller.
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return digest.replace(":", "-", 1)


def hash_file(handle: BinaryIO, digest: hashlib._Hash, *, stop: threading.Event | None = None) -> int:
    """Feed the rest of an open file to ``digest`` (until ``stop`` is set); return how many bytes that was."""
    length = 0
    while (stop is None or not stop.is_set()) and (chunk := handle.read(READ_SIZE)):
        digest.update(chunk)
        length += len(chunk)
    return length


@contextlib.asynccontextmanager
async def _flock(path: Path, *, exclusive: bool, poll: float = _POLL) -> AsyncIterator[None]:
    """An flock on ``path``, waited for without blocking the event loop (and so cancellable)."""
    operation = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
    with storage_errors(f"create the lock file {path}"):
        fd, locked = await finished_in_thread(lambda: _open_lock(path, operation), lambda got: os.close(got[0]))
    try:
        while not locked:
            await asyncio.sleep(poll)
            locked = _try_lock(fd, operation)
        yield
    finally:
        os.close(fd)


@contextlib.asynccontextmanager
async def _claimed(
    store: Store, layer: Layer, on_wait: Callable[[], None] | None, wait: bool, poll: float = _POLL
) -> AsyncIterator[BlobClaim | None]:
    path = store.partial_path(layer.digest)

    def undo(got: tuple[int, bool | None, bool]) -> None:
        _release(store, layer, path, got[0], locked=got[1] is not None)

    with storage_errors(f"open {path}"):
        fd, present, fresh = await finished_in_thread(functools.partial(_claim, store, layer, path, None), undo)
    try:
        while present is None:
            if not wait:
                raise BlobHeld(layer.digest)
            if on_wait is not None:
                on_wait()
                on_wait = None
            await asyncio.sleep(poll)
            if _try_lock(fd, _EXCLUSIVE):
                # The thread owns the descriptor now: it closes it if the file was renamed or removed meanwhile.
                held, fd = fd, -1
                with storage_errors(f"open {path}"):
                    fd, present, fresh = await finished_in_thread(
                        functools.partial(_claim, store, layer, path, held), undo
                    )
        if present:
            yield None
        else:
            claim = BlobClaim(fd, path, fresh=fresh)
            # The claim owns the descriptor from here on.
            fd = -1
            try:
                yield claim
            finally:
                claim.release(before=functools.partial(_tidy, store, layer, path))
    finally:
        if fd >= 0:
            _release(store, layer, path, fd, locked=present is not None)


class BlobHeld(Exception):
    """Another process holds the blob, and the claim was not to wait for it."""

    def __init__(self, digest: str) -> None:
        super().__init__(f"another process is downloading {digest}")
        self.digest = digest


class BlobClaim:
    """A blob's partial file, open and locked, as :meth:`Store.claim_blob` gives it: ``fd`` to write through.

    Whoever has renamed the file into place (or removed it) may let go at once, from any thread, with
    :meth:`release`: closing a data file that has just been fsynced is work the event loop need not do (6% of
    its time on 4,096 small blobs). Otherwise the claim lets go when its context ends.

    ``fresh`` says the claim made the file: it is empty and has no chunk progress beside it, so whoever writes it
    from the start need not look for any (on 4,096 small blobs, that look-up of a name that is not there was 5% of
    the wall time: a search of the ``blobs/`` directory under its lock, contended by every file created in it)."""

    def __init__(self, fd: int, path: Path, *, fresh: bool = False) -> None:
        self.fd = fd
        # Built once per blob, for everyone who needs it: the paths of a pull were a few percent of the event
        # loop's time on 4,096 small blobs.
        self.path = path
        self.fresh = fresh
        self._lock = threading.Lock()
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def release(self, *, before: Callable[[int], None] | None = None) -> None:
        """Close the descriptor, which lets go of the lock, once; ``before`` runs first (still locked)."""
        with self._lock:
            if self._released:
                return
            self._released = True
            try:
                if before is not None:
                    before(self.fd)
            finally:
                os.close(self.fd)


def _release(store: Store, layer: Layer, path: Path, fd: int, *, locked: bool) -> None:
    """Let go of a claim not yet handed out: tidy up (see :func:`_tidy`) if the lock is ours, then close."""
    try:
        if locked:
            _tidy(store, layer, path, fd)
    finally:
        os.close(fd)


def _tidy(store: Store, layer: Layer, path: Path, fd: int) -> None:
    """A claim that wrote nothing (an import that stopped at another blob, a cancel before the first byte, or
    while the claim's own thread ran) removes its empty partial file, while the lock is still ours. The size
    first: a blob that took its name is rarely empty, and a stat of the name it left was 7% of the event loop's
    time on 4,096 small blobs. ``path`` is the partial file's, as the claim built it."""
    with contextlib.suppress(OSError):
        if os.fstat(fd).st_size == 0 and _names(path, fd):
            store.parts_state_path(layer.digest).unlink(missing_ok=True)
            path.unlink()


async def finished_in_thread(work: Callable[[], F], undo: Callable[[F], None] | None = None) -> F:
    """Run ``work`` (opening a file, reading from one) in a worker thread. Cancelled meanwhile, the thread runs on
    all the same: wait for it to end, then ``undo`` what it did, so that a cancelled pull leaves neither a
    descriptor nor a file behind, and nobody touches what the thread still holds."""
    running = in_thread(work)
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        await asyncio.wait({running})
        if undo is not None and not running.cancelled() and running.exception() is None:
            undo(running.result())
        raise


def _open_lock(path: Path, operation: int) -> tuple[int, bool]:
    """The lock file's descriptor, and whether the lock was free (then it is ours)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        return fd, _try_lock(fd, operation)
    except BaseException:
        os.close(fd)
        raise


def _claim(store: Store, layer: Layer, path: Path, fd: int | None) -> tuple[int, bool | None, bool]:
    """In a worker thread: open the blob's partial file (``path``) and try its lock, or take ``fd``, already locked
    after a wait. Answers the descriptor and, once the lock is held on the file the name leads to, whether the
    blob is in the store (then the partial file is removed: nobody needs it), None while another process holds
    it; and whether this call made the file (see :class:`BlobClaim`)."""
    fresh = False
    while True:
        if fd is None:
            fd, fresh = _open_partial(path)
            try:
                locked = _try_lock(fd, _EXCLUSIVE)
            except BaseException:
                os.close(fd)
                raise
            if not locked:
                return fd, None, fresh
        try:
            if _names(path, fd):
                present = store.has_blob(layer)
                if present:
                    store.parts_state_path(layer.digest).unlink(missing_ok=True)
                    path.unlink()
                return fd, present, fresh
        except BaseException:
            os.close(fd)
            raise
        # Locked, but no longer the file of that name: its holder renamed it into place or removed it.
        os.close(fd)
        fd = None


def _open_partial(path: Path) -> tuple[int, bool]:
    """The partial file's descriptor, and whether this made the file. Exclusive creation first: that is the
    common case, one system call, and the only way to know."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
    except FileExistsError:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644), False


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` is the file open on ``fd``."""
    try:
        linked = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (linked.st_dev, linked.st_ino) == (opened.st_dev, opened.st_ino)


def _try_lock(fd: int, operation: int) -> bool:
    try:
        fcntl.flock(fd, operation)
    except BlockingIOError:
        return False
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
