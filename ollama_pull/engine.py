"""The download engine: Ollama's tensor-model downloader (x/transfer), reimplemented on httpx.

Blobs download concurrently under a semaphore, each streamed into its partial file with SHA-256 computed as the
bytes arrive, and renamed into place only when digest and size match. Every attempt is watched: one that
receives nothing for ``stall_timeout`` is a stall, one that runs below a tenth of the pull's median speed after
``slow_grace`` is slow; both are aborted and retried under their own rules. Progress goes out as events and
never moves backwards.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

import httpx

from .errors import AuthenticationError, BlobError, IntegrityError, OllamaPullError
from .events import BlobFinished, BlobProgress, BlobRetry, BlobStarted, EventCallback, ignore_event
from .manifest import Layer
from .ratelimit import RateLimiter
from .reference import ModelReference
from .registry import RegistryClient
from .retry import Backoff, describe_transport_error, retry_after
from .store import BlobFile, Store

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

KIB = 1024
MIB = 1024 * KIB


@dataclass(frozen=True)
class DownloadSettings:
    """The engine's tunables; the defaults are Ollama's."""

    concurrency: int = 64
    attempts: int = 6
    stall_timeout: float = 10.0
    # Stalls do not count against ``attempts``, but a server that always stalls must not hang the pull forever.
    max_stalls: int = 10
    slow_grace: float = 5.0
    slow_fraction: float = 0.1
    # The first slow aborts are free: a blob can be unlucky with its connection.
    free_slow_aborts: int = 2
    speed_min_blob: int = 100 * KIB
    speed_samples: int = 30
    speed_min_samples: int = 5
    # Blobs at least this big keep their partial file across attempts and runs and resume it with Range.
    resume_min_size: int = 64 * MIB
    check_interval: float = 1.0
    backoff: Backoff = Backoff()
    # Bytes per second across every stream of the pull; None for no limit.
    max_rate: float | None = None


@dataclass(frozen=True)
class DownloadStats:
    downloaded_blobs: int
    downloaded_bytes: int


class _Kind(Enum):
    FAILURE = "failure"
    STALL = "stall"
    SLOW = "slow"


class _AttemptFailed(Exception):
    """Why one attempt ended without a verified blob; the engine decides whether to try again."""

    def __init__(
        self,
        reason: str,
        kind: _Kind = _Kind.FAILURE,
        *,
        integrity: bool = False,
        restart: bool = False,
        wait: float | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
        self.integrity = integrity
        self.restart = restart
        self.wait = wait


class SpeedSamples:
    """The median speed of the pull's finished blobs, the yardstick of slow detection."""

    def __init__(self, *, min_size: int, keep: int, min_samples: int) -> None:
        self._min_size = min_size
        self._min_samples = min_samples
        self._speeds: deque[float] = deque(maxlen=keep)

    def add(self, size: int, seconds: float) -> None:
        if size >= self._min_size and seconds > 0:
            self._speeds.append(size / seconds)

    def median(self) -> float | None:
        return statistics.median(self._speeds) if len(self._speeds) >= self._min_samples else None


@dataclass
class _Watch:
    """What the watchdog needs to judge one attempt."""

    started: float
    last_read: float
    received: int = 0
    # Waiting on --max-rate is our own doing, not the server's: neither a stall nor slowness.
    throttled: bool = False


@dataclass
class _BlobState:
    layer: Layer
    counted: int = 0
    stalls: int = 0
    slows: int = 0
    reported: int = 0
    failures: list[str] = field(default_factory=list)


