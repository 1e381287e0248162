"""Every core for one pull: helper processes that download a share of its blobs into the same store.

On a model of many blobs the event loop's one thread is the limit: receiving, framing, hand-offs (on 256 blobs
of 0.5-3.5 MiB, three quarters of its time is uvloop's own C: the reads and their copies). A second process on a
second core halved that work: 256 blobs x0.83 wall, 4,096 blobs of 64 KiB x0.75; on one core it cost x1.1-1.2
(bench/PROFILE.md). So a pull of enough blobs gets a helper per extra core once its plan is known: a spare the
CLI forked before its event loop started (:func:`forked_helpers`), ready at once, or else a new interpreter,
``python -m ollama_pull.helper``. The pull gives it the puller's options (store, TLS, mirror, settings with the
connections and ``--max-rate`` divided) and the blobs, through a pipe.

Each process downloads a share of the list first, then the rest from the far end, where the rest's owners get
last: a process that falls behind (a spawned helper's interpreter takes 0.15 s to start) is helped. A claim that
finds a blob another process holds leaves it and goes on (``shared`` in
:meth:`ollama_pull.engine.Downloader.download`); the store's per-blob locks keep processes apart, as they do for
separate pulls sharing a store. What the parent left to others and is still missing once they end, it downloads
then, waiting for any lock as usual.

A helper's events come back as frames on another pipe, pickled, and go to the parent's callback; so does its
error, raised in the parent as its own (the same exit code). Cancelled, the parent sends its helpers SIGTERM and
waits for them to clean up; a helper also stops when its job pipe ends (the parent is gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import pickle
import signal
import struct
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NoReturn, TypeVar, cast

from .engine import Downloader, DownloadSettings, DownloadStats, first_error
from .errors import OllamaPullError
from .events import Event, EventCallback
from .manifest import Layer
from .reference import ModelReference
from .worker import in_thread

T = TypeVar("T")

# A pull of fewer missing blobs than this stays in one process: a helper's start-up (an interpreter, its imports,
# a token) would cost more than its share saves.
MIN_BLOBS = 16
# Nor is a helper spawned for a pull whose blobs average this much or more: what limits it is bytes more than
# blobs, and a spawned helper gained little there for its memory (256 blobs of 0.5-3.5 MiB: x0.96 wall, peak
# memory 71-77 -> 93-100 MiB), where on 4,096 blobs of 64 KiB it gained x0.87 for 20 MiB. A forked spare, which
# starts at once and shares its parent's pages, took the 256 blobs x0.875, the pair peaking at 68-76 MiB once
# the buffers were trimmed (bench/PROFILE.md).
MAX_MEAN_BLOB = 1024 * 1024
# Each frame between a pull and its helper, either way: its length, then the pickled job or list of messages.
FRAME = struct.Struct(">I")


@dataclass(frozen=True)
class HelperJob:
    """What a helper needs to download its share as the parent would: the puller's options and the blobs."""

    models_dir: Path
    insecure: bool
    settings: DownloadSettings
    mirror: str | None
    ca_cert: Path | None
    reference: ModelReference
    model: str
    layers: tuple[Layer, ...]
    # Which event loop, and the thresholds of the cyclic garbage collector: the parent's, whoever chose them.
    uvloop: bool
    collector: tuple[int, int, int]


class HelperFailed(OllamaPullError):
    """A helper process ended without saying how: it crashed, or was killed."""

    def __init__(self, code: int | None) -> None:
        super().__init__(f"a helper process of the pull ended with exit code {code}: run again to continue")
        self.code = code


HELPER_COMMAND = (sys.executable, "-m", "ollama_pull.helper")


def worth_helpers(layers: Sequence[Layer]) -> bool:
    """Whether a pull of these missing blobs is one that helpers speed up (:data:`MIN_BLOBS`)."""
    return len(layers) >= MIN_BLOBS


