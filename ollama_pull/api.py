"""The library's front door: pull one model end to end (manifest, blobs, then the manifest file last).

:func:`resolve` answers what a pull would do without writing anything (``--dry-run``), :func:`pull` does it,
and :func:`verify` re-hashes a model already in the store against its manifest.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx2

from .engine import Clock, Downloader, DownloadSettings
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
from .reference import ModelReference, parse_reference
from .registry import RegistryClient
from .store import Store, open_store


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
    """Fetch and validate the manifest and compare it with the store; write nothing."""
    ref = _reference(reference)
    async with _client(client, insecure, settings, ca_cert) as http:
        registry = _registry(http, insecure, settings, mirror)
        return await _plan(ref, open_store(models_dir), registry, on_event)


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
    """Pull ``reference`` into the Ollama store at ``models_dir`` (default: ``$OLLAMA_MODELS``).

    Pass ``client`` to reuse one HTTP client across pulls (it is then left open); otherwise one is made and
    closed here, trusting the CA certificates in ``ca_cert`` besides the public ones. With ``mirror`` (a
    registry mirror's base URL), requests try the mirror before the origin. ``insecure`` means plain HTTP.
    Raises a subclass of :class:`ollama_pull.errors.OllamaPullError` on any expected failure.
    """
    ref = _reference(reference)
    store = open_store(models_dir)
    async with _client(client, insecure, settings, ca_cert) as http:
        started = clock()
        registry = _registry(http, insecure, settings, mirror)
        plan = await _plan(ref, store, registry, on_event)
        store.check_space(plan.missing_bytes)
        store.prepare()
        async with store.store_lock(exclusive=False):
            # A prune may have run while we fetched the manifest: look at the store again under the lock.
            plan = _compare(ref, plan.manifest, store)
            on_event(plan.event())
            downloader = Downloader(registry, store, settings=settings, on_event=on_event, clock=clock)
            stats = await downloader.download(ref, plan.missing, model=ref.short)
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
        seconds=clock() - started,
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
    # Cancelled (Ctrl-C), the hashing threads must stop too: the process waits for its threads before it exits.
    stop = threading.Event()

    async def check(layer: Layer) -> None:
        async with limit:
            reason = await asyncio.to_thread(store.check_blob, layer, stop=stop)
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


@asynccontextmanager
async def _client(
    client: httpx2.AsyncClient | None, insecure: bool, settings: DownloadSettings, ca_cert: str | Path | None
) -> AsyncIterator[httpx2.AsyncClient]:
    """The caller's client, left open; or one of our own, closed after use."""
    if client is not None:
        yield client
        return
    cert = Path(ca_cert) if ca_cert is not None else None
    async with make_client(insecure=insecure, concurrency=settings.concurrency, ca_cert=cert) as own:
        yield own


def _registry(
    client: httpx2.AsyncClient, insecure: bool, settings: DownloadSettings, mirror: str | None
) -> RegistryClient:
    return RegistryClient(
        client,
        insecure=insecure,
        attempts=settings.attempts,
        backoff=settings.backoff,
        mirror=mirror,
        stall_timeout=settings.stall_timeout,
    )


async def _plan(ref: ModelReference, store: Store, registry: RegistryClient, on_event: EventCallback) -> Plan:
    on_event(Resolving(ref.short))

    def retrying(attempt: int, reason: str, delay: float) -> None:
        on_event(ManifestRetry(ref.short, attempt, reason, delay))

    return _compare(ref, await registry.fetch_manifest(ref, on_retry=retrying), store)


def _compare(ref: ModelReference, manifest: Manifest, store: Store) -> Plan:
    present = tuple(layer for layer in manifest.blobs if store.has_blob(layer))
    missing = tuple(layer for layer in manifest.blobs if layer not in present)
    return Plan(reference=ref, manifest=manifest, present=present, missing=missing)
