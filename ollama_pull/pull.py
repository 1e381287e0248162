"""Pull one model end to end: manifest, blobs, then the manifest file last. The library's front door."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from .engine import Clock, Downloader, DownloadSettings
from .events import EventCallback, ManifestResolved, PullFinished, ignore_event
from .reference import ModelReference, parse_reference
from .registry import RegistryClient, make_client
from .store import Store, default_models_dir


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


async def pull(
    reference: str | ModelReference,
    *,
    models_dir: Path | None = None,
    insecure: bool = False,
    settings: DownloadSettings = DownloadSettings(),
    on_event: EventCallback = ignore_event,
    client: httpx.AsyncClient | None = None,
    clock: Clock = time.monotonic,
) -> PullResult:
    """Pull ``reference`` into the Ollama store at ``models_dir`` (default: ``$OLLAMA_MODELS``).

    Pass ``client`` to reuse one HTTP client across pulls (it is then left open); otherwise one is made and
    closed here. Raises a subclass of :class:`ollama_pull.errors.OllamaPullError` on any expected failure.
    """
    ref = reference if isinstance(reference, ModelReference) else parse_reference(reference)
    store = Store(models_dir or default_models_dir())
    if client is None:
        async with make_client(insecure=insecure, concurrency=settings.concurrency) as own_client:
            return await _pull(ref, store, own_client, insecure, settings, on_event, clock)
    return await _pull(ref, store, client, insecure, settings, on_event, clock)


async def _pull(
    ref: ModelReference,
    store: Store,
    client: httpx.AsyncClient,
    insecure: bool,
    settings: DownloadSettings,
    on_event: EventCallback,
    clock: Clock,
) -> PullResult:
    started = clock()
    registry = RegistryClient(client, insecure=insecure, attempts=settings.attempts, backoff=settings.backoff)
    manifest = await registry.fetch_manifest(ref)
    store.prepare()
    blobs = manifest.blobs
    present = [layer for layer in blobs if store.has_blob(layer)]
    missing = [layer for layer in blobs if layer not in present]
    on_event(
        ManifestResolved(
            model=ref.short,
            digest=manifest.digest,
            blobs=len(blobs),
            total_bytes=manifest.total_size,
            present_blobs=len(present),
            present_bytes=sum(layer.size for layer in present),
        )
    )
    downloader = Downloader(registry, store, settings=settings, on_event=on_event, clock=clock)
    stats = await downloader.download(ref, missing, model=ref.short)
    path = store.write_manifest(ref, manifest.raw)
    result = PullResult(
        reference=ref,
        manifest_digest=manifest.digest,
        manifest_path=path,
        total_bytes=manifest.total_size,
        downloaded_bytes=stats.downloaded_bytes,
        downloaded_blobs=stats.downloaded_blobs,
        present_blobs=len(present),
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