def worth_spawning(layers: Sequence[Layer]) -> bool:
    """Whether its helpers may be spawned ones too, not only spares (:data:`MAX_MEAN_BLOB`)."""
    return sum(layer.size for layer in layers) < MAX_MEAN_BLOB * len(layers)


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def helpers_for(settings: DownloadSettings) -> int:
    """How many helpers a pull may start: one per CPU it may use beyond its own, up to ``settings.processes`` in
    all; none without POSIX signals (Windows)."""
    if os.name != "posix":
        return 0
    return max(0, min(settings.processes, usable_cpus()) - 1)


def divided(settings: DownloadSettings, processes: int) -> DownloadSettings:
    """One process's part of the pull's connections and of its ``--max-rate``."""
    rate = settings.max_rate / processes if settings.max_rate else None
    return dataclasses.replace(settings, concurrency=max(1, settings.concurrency // processes), max_rate=rate)


class _Spawned:
    """A helper started as ``python -m ollama_pull.helper``, its job on its stdin and its frames on its stdout."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process
        assert process.stdout is not None
        self.output = process.stdout

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    async def send(self, data: bytes) -> None:
        # Kept open afterwards: its end tells the helper that we are gone.
        assert self._process.stdin is not None
        self._process.stdin.write(data)
        await self._process.stdin.drain()

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self._process.send_signal(signum)

    async def wait(self) -> int:
        return await self._process.wait()


@dataclass(frozen=True)
class Spare:
    """A helper forked before the event loop started, blocked on reading its job: ready the moment a plan is
    known, with every module its parent had imported."""

    pid: int
    # A handle on the process itself, not on its number: signalled or waited for through it, a process that has
    # ended and been reaped can never be mistaken for a newer one that got its number.
    pidfd: int
    jobs: int
    events: int


class _Forked:
    """A spare at work: its job written into its pipe, its frames read from the other."""

    def __init__(self, spare: Spare, output: asyncio.StreamReader) -> None:
        self._spare = spare
        self.output = output
        self.returncode: int | None = None

    async def send(self, data: bytes) -> None:
        # A job of thousands of blobs is more than a pipe holds: written whole in a thread while the spare reads.
        await in_thread(_write_all, self._spare.jobs, data)

    def signal(self, signum: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._spare.pidfd, signum)

    async def wait(self) -> int:
        if self.returncode is None:
            loop = asyncio.get_running_loop()
            ended: asyncio.Future[None] = loop.create_future()

            def readable() -> None:
                if not ended.done():
                    ended.set_result(None)

            # The handle becomes readable when the process ends; reaping it then does not block.
            loop.add_reader(self._spare.pidfd, readable)
            try:
                await ended
            finally:
                loop.remove_reader(self._spare.pidfd)
            self.returncode = _reap(self._spare)
            os.close(self._spare.jobs)
        return self.returncode


def _reap(spare: Spare) -> int:
    """Its exit code, collected, and its handle closed: at once for a spare that has ended, as they all do once
    their job pipe ends."""
    _, status = os.waitpid(spare.pid, 0)
    os.close(spare.pidfd)
    return os.waitstatus_to_exitcode(status)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Helper:
    """One helper process, spawned or forked: given its job, and waited for."""

    def __init__(self, child: _Spawned | _Forked) -> None:
        self._child = child

    @classmethod
    async def start(cls) -> Helper:
        process = await asyncio.create_subprocess_exec(
            *HELPER_COMMAND, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        return cls(_Spawned(process))

    @classmethod
    async def adopt(cls, spare: Spare) -> Helper:
        """A spare (:func:`forked_helpers`), its frames read on the running loop."""
        output = asyncio.StreamReader()
        await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(output), os.fdopen(spare.events, "rb", buffering=0)
        )
        return cls(_Forked(spare, output))

    @property
    def returncode(self) -> int | None:
        """Its exit code once it has ended and been waited for; None until then."""
        return self._child.returncode

    async def run(self, job: HelperJob, on_event: EventCallback) -> DownloadStats:
        """Hand the helper its job; relay its events until it ends; its outcome, or its error raised."""
        child = self._child
        try:
            # A helper gone already (killed while it waited for its job) fails below, for want of an outcome.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                await child.send(frame(job))
            outcome: DownloadStats | BaseException | None = None
            while (messages := await _read_frame(child.output)) is not None:
                for kind, value in messages:
                    if kind == "event":
                        on_event(cast(Event, value))
                    else:
                        outcome = cast(DownloadStats | OllamaPullError, value)
            code = await child.wait()
            if isinstance(outcome, BaseException):
                raise outcome
            if outcome is None:
                raise HelperFailed(code)
            return outcome
        finally:
            await self.close()

    async def close(self) -> None:
        """Stop the helper if it still runs (SIGTERM: it cancels its download and cleans up) and wait for it."""
        if self._child.returncode is None:
            self._child.signal(signal.SIGTERM)
            # Shielded from a second cancel: its partial files are cleaned up before we go on.
            await asyncio.shield(self._finish())

    async def _finish(self) -> None:
        # Its output read to the end first, or a helper blocked on a full pipe would never get to exit.
        await self._child.output.read()
        await self._child.wait()


# Spares forked and waiting for a job; spares told to end (their job pipe closed), not reaped yet.
_spares: list[Spare] = []
_ending: list[Spare] = []


@contextlib.contextmanager
def forked_helpers(count: int) -> Iterator[None]:
    """Fork up to ``count`` spares now, for the first pull inside the block that wants helpers; a spare left
    unused ends when that pull has its plan, or with the block.

    A spawned helper starts downloading 0.12-0.2 s after its parent, the time of an interpreter and its imports;
    a spare is a copy of its parent, ready at once, and shares its parent's pages until either writes them. It is
    forked only from a process that runs no other thread, and no event loop yet (the CLI, before its loop): a
    fork copies one thread, and a lock another thread held would stay held in the copy for ever. Only on Linux,
    whose fork the helper's libraries are safe with and whose process handles make waiting for it safe.
    """
    if sys.platform == "linux" and threading.active_count() == 1 and not _running_loop():
        for _ in range(count):
            try:
                _spares.append(_fork_spare())
            except OSError:
                break
    try:
        yield
    finally:
        release_spares()
        for spare in _ending:
            _reap(spare)
        _ending.clear()


def release_spares() -> None:
    """Tell the spares nobody took to end: their job pipes closed, each exits without a job."""
    for spare in _spares:
        os.close(spare.jobs)
        os.close(spare.events)
    _ending.extend(_spares)
    _spares.clear()


def _running_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _fork_spare() -> Spare:
    jobs_read, jobs_write = os.pipe()
    events_read, events_write = os.pipe()
    # Blocked across the fork, so that a Ctrl-C cannot raise in the copy before it is on its own path.
    stopping = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stopping)
    try:
        pid = os.fork()
        if pid == 0:
            _serve_spare(jobs_read, events_write, [jobs_write, events_read])
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stopping)
    os.close(jobs_read)
    os.close(events_write)
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        os.close(jobs_write)
        os.close(events_read)
        os.waitpid(pid, 0)
        raise
    return Spare(pid, pidfd, jobs_write, events_read)


def _serve_spare(jobs: int, events: int, parents: list[int]) -> NoReturn:
    """The spare's life: its job read, its share downloaded, its exit. It never returns to its parent's code."""
    code = 1
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        # The parent's ends of this spare's pipes, and of the spares forked before it: kept open here, they
        # would hide the parent's end from those spares.
        for fd in parents + [fd for spare in _spares for fd in (spare.pidfd, spare.jobs, spare.events)]:
            os.close(fd)
        from .helper import serve

        with open(jobs, "rb") as job_input, open(events, "wb") as output:
            code = serve(job_input, output)
    finally:
        os._exit(code)


async def start_helpers(count: int, layers: Sequence[Layer]) -> list[Helper]:
    """Up to ``count`` helpers for a pull of these missing blobs: forked spares first, then spawned ones; none for
    a pull that helpers do not speed up (:data:`MIN_BLOBS`), and no spawned one for blobs of
    :data:`MAX_MEAN_BLOB` or more on average. Fewer where no interpreter can be started (a frozen executable,
    say): the pull then has fewer processes, not an error. Spares not taken are released."""
    helpers: list[Helper] = []
    if worth_helpers(layers):
        while _spares and len(helpers) < count:
            spare = _spares.pop()
            try:
                helpers.append(await Helper.adopt(spare))
            except BaseException:
                # Cancelled on the way: still a spare, which the end of the block ends.
                _spares.append(spare)
                raise
        if worth_spawning(layers):
            while len(helpers) < count:
                try:
                    helpers.append(await Helper.start())
                except OSError:
                    break
    release_spares()
    return helpers


async def download_shared(
    downloader: Downloader, job: HelperJob, helpers: Sequence[Helper], on_event: EventCallback
) -> DownloadStats:
    """Download ``job.layers`` with ``downloader`` and the ``helpers`` (see the module's notes)."""
    layers = job.layers
    parts = len(helpers) + 1
    bounds = [len(layers) * index // parts for index in range(parts + 1)]
    orders = [share_first(layers, bounds[index], bounds[index + 1]) for index in range(parts)]
    total = DownloadStats(0, 0)
    try:
        async with asyncio.TaskGroup() as group:
            own = group.create_task(downloader.download(job.reference, orders[0], model=job.model, shared=True))
            shares = [
                group.create_task(helper.run(dataclasses.replace(job, layers=order), on_event))
                for helper, order in zip(helpers, orders[1:], strict=True)
            ]
    except BaseExceptionGroup as failures:
        raise first_error(failures) from None
    for share in shares:
        total = _plus(total, share.result())
    left = [layer for layer in own.result().deferred if not downloader.store.has_blob(layer)]
    # Left to a helper that ended without it, or held by another pull: this time, waited for.
    mine = await downloader.download(job.reference, left, model=job.model) if left else own.result()
    return _plus(total, mine)


def share_first(layers: tuple[T, ...], start: int, end: int) -> tuple[T, ...]:
    """A process's order: its own share, then the others' from the far end of the list, where their owners get
    last."""
    return layers[start:end] + tuple(reversed(layers[end:])) + tuple(reversed(layers[:start]))


def _plus(a: DownloadStats, b: DownloadStats) -> DownloadStats:
    return DownloadStats(a.downloaded_blobs + b.downloaded_blobs, a.downloaded_bytes + b.downloaded_bytes)


def frame(value: object) -> bytes:
    """``value`` pickled, after its length: what goes either way between a pull and its helper."""
    body = pickle.dumps(value)
    return FRAME.pack(len(body)) + body


def read_frame(stream: BinaryIO) -> object | None:
    """The next frame's value from a blocking stream, or None at its end."""
    header = stream.read(FRAME.size)
    if len(header) < FRAME.size:
        return None
    (size,) = FRAME.unpack(header)
    value: object = pickle.loads(stream.read(size))
    return value


async def _read_frame(stream: asyncio.StreamReader) -> list[tuple[str, object]] | None:
    try:
        (size,) = FRAME.unpack(await stream.readexactly(FRAME.size))
        messages: list[tuple[str, object]] = pickle.loads(await stream.readexactly(size))
    except asyncio.IncompleteReadError:
        return None
    return messages


class FrameWriter:
    """The helper's side: events and the outcome, as frames on a binary stream, a batch at a time."""

    def __init__(self, write: Callable[[bytes], object], flush: Callable[[], object]) -> None:
        self._write = write
        self._flush = flush
        self._pending: list[tuple[str, object]] = []

    def event(self, event: Event) -> None:
        self._pending.append(("event", event))

    def outcome(self, value: DownloadStats | OllamaPullError) -> None:
        self._pending.append(("outcome", value))
        self.send()

    def send(self) -> None:
        if self._pending:
            self._write(frame(self._pending))
            self._pending = []
            self._flush()
