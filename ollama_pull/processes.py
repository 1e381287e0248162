"""Every core for one pull: helper processes that download a share of its blobs into the same store.

On a model of many blobs the event loop's one thread is the limit: receiving, framing, hand-offs (on 256 blobs
of 0.5-3.5 MiB, three quarters of its time is uvloop's own C: the reads and their copies). A second process on a
second core halved that work: 256 blobs x0.83 wall, 4,096 blobs of 64 KiB x0.75; on one core it cost x1.1-1.2
(bench/PROFILE.md). So a pull of enough blobs starts a helper per extra core, ``python -m ollama_pull.helper``,
once its plan is known, and gives it the puller's options (store, TLS, mirror, settings with the connections
and ``--max-rate`` divided) and the blobs, through its stdin.

Each process downloads a share of the list first, then the rest from the far end, where the rest's owners get
last: a process that falls behind (a helper's interpreter takes 0.15 s to start) is helped. A claim that finds a blob
another process holds leaves it and goes on (``shared`` in :meth:`ollama_pull.engine.Downloader.download`); the
store's per-blob locks keep processes apart, as they do for separate pulls sharing a store. What the parent left
to others and is still missing once they end, it downloads then, waiting for any lock as usual.

A helper's events come back as frames on its stdout, pickled, and go to the parent's callback; so does its
error, raised in the parent as its own (the same exit code). Cancelled, the parent sends its helpers SIGTERM and
waits for them to clean up; a helper also stops when its stdin ends (the parent is gone).
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar, cast

from .engine import Downloader, DownloadSettings, DownloadStats, first_error
from .errors import OllamaPullError
from .events import Event, EventCallback
from .manifest import Layer
from .reference import ModelReference

T = TypeVar("T")

# A pull of fewer missing blobs than this stays in one process: a helper's start-up (an interpreter, its imports,
# a token) would cost more than its share saves.
MIN_BLOBS = 16
# Nor does a pull whose blobs average this much or more: what limits it is bytes more than blobs, and a helper
# gained little there for its memory (256 blobs of 0.5-3.5 MiB: x0.96 wall, peak memory 71-77 -> 93-100 MiB),
# where on 4,096 blobs of 64 KiB it gained x0.87 for 20 MiB.
MAX_MEAN_BLOB = 1024 * 1024
# Each frame on a helper's stdout: its length, then a pickled list of messages.
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
    """Whether a pull of these missing blobs is one that helpers speed up (:data:`MIN_BLOBS`,
    :data:`MAX_MEAN_BLOB`)."""
    return len(layers) >= MIN_BLOBS and sum(layer.size for layer in layers) < MAX_MEAN_BLOB * len(layers)


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


class Helper:
    """One helper process: started, given its job, and waited for."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process

    @classmethod
    async def start(cls) -> Helper:
        process = await asyncio.create_subprocess_exec(
            *HELPER_COMMAND, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        return cls(process)

    async def run(self, job: HelperJob, on_event: EventCallback) -> DownloadStats:
        """Hand the helper its job; relay its events until it ends; its outcome, or its error raised."""
        process = self._process
        assert process.stdin is not None
        assert process.stdout is not None
        try:
            # Kept open afterwards: its end tells the helper that we are gone.
            process.stdin.write(frame(job))
            await process.stdin.drain()
            outcome: DownloadStats | BaseException | None = None
            while (messages := await _read_frame(process.stdout)) is not None:
                for kind, value in messages:
                    if kind == "event":
                        on_event(cast(Event, value))
                    else:
                        outcome = cast(DownloadStats | OllamaPullError, value)
            code = await process.wait()
            if isinstance(outcome, BaseException):
                raise outcome
            if outcome is None:
                raise HelperFailed(code)
            return outcome
        finally:
            await self.close()

    async def close(self) -> None:
        """Stop the helper if it still runs (SIGTERM: it cancels its download and cleans up) and wait for it."""
        process = self._process
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            # Its output read to the end, or a helper blocked on a full pipe would never get to exit. Shielded
            # from a second cancel: its partial files are cleaned up before we go on.
            await asyncio.shield(process.communicate())


async def start_helpers(count: int) -> list[Helper]:
    """Up to ``count`` helpers; fewer where no interpreter can be started (a frozen executable, say): the pull
    then has fewer processes, not an error."""
    helpers: list[Helper] = []
    for _ in range(count):
        try:
            helpers.append(await Helper.start())
        except OSError:
            break
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
