"""The download engine: Ollama's tensor-model downloader (x/transfer), reimplemented on httpx2.

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
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx2

from .commits import GroupCommit
from .drain import DRAIN, Drain
from .errors import BlobError, IntegrityError, OllamaPullError, TokenServiceError
from .events import BlobFinished, BlobProgress, BlobRetry, BlobStarted, BlobWaiting, EventCallback, ignore_event
from .manifest import Layer
from .partial import BlobFile, Chunk, PartedBlob, Pieces
from .ratelimit import RateLimiter
from .reference import ModelReference
from .registry import RegistryClient, UnusableBlobResponse
from .retry import Backoff, FailureKind, RetryBudget, describe_transport_error
from .store import BlobClaim, BlobHeld, Store, finished_in_thread
from .units import format_rate
from .worker import in_thread

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

KIB = 1024
MIB = 1024 * KIB
# Bytes handed to the writing thread at a time: large enough that the hand-off costs little per byte, small
# enough that 64 streams each holding two batches stay well below the memory budget (32 MiB at most). 512 KiB
# once measured x0.95 against 256 KiB on 256 blobs of 0.5-3.5 MiB; on today's body path the two are level
# (alternated runs: 256 blobs with a forked helper 1.26 s and 1.21 s, then x1.026 over 8 runs; in one process
# 1.35 s and 1.37 s; a 1 GiB blob 2.43 s and 2.44 s), and 256 KiB holds 3-10 MiB less at the peak, where a
# loaded machine took 256 blobs with a helper to 101.7 MiB. 1 MiB was no faster and took 14-25 MiB more.
_WRITE_BATCH = 256 * KIB
# A slow stream hands over what it has after this long anyway, so the file on disk (what a resume finds) keeps up.
_WRITE_DELAY = 0.25
# A growing blob is written back to disk every this many bytes (_WriteBack).
_FLUSH_EVERY = 64 * MIB
# A large blob in one stream is split into chunks once its receiving thread has waited on the network for more
# than this share of a window (_LinkProbe). On loopback it waits for 1-2% of the time; at 20 MiB/s a connection,
# for nearly all of it.
_PROBE_WINDOW = 0.25
_WAITING_SHARE = 0.5


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
    # Within a run every blob resumes a failed attempt with Range; blobs at least this big also keep their partial
    # file for the next run (and resume it), smaller ones start over.
    resume_min_size: int = 64 * MIB
    # Blobs at least this big come in chunks over several streams at once (Ollama's own puller splits its big
    # blobs in up to 16 parts): a CDN that caps each connection then caps the blob no more. Smaller blobs stay whole.
    split_min_size: int = 128 * MIB
    chunk_size: int = 16 * MIB
    streams_per_blob: int = 16
    check_interval: float = 1.0
    backoff: Backoff = Backoff()
    # Bytes per second across every stream of the pull; None for no limit.
    max_rate: float | None = None
    # Processes that share a pull of many blobs, at most one per CPU (see ollama_pull.processes).
    processes: int = 1


@dataclass(frozen=True)
class DownloadStats:
    downloaded_blobs: int
    downloaded_bytes: int
    # Blobs left to another process that held them, in a download ``shared`` with other processes.
    deferred: tuple[Layer, ...] = ()


class _AttemptFailed(Exception):
    """Why one attempt ended without a verified blob; the engine decides whether to try again."""

    def __init__(
        self,
        reason: str,
        kind: FailureKind = FailureKind.FAILURE,
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
    # The body has ended: what is left (the last write, and with it perhaps the fsync and rename) is ours too.
    received_all: bool = False


class _Stream:
    """A blob's own place among the pull's streams, given back once: as soon as its bytes are in and verified,
    or when the blob is done with. Its commit (a sync in a batch, then its name) needs no stream, and the next
    blob's request goes out meanwhile: held through the commit, the streams of 256 blobs of 0.5-3.5 MiB at
    20 MiB/s a connection queued behind syncs, at times with 1-5 requests of 64 in flight (x0.94 wall without;
    bench/PROFILE.md)."""

    def __init__(self, slots: asyncio.Semaphore) -> None:
        self._slots = slots
        self._held = False

    async def __aenter__(self) -> _Stream:
        await self._slots.acquire()
        self._held = True
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self.release()

    def release(self) -> None:
        if self._held:
            self._held = False
            self._slots.release()


@dataclass
class _BlobState:
    layer: Layer
    # Failures of the blob as a whole; a chunk's own failures are counted by its fetch.
    tries: RetryBudget
    stream: _Stream
    announced: bool = False
    reported: int = 0


@dataclass
class _ChunkRun:
    """One pass over the missing chunks of a blob, shared by its streams."""

    reference: ModelReference
    blob: PartedBlob
    state: _BlobState
    model: str
    pending: deque[Chunk]
    slots: asyncio.Semaphore
    # Set when a chunk has landed, for the hashing task; and the extra streams waiting for a slot.
    landed: asyncio.Event = field(default_factory=asyncio.Event)
    queued: set[asyncio.Task[None]] = field(default_factory=set)


class _WriteBack:
    """A growing file written back to disk behind the download (behind the hash, for a blob in chunks), every
    ``_FLUSH_EVERY`` bytes, one flush at a time in a worker thread, instead of all at once in the fsync before
    its rename."""

    def __init__(self, flush: Callable[[], None], start: int) -> None:
        self._flush = flush
        self._flushed = start
        self._running: asyncio.Future[None] | None = None

    def landed(self, end: int) -> None:
        if end - self._flushed >= _FLUSH_EVERY and (self._running is None or self._running.done()):
            if self._running is not None:
                self._running.result()
            self._running = in_thread(self._flush)
            self._flushed = end

    async def wait(self, *, check: bool = True) -> None:
        """Wait for the flush under way; ``check``: raise what it raised."""
        running = self._running
        if running is not None:
            await asyncio.wait({running})
            self._running = None
            if check:
                running.result()
            elif not running.cancelled():
                running.exception()


class _SplitWanted(Exception):
    """The link does not keep up with one stream: the rest of the blob is to come in chunks."""


class _LinkProbe:
    """Whether one stream's thread waits on the network for most of the time: then the link, not this machine,
    is the limit, and more streams may get more of it (a server or CDN that caps each connection). Judged over
    windows of ``_PROBE_WINDOW`` seconds, so that a link that slows down later is caught too."""

    def __init__(self) -> None:
        self._elapsed = 0.0
        self._waited = 0.0

    def link_is_slower(self, elapsed: float, waited: float) -> bool:
        if elapsed - self._elapsed < _PROBE_WINDOW:
            return False
        share = (waited - self._waited) / (elapsed - self._elapsed)
        self._elapsed, self._waited = elapsed, waited
        return share > _WAITING_SHARE


class _RangesIgnored(Exception):
    """The server answered a ranged request with the whole blob: it can only be fetched in one stream."""


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
        self._commits = GroupCommit()

    async def download(
        self, reference: ModelReference, layers: Sequence[Layer], *, model: str, shared: bool = False
    ) -> DownloadStats:
        """Download every layer; on the first blob that fails for good, cancel the rest and raise its error.

        ``shared``: other processes of the same pull download the same layers into the store, from another end
        of the list (:mod:`ollama_pull.processes`). A blob one of them holds is left to it, and returned as
        ``deferred``, instead of waited for; a blob found in the store is not reported, since its downloader was.
        The counts are of this downloader's whole life."""
        # One slot per stream: a blob holds one while it downloads, and the extra streams of a large blob take
        # more, chunk by chunk, so the connections of the whole pull stay within ``concurrency``. A blob claimed
        # (a partial file, open) holds a claim until it is committed; twice as many claims as streams leave a
        # stream's worth of blobs to wait for their syncs, and hold back new ones when syncs fall behind.
        slots = asyncio.Semaphore(self.settings.concurrency)
        claims = asyncio.Semaphore(2 * self.settings.concurrency)
        deferred: list[Layer] = []
        try:
            async with asyncio.TaskGroup() as group:
                for layer in layers:
                    group.create_task(
                        self._download_blob(reference, layer, model, slots, claims, deferred if shared else None)
                    )
        except BaseExceptionGroup as failures:
            raise first_error(failures) from None
        finally:
            await self._commits.wait()
        return DownloadStats(self._downloaded_blobs, self._downloaded_bytes, tuple(deferred))

    async def _download_blob(
        self,
        reference: ModelReference,
        layer: Layer,
        model: str,
        slots: asyncio.Semaphore,
        claims: asyncio.Semaphore,
        deferred: list[Layer] | None,
    ) -> None:
        def waiting() -> None:
            self._emit(BlobWaiting(model, layer.digest, layer.label))

        async with claims, _Stream(slots) as stream:
            if deferred is not None and self.store.has_blob(layer):
                # Another process of the pull downloaded it while this one waited for a slot: a look at its name
                # costs far less than a claim, which creates a partial file, locks it and removes it again
                # (4,096 small blobs in two processes: 4.0 s with claims, against 3.5 s in one process).
                return
            try:
                async with self.store.claim_blob(layer, on_wait=waiting, wait=deferred is None) as claim:
                    if claim is None:
                        if deferred is None:
                            # Another process sharing the store downloaded it while we waited for its lock.
                            self._emit(BlobFinished(model, layer.digest, layer.size, 0.0))
                        return
                    state = _BlobState(layer, self._retry_budget(), stream)
                    seconds = await self._download_one(reference, state, model, slots, claim)
                    self._downloaded_blobs += 1
                    self._emit(BlobFinished(model, layer.digest, layer.size, seconds))
            except BlobHeld:
                assert deferred is not None
                deferred.append(layer)

    async def _download_one(
        self, reference: ModelReference, state: _BlobState, model: str, slots: asyncio.Semaphore, claim: BlobClaim
    ) -> float:
        """A large blob starts in one stream where a drain can tell the link's speed from ours, stays in one while
        the link keeps up with it, and is split into chunks over several streams once it does not (a link that
        caps each connection, or one slower than we are). Elsewhere, and where a download in chunks was cut
        short, a large blob comes in chunks at once."""
        layer = state.layer
        if layer.size >= self.settings.split_min_size:
            probed = (
                self._limiter is None
                and self.registry.drains_blobs(reference)
                and not self.store.parts_state_path(layer.digest).exists()
            )
            if probed:
                try:
                    return self._sampled(layer, await self._download_whole(reference, state, model, claim, probe=True))
                except _SplitWanted:
                    pass
            seconds = await self._download_parted_or_whole(reference, state, model, slots, claim)
            if seconds is not None:
                # Its streams gave their own samples: a chunked blob's overall speed is not one connection's.
                return seconds
        return self._sampled(layer, await self._download_whole(reference, state, model, claim))

    def _sampled(self, layer: Layer, seconds: float) -> float:
        self.speeds.add(layer.size, seconds)
        return seconds

    async def _download_parted_or_whole(
        self, reference: ModelReference, state: _BlobState, model: str, slots: asyncio.Semaphore, claim: BlobClaim
    ) -> float | None:
        """The blob in chunks; None when the server ignores Range, and it must come in one stream after all."""
        try:
            return await self._download_parted(reference, state, model, slots, claim)
        except _RangesIgnored:
            reason = "the server ignores Range requests: downloading in one stream"
            self._emit(BlobRetry(model, state.layer.digest, state.tries.attempt, reason, 0.0))
            return None

    def _announce(self, state: _BlobState, model: str, completed: int) -> None:
        """Say the blob started, once, even when it falls back from chunks to one stream."""
        if not state.announced:
            state.announced = True
            state.reported = completed
            layer = state.layer
            self._emit(BlobStarted(model, layer.digest, layer.label, layer.size, completed))

    def _report(self, state: _BlobState, model: str, completed: int) -> None:
        if completed > state.reported:
            state.reported = completed
            self._emit(BlobProgress(model, state.layer.digest, completed, state.layer.size))

    async def _retry(
        self, digest: str, tries: RetryBudget, failed: _AttemptFailed, model: str, where: str = ""
    ) -> None:
        attempt = tries.attempt
        delay = self._judge(digest, tries, failed)
        self._emit(BlobRetry(model, digest, attempt, where + failed.reason, delay))
        await self._sleep(delay)

    async def _download_whole(
        self, reference: ModelReference, state: _BlobState, model: str, claim: BlobClaim, *, probe: bool = False
    ) -> float:
        """The blob in one stream. A failed attempt leaves a verified prefix (hashed as written) that the next one
        continues with Range; the partial file outlives the run only for a blob large enough to be worth it.
        ``probe``: raise :class:`_SplitWanted`, keeping the prefix, when the link does not keep up with one stream."""
        layer = state.layer
        resumable = layer.size >= self.settings.resume_min_size
        if resumable:
            blob = await finished_in_thread(
                lambda: self.store.open_blob(layer, claim, resume=True), lambda opened: opened.close(keep=True)
            )
        else:
            # Nothing to read back: the file is emptied in the thread that writes the first bytes.
            blob = self.store.open_blob(layer, claim, resume=False)
        self._announce(state, model, blob.offset)
        write_back = _WriteBack(blob.flush, blob.offset)
        try:
            while True:
                try:
                    seconds, _received = await self._watched(
                        lambda watch: self._stream_whole(reference, blob, state, model, watch, write_back, probe)
                    )
                except _AttemptFailed as failed:
                    # Every byte came but the response failed (a lying Content-Length): a Range past the end would
                    # only get a 416, so that attempt is taken again whole.
                    if failed.restart or blob.offset >= layer.size:
                        blob.restart()
                    await self._retry(layer.digest, state.tries, failed, model)
                    continue
                break
            state.stream.release()
            await write_back.wait()
            await self._commits.commit(blob)
            return seconds
        finally:
            await write_back.wait(check=False)
            if not blob.committed:
                # A probed blob split into chunks goes on from its prefix, in the same file.
                blob.close(keep=resumable or probe)

    async def _download_parted(
        self, reference: ModelReference, state: _BlobState, model: str, slots: asyncio.Semaphore, claim: BlobClaim
    ) -> float:
        """The blob in chunks over several streams, hashed front to back as the chunks land."""
        layer = state.layer
        started = self._clock()
        blob = await finished_in_thread(
            lambda: PartedBlob(self.store, layer, claim, chunk_size=self.settings.chunk_size),
            lambda opened: opened.close(keep=opened.received > 0),
        )
        self._announce(state, model, blob.received)
        # Committed, or handed on to one stream: either way not to be closed here.
        settled = False
        try:
            while True:
                await self._fetch_chunks(reference, blob, state, model, slots)
                mismatch = blob.mismatch()
                if mismatch is None:
                    break
                blob.restart()
                await self._retry(layer.digest, state.tries, _AttemptFailed(mismatch, integrity=True), model)
            state.stream.release()
            await in_thread(blob.commit)
            settled = True
            return self._clock() - started
        except _RangesIgnored:
            # What was written is a sparse file one stream could not continue: it goes on in the same, emptied,
            # file, which stays under the blob's claim.
            settled = True
            await in_thread(blob.empty)
            raise
        finally:
            if not settled:
                blob.close(keep=blob.received > 0)

    async def _fetch_chunks(
        self,
        reference: ModelReference,
        blob: PartedBlob,
        state: _BlobState,
        model: str,
        slots: asyncio.Semaphore,
    ) -> None:
        run = _ChunkRun(reference, blob, state, model, deque(blob.missing()), slots)
        # The file may already hold bytes from an earlier run: hash them while the rest downloads.
        run.landed.set()
        streams = min(self.settings.streams_per_blob, len(run.pending))
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._follow_hash(blob, run.landed))
                if streams:
                    group.create_task(self._own_stream(run))
                for _ in range(streams - 1):
                    group.create_task(self._extra_stream(run))
        except BaseExceptionGroup as failures:
            raise first_error(failures) from None

    async def _follow_hash(self, blob: PartedBlob, landed: asyncio.Event) -> None:
        # The disk writes back while the network keeps us busy, instead of all at once in the final fsync: on a
        # 1 GiB blob that fsync was a fifth of the wall time.
        write_back = _WriteBack(blob.flush, blob.hashed)
        try:
            while blob.hashed < blob.layer.size:
                await landed.wait()
                landed.clear()
                await in_thread(blob.hash_landed)
                write_back.landed(blob.hashed)
            await write_back.wait()
        finally:
            await write_back.wait(check=False)

    async def _own_stream(self, run: _ChunkRun) -> None:
        """The stream in the blob's own slot: it alone is sure to get a connection, so it sees the chunks out."""
        while run.pending:
            await self._fetch_chunk(run, run.pending.popleft())
        # Extra streams still queued for a slot have nothing left to fetch: with -j 1 they would wait for good.
        for task in run.queued:
            task.cancel()

    async def _extra_stream(self, run: _ChunkRun) -> None:
        """A stream that takes a free slot of the pull for each chunk, so other blobs get their turn."""
        me = asyncio.current_task()
        assert me is not None
        while run.pending:
            run.queued.add(me)
            try:
                await run.slots.acquire()
            finally:
                run.queued.discard(me)
            try:
                # Take a chunk only once holding a slot: a chunk held while queued could wait for good.
                if not run.pending:
                    return
                await self._fetch_chunk(run, run.pending.popleft())
            finally:
                run.slots.release()

    async def _fetch_chunk(self, run: _ChunkRun, chunk: Chunk) -> None:
        tries = self._retry_budget()
        where = f"bytes {chunk.start}-{chunk.end - 1}: "
        while True:
            try:
                seconds, received = await self._watched(lambda watch: self._stream_chunk(run, chunk, watch))
            except _AttemptFailed as failed:
                await self._retry(run.blob.layer.digest, tries, failed, run.model, where)
                continue
            # Each stream is one sample of what a connection gets, like a small blob downloaded whole.
            self.speeds.add(received, seconds)
            run.landed.set()
            return

    def _retry_budget(self) -> RetryBudget:
        settings = self.settings
        return RetryBudget(
            settings.attempts,
            backoff=settings.backoff,
            max_stalls=settings.max_stalls,
            free_slows=settings.free_slow_aborts,
        )

    def _judge(self, digest: str, tries: RetryBudget, failed: _AttemptFailed) -> float:
        """Count the failure by the budget's rules; raise the blob's final error when it has no tries left."""
        final = tries.charge(failed.kind, failed.reason)
        if final is not None:
            error = IntegrityError if failed.integrity else BlobError
            raise error(digest, final, len(tries.failures))
        return tries.delay(self._jitter(), wait=failed.wait)

    async def _watched(self, run: Callable[[_Watch], Coroutine[Any, Any, None]]) -> tuple[float, int]:
        """One try, watched for stalls and slowness; returns its duration and the bytes it received."""
        now = self._clock()
        watch = _Watch(started=now, last_read=now)
        stream = asyncio.create_task(run(watch))
        try:
            while True:
                done, _ = await asyncio.wait({stream}, timeout=self.settings.check_interval)
                if done:
                    stream.result()
                    return self._clock() - watch.started, watch.received
                self._check(watch)
        finally:
            stream.cancel()
            # Wait for the stream even if it already ended: an error it ended with while this attempt was being
            # cancelled must be collected here, or asyncio reports it as never retrieved.
            await asyncio.wait({stream})
            if not stream.cancelled():
                stream.exception()

    def _check(self, watch: _Watch) -> None:
        if watch.throttled or watch.received_all:
            return
        now = self._clock()
        silent = now - watch.last_read
        if silent >= self.settings.stall_timeout:
            # A stalled token service counts against the attempts, as it does for the manifest: unlike a blob's
            # server, it has no bytes in flight that a free retry could continue.
            kind = FailureKind.STALL if self.registry.awaited_token_service() is None else FailureKind.FAILURE
            raise _AttemptFailed(self.registry.stall_reason(silent), kind)
        elapsed = now - watch.started
        median = self.speeds.median()
        if elapsed >= self.settings.slow_grace and median is not None:
            speed = watch.received / elapsed
            if speed < self.settings.slow_fraction * median:
                raise _AttemptFailed(
                    f"slow: {format_rate(speed)} is below {self.settings.slow_fraction:.0%} of the median "
                    f"{format_rate(median)}",
                    FailureKind.SLOW,
                )

    async def _stream_whole(
        self,
        reference: ModelReference,
        blob: BlobFile,
        state: _BlobState,
        model: str,
        watch: _Watch,
        write_back: _WriteBack,
        probe: bool,
    ) -> None:
        layer = blob.layer

        def landed() -> None:
            write_back.landed(blob.offset)
            self._report(state, model, blob.offset)

        try:
            async with self.registry.stream_blob(reference, layer.digest, offset=blob.offset) as response:
                if response.status_code == 200 and blob.offset:
                    # The server ignored our Range and sends the whole blob: start over rather than append to the
                    # prefix.
                    blob.restart()
                await self._receive(
                    response,
                    watch,
                    layer.size - blob.offset,
                    blob.write_all,
                    landed,
                    too_much=f"the server sent more than the manifest's {layer.size} bytes",
                    probe=_LinkProbe() if probe else None,
                )
        except httpx2.RequestError as exc:
            raise _AttemptFailed(describe_transport_error(exc)) from exc
        except TokenServiceError as exc:
            raise _AttemptFailed(str(exc)) from exc
        except UnusableBlobResponse as exc:
            raise _AttemptFailed(exc.reason, integrity=exc.integrity, restart=exc.restart, wait=exc.wait) from exc
        if blob.offset < layer.size:
            # Not corruption: the bytes so far may be good, and a resumable blob continues from them.
            raise _AttemptFailed(f"the body ended after {blob.offset} of {layer.size} bytes")
        mismatch = blob.mismatch()
        if mismatch is not None:
            raise _AttemptFailed(mismatch, integrity=True, restart=True)

    async def _stream_chunk(self, run: _ChunkRun, chunk: Chunk, watch: _Watch) -> None:
        blob = run.blob
        digest = blob.layer.digest
        start = blob.position(chunk)
        try:
            async with self.registry.stream_blob(run.reference, digest, offset=start, end=chunk.end) as response:
                if response.status_code != 206:
                    raise _RangesIgnored
                await self._receive(
                    response,
                    watch,
                    chunk.end - start,
                    lambda pieces: blob.write(chunk, pieces),
                    lambda: self._report(run.state, run.model, blob.received),
                    too_much=f"the server sent more than the {chunk.end - start} bytes asked for",
                )
        except httpx2.RequestError as exc:
            raise _AttemptFailed(describe_transport_error(exc)) from exc
        except TokenServiceError as exc:
            raise _AttemptFailed(str(exc)) from exc
        except UnusableBlobResponse as exc:
            raise _AttemptFailed(exc.reason, integrity=exc.integrity, restart=exc.restart, wait=exc.wait) from exc
        if blob.position(chunk) < chunk.end:
            got = blob.position(chunk) - start
            raise _AttemptFailed(f"the body ended after {got} of {chunk.end - start} bytes")

    async def _receive(
        self,
        response: httpx2.Response,
        watch: _Watch,
        room: int,
        write: Callable[[Pieces], None],
        landed: Callable[[], None],
        *,
        too_much: str,
        probe: _LinkProbe | None = None,
    ) -> None:
        """Write a response's raw body, at most ``room`` bytes of it, keeping the watchdog and the limiter fed.
        With a ``probe``, raise :class:`_SplitWanted` as soon as the link is found slower than the stream.

        Writing (and hashing, for a blob in one stream) happens in a worker thread, a batch at a time, while the
        event loop reads the next batch: file writes cost about as much CPU as receiving, and the thread runs them
        on another core. One batch is in flight per stream, so memory stays bounded.
        """
        drain = response.extensions.get(DRAIN)
        # A body that declares more than there is room for is read as it arrives, like one that declares nothing:
        # what comes decides between too many bytes (an integrity failure) and a connection closed early, whatever
        # the body's length.
        if isinstance(drain, Drain) and self._limiter is None and drain.length <= room:
            await self._drain(drain, watch, write, landed, probe=probe)
            return
        if probe is not None:
            # No drain to judge the link (a redirect to TLS, say, or a body longer than the blob): the rest comes in
            # chunks.
            raise _SplitWanted
        batch: list[bytes] = []
        batched = 0
        writing: asyncio.Future[None] | None = None
        handed = self._clock()

        async def hand_over(writer: Callable[[list[bytes]], None]) -> None:
            nonlocal batch, batched, writing, handed
            if writing is not None:
                await asyncio.shield(writing)
                landed()
            # The batch leaves our hands before any await: cancelled from here on, it is the thread's to write.
            writing = in_thread(writer, batch)
            batch, batched, handed = [], 0, self._clock()

        try:
            async for data in response.aiter_raw():
                self._took(watch, len(data))
                if len(data) > room:
                    raise _AttemptFailed(too_much, integrity=True, restart=True)
                room -= len(data)
                batch.append(data)
                batched += len(data)
                if batched >= _WRITE_BATCH or watch.last_read - handed >= _WRITE_DELAY:
                    await hand_over(write)
                if self._limiter is not None:
                    watch.throttled = True
                    await self._limiter.take(len(data))
                    watch.throttled = False
                    watch.last_read = self._clock()
            watch.received_all = True
            if batch:
                await hand_over(write)
            if writing is not None:
                await asyncio.shield(writing)
            landed()
        finally:
            # Never leave a write running behind the caller's back: it closes or restarts the file next.
            if writing is not None and not writing.done():
                await asyncio.wait({writing})
            written = writing is None or (not writing.cancelled() and writing.exception() is None)
            if batch and written:
                # Bytes received before a failure or a cancel are as good as any: keep them for the resume.
                write(batch)

    def _took(self, watch: _Watch, count: int) -> None:
        """``count`` bytes of a body have arrived: the watchdog and the pull's tally hear of them."""
        watch.last_read = self._clock()
        watch.received += count
        self._downloaded_bytes += count

    async def _drain(
        self,
        drain: Drain,
        watch: _Watch,
        write: Callable[[Pieces], None],
        landed: Callable[[], None],
        *,
        probe: _LinkProbe | None,
    ) -> None:
        """A body written straight from the socket by a thread, not the event loop (:mod:`ollama_pull.drain`); what
        it receives reaches the watchdog and the progress a tenth of a second at a time."""

        def received(count: int) -> None:
            self._took(watch, count)
            landed()
            if probe is not None and probe.link_is_slower(drain.elapsed, drain.waited):
                raise _SplitWanted

        await drain.into(write, received)
        watch.received_all = True


def first_error(failures: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error to report from a TaskGroup: one of ours if any (a bug's exception is never hidden)."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [failures]
    while pending:
        item = pending.pop(0)
        if isinstance(item, BaseExceptionGroup):
            pending.extend(item.exceptions)
        else:
            leaves.append(item)
    if all(isinstance(leaf, OllamaPullError | _RangesIgnored) for leaf in leaves):
        return leaves[0]
    return failures