class Downloader:
    """Downloads a model's blobs into a store. Usable on its own: give it a registry client and a store."""

    def __init__(
        self,
        registry: RegistryClient,
        store: Store,
        *,
        settings: DownloadSettings = DownloadSettings(),
        on_event: EventCallback = ignore_event,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.registry = registry
        self.store = store
        self.settings = settings
        self._emit = on_event
        self._clock = clock
        self._sleep = sleep
        self._jitter = jitter
        self.speeds = SpeedSamples(
            min_size=settings.speed_min_blob, keep=settings.speed_samples, min_samples=settings.speed_min_samples
        )
        self._downloaded_bytes = 0
        self._downloaded_blobs = 0
        self._limiter = RateLimiter(settings.max_rate, clock=clock, sleep=sleep) if settings.max_rate else None

    async def download(self, reference: ModelReference, layers: Sequence[Layer], *, model: str) -> DownloadStats:
        """Download every layer; on the first blob that fails for good, cancel the rest and raise its error."""
        semaphore = asyncio.Semaphore(self.settings.concurrency)
        try:
            async with asyncio.TaskGroup() as group:
                for layer in layers:
                    group.create_task(self._download_blob(reference, layer, model, semaphore))
        except BaseExceptionGroup as failures:
            raise _first_error(failures) from None
        return DownloadStats(downloaded_blobs=self._downloaded_blobs, downloaded_bytes=self._downloaded_bytes)

    async def _download_blob(
        self, reference: ModelReference, layer: Layer, model: str, semaphore: asyncio.Semaphore
    ) -> None:
        async with semaphore, self.store.blob_lock(layer.digest):
            if self.store.has_blob(layer):
                # Another process sharing the store downloaded it while we waited for its lock.
                self._emit(BlobFinished(model, layer.digest, layer.size, 0.0))
                return
            resumable = layer.size >= self.settings.resume_min_size
            blob = await asyncio.to_thread(self.store.open_blob, layer, resume=resumable)
            state = _BlobState(layer, reported=blob.offset)
            self._emit(BlobStarted(model, layer.digest, layer.label, layer.size, blob.offset))
            committed = False
            try:
                while True:
                    try:
                        seconds = await self._attempt(reference, blob, state, model)
                    except _AttemptFailed as failed:
                        if failed.restart or not resumable:
                            blob.restart()
                        delay = self._judge(state, failed)
                        self._emit(BlobRetry(model, layer.digest, len(state.failures), failed.reason, delay))
                        await self._sleep(delay)
                        continue
                    await asyncio.to_thread(blob.commit)
                    committed = True
                    self.speeds.add(layer.size, seconds)
                    self._downloaded_blobs += 1
                    self._emit(BlobFinished(model, layer.digest, layer.size, seconds))
                    return
            finally:
                if not committed:
                    blob.close(keep=resumable)

    def _judge(self, state: _BlobState, failed: _AttemptFailed) -> float:
        """Count the failure by its kind's rules; raise the blob's final error when it has no tries left."""
        state.failures.append(failed.reason)
        if failed.kind is _Kind.STALL:
            state.stalls += 1
            if state.stalls > self.settings.max_stalls:
                raise BlobError(
                    state.layer.digest, f"stalled {state.stalls} times: {failed.reason}", len(state.failures)
                )
        elif failed.kind is _Kind.SLOW:
            state.slows += 1
            if state.slows > self.settings.free_slow_aborts:
                state.counted += 1
        else:
            state.counted += 1
        if state.counted >= self.settings.attempts:
            error = IntegrityError if failed.integrity else BlobError
            raise error(state.layer.digest, failed.reason, len(state.failures))
        backoff = self.settings.backoff.delay(len(state.failures), self._jitter())
        return max(backoff, failed.wait or 0.0)

    async def _attempt(self, reference: ModelReference, blob: BlobFile, state: _BlobState, model: str) -> float:
        """One try at the blob, watched for stalls and slowness; returns its duration once verified."""
        now = self._clock()
        watch = _Watch(started=now, last_read=now)
        stream = asyncio.create_task(self._stream(reference, blob, state, watch, model))
        try:
            while True:
                done, _ = await asyncio.wait({stream}, timeout=self.settings.check_interval)
                if done:
                    stream.result()
                    return self._clock() - watch.started
                self._check(watch)
        finally:
            stream.cancel()
            # Wait for the stream even if it already ended: an error it ended with while this attempt was being
            # cancelled must be collected here, or asyncio reports it as never retrieved.
            await asyncio.wait({stream})
            if not stream.cancelled():
                stream.exception()

    def _check(self, watch: _Watch) -> None:
        if watch.throttled:
            return
        now = self._clock()
        silent = now - watch.last_read
        if silent >= self.settings.stall_timeout:
            raise _AttemptFailed(f"stalled: no data for {silent:.0f}s", _Kind.STALL)
        elapsed = now - watch.started
        median = self.speeds.median()
        if elapsed >= self.settings.slow_grace and median is not None:
            speed = watch.received / elapsed
            if speed < self.settings.slow_fraction * median:
                raise _AttemptFailed(
                    f"slow: {_rate(speed)} is below {self.settings.slow_fraction:.0%} of the median {_rate(median)}",
                    _Kind.SLOW,
                )

    async def _stream(
        self, reference: ModelReference, blob: BlobFile, state: _BlobState, watch: _Watch, model: str
    ) -> None:
        layer = blob.layer
        try:
            async with self.registry.stream_blob(reference, layer.digest, offset=blob.offset) as response:
                _accept(response, blob)
                async for chunk in response.aiter_raw():
                    watch.last_read = self._clock()
                    watch.received += len(chunk)
                    self._downloaded_bytes += len(chunk)
                    if blob.offset + len(chunk) > layer.size:
                        raise _AttemptFailed(
                            f"the server sent more than the manifest's {layer.size} bytes", integrity=True, restart=True
                        )
                    blob.write(chunk)
                    if self._limiter is not None:
                        watch.throttled = True
                        await self._limiter.take(len(chunk))
                        watch.throttled = False
                        watch.last_read = self._clock()
                    if blob.offset > state.reported:
                        state.reported = blob.offset
                        self._emit(BlobProgress(model, layer.digest, blob.offset, layer.size))
        except httpx.RequestError as exc:
            raise _AttemptFailed(describe_transport_error(exc)) from exc
        if blob.offset < layer.size:
            # Not corruption: the bytes so far may be good, and a resumable blob continues from them.
            raise _AttemptFailed(f"the body ended after {blob.offset} of {layer.size} bytes")
        mismatch = blob.mismatch()
        if mismatch is not None:
            raise _AttemptFailed(mismatch, integrity=True, restart=True)


def _accept(response: httpx.Response, blob: BlobFile) -> None:
    """Judge a blob response's status and headers before any byte of it is written."""
    status = response.status_code
    if status in (401, 403):
        raise AuthenticationError(f"the registry refused access to blob {blob.layer.digest} (HTTP {status})")
    if status == 416:
        raise _AttemptFailed("the server cannot resume this blob (HTTP 416)", restart=True)
    if status not in (200, 206):
        raise _AttemptFailed(f"HTTP {status}", wait=retry_after(response))
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise _AttemptFailed(f"the server compressed the blob (Content-Encoding: {encoding})", integrity=True)
    if status == 200 and blob.offset:
        # The server ignored our Range and sends the whole blob: start over rather than append to the prefix.
        blob.restart()
    elif status == 206:
        first = response.headers.get("Content-Range", "").removeprefix("bytes ").split("-", 1)[0]
        if first != str(blob.offset):
            raise _AttemptFailed(
                f"the server resumed at the wrong offset ({first or '?'}, not {blob.offset})", restart=True
            )


def _first_error(failures: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error to report from a TaskGroup: one of ours if any (a bug's exception is never hidden)."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [failures]
    while pending:
        item = pending.pop(0)
        if isinstance(item, BaseExceptionGroup):
            pending.extend(item.exceptions)
        else:
            leaves.append(item)
    if all(isinstance(leaf, OllamaPullError) for leaf in leaves):
        return leaves[0]
    return failures


def _rate(bytes_per_second: float) -> str:
    return f"{bytes_per_second / MIB:.2f} MiB/s"
