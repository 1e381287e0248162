"""The library's front door: pull one model end to end (manifest, blobs, then the manifest file last).

:func:`resolve` answers what a pull would do without writing anything (``--dry-run``), :func:`pull` does it,
and :func:`verify` re-hashes a model already in the store against its manifest.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gc
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import httpx2

from .engine import Clock, Downloader, DownloadSettings, DownloadStats
from .errors import CorruptModel
from .events import (
    EventCallback,
    ManifestResolved,
    ManifestRetry,
    PullFinished,
    Resolving,
    WritingManifest,
    ignore_event,
)
from .manifest import Layer, Manifest
from .network import make_client
from .processes import Helper, HelperJob, divided, download_shared, helpers_for, start_helpers
from .reference import ModelReference, parse_reference
from .registry import RegistryClient
from .store import Store, open_store
from .worker import in_thread


@dataclass(frozen=True)
class Plan:
    """What a pull of one model has to do: the manifest, and which of its blobs the store already holds."""

    reference: ModelReference
    manifest: Manifest
    present: tuple[Layer, ...]
    missing: tuple[Layer, ...]

    @property
    def missing_bytes(self) -> int:
        return sum(layer.size for layer in self.missing)

    def event(self) -> ManifestResolved:
        return ManifestResolved(
            model=self.reference.short,
            digest=self.manifest.digest,
            blobs=len(self.manifest.blobs),
            total_bytes=self.manifest.total_size,
            present_blobs=len(self.present),
            present_bytes=sum(layer.size for layer in self.present),
        )


@dataclass(frozen=True)
class PullResult:
    reference: ModelReference
    manifest_digest: str
    manifest_path: Path
    total_bytes: int
    downloaded_bytes: int
    downloaded_blobs: int
    present_blobs: int
    seconds: float


class Puller:
    """What every pull into one store shares: the store, one HTTP client (one connection pool, one token cache),
    the registry client over it (with a ``mirror``, if any), the settings and the clock.

    Use it as an async context manager; a ``client`` passed in is used as is and left open, otherwise one is made
    (plain HTTP with ``insecure``, trusting the CA certificates in ``ca_cert`` besides the system's) and closed on
    exit. Several models pulled with one puller share its connections and tokens, and a blob two of them share is
    downloaded once.
    """

    def __init__(
        self,
        *,
        models_dir: str | Path | None = None,
        insecure: bool = False,
        settings: DownloadSettings = DownloadSettings(),
        client: httpx2.AsyncClient | None = None,
        mirror: str | None = None,
        ca_cert: str | Path | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.store = open_store(models_dir)
        self.settings = settings
        self._clock = clock
        self._own_client = client is None
        self._insecure = insecure
        self._mirror = mirror
        self._ca_cert = Path(ca_cert) if ca_cert is not None else None
        if client is None:
            client = make_client(insecure=insecure, concurrency=settings.concurrency, ca_cert=self._ca_cert)
        self.client = client
        self.registry = RegistryClient(
            client,
            insecure=insecure,
            attempts=settings.attempts,
            backoff=settings.backoff,
            mirror=mirror,
            stall_timeout=settings.stall_timeout,
        )

    def prepare(self, references: Iterable[str | ModelReference]) -> None:
        """Make now what pulling ``references`` needs at its first request: the TLS context, when the registry
        of one of them, or the mirror, is reached over HTTPS. A CA bundle that cannot be loaded is then a
        :class:`RegistryError` here, before any work, and processes forked afterwards have httpcore2 loaded
        already (each makes its own context). :meth:`pull` and :meth:`resolve` do it for their own reference."""
        self.registry.prepare_tls([_reference(reference) for reference in references])

    async def __aenter__(self) -> Puller:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self._own_client:
            await self.client.aclose()

    async def resolve(self, reference: str | ModelReference, *, on_event: EventCallback = ignore_event) -> Plan:
        """Fetch and validate the manifest and compare it with the store; write nothing."""
        ref = _reference(reference)
        self.prepare([ref])
        return _compare(ref, await self._fetch_manifest(ref, on_event), self.store)

    async def pull(self, reference: str | ModelReference, *, on_event: EventCallback = ignore_event) -> PullResult:
        """Pull ``reference`` into the store: every missing blob verified, then the manifest, written last.

        Raises a subclass of :class:`ollama_pull.errors.OllamaPullError` on any expected failure.
        """
        ref = _reference(reference)
        store = self.store
        started = self._clock()
        plan = await self.resolve(ref, on_event=on_event)
        store.check_space(plan.missing_bytes)
        store.prepare()
        async with store.store_lock(exclusive=False):
            # A prune may have run while we fetched the manifest: look at the store again under the lock.
            plan = _compare(ref, plan.manifest, store)
            on_event(plan.event())
            stats = await self._download(ref, plan.missing, on_event)
            on_event(WritingManifest(ref.short, str(store.manifest_path(ref))))
            path = store.write_manifest(ref, plan.manifest.raw)
        result = PullResult(
            reference=ref,
            manifest_digest=plan.manifest.digest,
            manifest_path=path,
            total_bytes=plan.manifest.total_size,
            downloaded_bytes=stats.downloaded_bytes,
            downloaded_blobs=stats.downloaded_blobs,
            present_blobs=len(plan.present),
            seconds=self._clock() - started,
        )
        on_event(
            PullFinished(
                model=ref.short,
                digest=result.manifest_digest,
                manifest_path=str(path),
                total_bytes=result.total_bytes,
                downloaded_bytes=result.downloaded_bytes,
                downloaded_blobs=result.downloaded_blobs,
                present_blobs=result.present_blobs,
                seconds=result.seconds,
            )
        )
        return result

    async def _download(
        self, ref: ModelReference, missing: tuple[Layer, ...], on_event: EventCallback
    ) -> DownloadStats:
        # A client of the caller's cannot be handed to another process.
        wanted = helpers_for(self.settings) if self._own_client else 0
        helpers = await start_helpers(wanted, missing)
        try:
            return await self._download_with(ref, missing, on_event, helpers)
        finally:
            for helper in helpers:
                await helper.close()

    async def _download_with(
        self, ref: ModelReference, missing: tuple[Layer, ...], on_event: EventCallback, helpers: list[Helper]
    ) -> DownloadStats:
        settings = divided(self.settings, len(helpers) + 1)
        downloader = Downloader(self.registry, self.store, settings=settings, on_event=on_event, clock=self._clock)
        if not helpers:
            return await downloader.download(ref, missing, model=ref.short)
        job = HelperJob(
            models_dir=self.store.root,
            insecure=self._insecure,
            settings=dataclasses.replace(settings, processes=1),
            mirror=self._mirror,
            ca_cert=self._ca_cert,
            reference=ref,
            model=ref.short,
            layers=missing,
            uvloop=type(asyncio.get_running_loop()).__module__.startswith("uvloop"),
            collector=gc.get_threshold(),
        )
        return await download_shared(downloader, job, helpers, on_event)

    async def _fetch_manifest(self, ref: ModelReference, on_event: EventCallback) -> Manifest:
        on_event(Resolving(ref.short))

        def retrying(attempt: int, reason: str, delay: float) -> None:
            on_event(ManifestRetry(ref.short, attempt, reason, delay))

        return await self.registry.fetch_manifest(ref, on_retry=retrying)


async def resolve(
    reference: str | ModelReference,
    *,
    models_dir: str | Path | None = None,
    insecure: bool = False,
    settings: DownloadSettings = DownloadSettings(),
    on_event: EventCallback = ignore_event,
    client: httpx2.AsyncClient | None = None,
    mirror: str | None = None,
    ca_cert: str | Path | None = None,
) -> Plan:
    """Fetch and validate the manifest and compare it with the store; write nothing. One :class:`Puller`'s
    :meth:`Puller.resolve`, for a single model."""
    puller = Puller(
        models_dir=models_dir, insecure=insecure, settings=settings, client=client, mirror=mirror, ca_cert=ca_cert
    )
    async with puller:
        return await puller.resolve(reference, on_event=on_event)


async def pull(
    reference: str | ModelReference,
    *,
    models_dir: str | Path | None = None,
    insecure: bool = False,
    settings: DownloadSettings = DownloadSettings(),
    on_event: EventCallback = ignore_event,
    client: httpx2.AsyncClient | None = None,
    clock: Clock = time.monotonic,
    mirror: str | None = None,
    ca_cert: str | Path | None = None,
) -> PullResult:
    """Pull ``reference`` into the Ollama store at ``models_dir`` (default: ``$OLLAMA_MODELS``): one
    :class:`Puller`'s :meth:`Puller.pull`, for a single model (see :class:`Puller` for the options).

    Raises a subclass of :class:`ollama_pull.errors.OllamaPullError` on any expected failure.
    """
    puller = Puller(
        models_dir=models_dir,
        insecure=insecure,
        settings=settings,
        client=client,
        mirror=mirror,
        ca_cert=ca_cert,
        clock=clock,
    )
    async with puller:
        return await puller.pull(reference, on_event=on_event)


async def verify(reference: str | ModelReference, *, models_dir: str | Path | None = None) -> Manifest:
    """Re-hash every blob of a model in the store; raise :class:`CorruptModel` naming each bad one.

    Bad blobs are removed, so that the next pull downloads them again instead of skipping them for their size.
    """
    ref = _reference(reference)
    store = open_store(models_dir)
    manifest = store.load_manifest(ref)
    # hashlib releases the GIL on large buffers: a few threads re-hash several blobs at once.
    limit = asyncio.Semaphore(4)
    problems: dict[str, str] = {}
    # Cancelled (Ctrl-C), the hashing threads stop too, at their next read, instead of hashing on for nobody.
    stop = threading.Event()

    async def check(layer: Layer) -> None:
        async with limit:
            reason = await in_thread(functools.partial(store.check_blob, layer, stop=stop))
        if reason is not None:
            problems[layer.digest] = reason

    try:
        async with asyncio.TaskGroup() as group:
            for layer in manifest.blobs:
                group.create_task(check(layer))
    finally:
        stop.set()
    if problems:
        for digest in problems:
            store.blob_path(digest).unlink(missing_ok=True)
        raise CorruptModel(ref.short, problems)
    return manifest


def _reference(reference: str | ModelReference) -> ModelReference:
    return reference if isinstance(reference, ModelReference) else parse_reference(reference)


def _compare(ref: ModelReference, manifest: Manifest, store: Store) -> Plan:
    # One look per blob. Sorting them by looking each up in the tuple of those present took 0.9 s for a model of
    # 4,096 blobs, all present.
    present: list[Layer] = []
    missing: list[Layer] = []
    for layer in manifest.blobs:
        (present if store.has_blob(layer) else missing).append(layer)
    return Plan(reference=ref, manifest=manifest, present=tuple(present), missing=tuple(missing))
