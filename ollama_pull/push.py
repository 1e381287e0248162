"""Push a model into a registry with the OCI distribution push API: how a fleet behind an air gap gets one internal
registry (the CNCF distribution registry, Harbor, Artifactory) that every runner pulls from.

The model comes from the store or from a bundle (see :mod:`ollama_pull.bundle`). Blobs the registry already has
(``HEAD``) are skipped; when the model's own name is on the same registry, a missing blob is first offered as a
cross-repository mount, which costs no upload. The rest go up monolithically (``POST`` then ``PUT ?digest=``), or,
from :data:`CHUNKED_MIN_SIZE` on, in ``PATCH`` chunks that proxies with a body limit let through. The manifest goes
up last, and only when the registry does not already hold exactly it: a second push sends only ``HEAD`` requests.
Authentication is the pull's (:class:`ollama_pull.auth.RegistryAuth`): Bearer tokens, Basic, docker's config.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2

from .bundle import LAYOUT_FILE, open_bundle, read_range
from .errors import (
    AuthenticationError,
    IncompleteModel,
    IntegrityError,
    OllamaPullError,
    RegistryError,
    StorageError,
)
from .events import (
    BlobFinished,
    BlobMounted,
    BlobProgress,
    BlobRetry,
    BlobStarted,
    EventCallback,
    PushFinished,
    PushPlanned,
    ignore_event,
)
from .manifest import Layer, Manifest
from .network import make_client
from .reference import ModelReference, parse_reference
from .registry import RegistryClient, auth_hint
from .retry import RETRYABLE_STATUS, Backoff, describe_transport_error, retry_after
from .store import Store, finished_in_thread, open_store

MIB = 1024 * 1024
# Blobs at least this big go up in chunks of CHUNK_SIZE: a reverse proxy in front of a registry often caps a
# request body (nginx's client_max_body_size). A failed upload starts over in a new session.
CHUNKED_MIN_SIZE = 256 * MIB
CHUNK_SIZE = 64 * MIB
_OCTETS = "application/octet-stream"


@dataclass(frozen=True)
class PushSettings:
    concurrency: int = 4
    attempts: int = 3
    backoff: Backoff = Backoff()
    chunked_min_size: int = CHUNKED_MIN_SIZE
    chunk_size: int = CHUNK_SIZE


@dataclass(frozen=True)
class PushResult:
    reference: ModelReference
    source: str
    manifest_digest: str
    uploaded_blobs: int
    uploaded_bytes: int
    mounted_blobs: int
    present_blobs: int
    manifest_uploaded: bool
    seconds: float
    dry_run: bool

    def event(self) -> PushFinished:
        return PushFinished(
            model=self.reference.short,
            digest=self.manifest_digest,
            uploaded_blobs=self.uploaded_blobs,
            uploaded_bytes=self.uploaded_bytes,
            mounted_blobs=self.mounted_blobs,
            present_blobs=self.present_blobs,
            manifest_uploaded=self.manifest_uploaded,
            seconds=self.seconds,
        )


Chunks = Callable[[Layer, int, int], Iterator[bytes]]


@dataclass(frozen=True)
class PushSource:
    """What to push: a manifest, where its blobs' bytes are, and the model's own name (for mounts); ``store``
    when the bytes come from the store, which is then locked against a prune while they are read."""

    label: str
    reference: ModelReference
    manifest: Manifest
    chunks: Chunks
    store: Store | None = None


def push_source(
    source: str | Path | ModelReference, *, model: str | None = None, models_dir: str | Path | None = None
) -> PushSource:
    """``source`` as a bundle when it is a tar file or a directory holding an OCI layout (``model`` picks one of
    its models), else as the name of a model in the store."""
    path = None if isinstance(source, ModelReference) else Path(source)
    if path is not None and (path.is_file() or (path / LAYOUT_FILE).is_file()):
        bundle = open_bundle(path)
        chosen = bundle.select(model)
        return PushSource(
            bundle.label,
            chosen.reference,
            chosen.manifest,
            lambda layer, start, length: bundle.chunks(layer.digest, start, length),
        )
    reference = source if isinstance(source, ModelReference) else parse_reference(str(source))
    store = open_store(models_dir)
    manifest = store.load_manifest(reference)
    missing = tuple(layer.digest for layer in manifest.blobs if not store.has_blob(layer))
    if missing:
        raise IncompleteModel(reference.name, missing)

    def chunks(layer: Layer, start: int, length: int) -> Iterator[bytes]:
        try:
            yield from read_range(store.blob_path(layer.digest), start, length)
        except EOFError as exc:
            raise StorageError(f"cannot read blob {layer.digest} of {reference.name}: {exc}") from exc

    return PushSource(reference.short, reference, manifest, chunks, store)


async def push(
    source: str | Path | ModelReference | PushSource,
    destination: str | ModelReference,
    *,
    model: str | None = None,
    models_dir: str | Path | None = None,
    insecure: bool = False,
    ca_cert: str | Path | None = None,
    settings: PushSettings = PushSettings(),
    client: httpx2.AsyncClient | None = None,
    on_event: EventCallback = ignore_event,
    dry_run: bool = False,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> PushResult:
    """Copy a model (from the store, or from a bundle) to ``destination`` (``host/namespace/model:tag``).

    ``insecure`` (or an ``http://`` destination) means plain HTTP; ``ca_cert`` adds a CA to the public ones, as
    for a pull; a ``client`` passed in is used as is and left open. With ``dry_run``, only asks the registry which
    blobs it has and reports the plan. Raises
    :class:`AuthenticationError` when the registry refuses us, :class:`RegistryError` for any other refusal.
    """
    started = time.monotonic()
    chosen = source if isinstance(source, PushSource) else push_source(source, model=model, models_dir=models_dir)
    target = destination if isinstance(destination, ModelReference) else parse_reference(destination)
    cert = Path(ca_cert) if ca_cert is not None else None
    own = contextlib.nullcontext(client) if client is not None else make_client(insecure=insecure, ca_cert=cert)
    store = chosen.store
    locked = store.store_lock(exclusive=False) if store is not None else contextlib.nullcontext()
    async with locked, own as http:
        pusher = _Pusher(http, chosen, target, insecure=insecure, settings=settings, on_event=on_event, sleep=sleep)
        return await pusher.run(dry_run=dry_run, started=started)


class _Pusher:
    def __init__(
        self,
        http: httpx2.AsyncClient,
        source: PushSource,
        target: ModelReference,
        *,
        insecure: bool,
        settings: PushSettings,
        on_event: EventCallback,
        sleep: Callable[[float], Awaitable[None]],
    ) -> None:
        self.http = http
        self.source = source
        self.target = target
        registry = RegistryClient(http, insecure=insecure)
        self.base = registry.repository_url(target)
        # A CA bundle that cannot be loaded is an error now, before the first request.
        registry.prepare_tls([target])
        self.settings = settings
        self.on_event = on_event
        self._sleep = sleep
        same_registry = source.reference.host == target.host and source.reference.repository != target.repository
        self.mount_from = source.reference.repository if same_registry else None
        self.uploaded_blobs = 0
        self.uploaded_bytes = 0
        self.mounted_blobs = 0

    async def run(self, *, dry_run: bool, started: float) -> PushResult:
        manifest = self.source.manifest
        limit = asyncio.Semaphore(self.settings.concurrency)
        present: set[str] = set()

        async def check(layer: Layer) -> None:
            async with limit:
                if await self._has_blob(layer):
                    present.add(layer.digest)

        await self._each(check, manifest.blobs)
        missing = [layer for layer in manifest.blobs if layer.digest not in present]
        self.on_event(
            PushPlanned(
                model=self.target.short,
                source=self.source.label,
                digest=manifest.digest,
                blobs=len(manifest.blobs),
                total_bytes=manifest.total_size,
                present_blobs=len(present),
                present_bytes=sum(layer.size for layer in manifest.blobs if layer.digest in present),
                mountable_blobs=len(missing) if self.mount_from else 0,
                dry_run=dry_run,
            )
        )
        manifest_uploaded = False
        if not dry_run:

            async def send(layer: Layer) -> None:
                async with limit:
                    await self._send_blob(layer)

            await self._each(send, missing)
            manifest_uploaded = await self._send_manifest()
        result = PushResult(
            reference=self.target,
            source=self.source.label,
            manifest_digest=manifest.digest,
            uploaded_blobs=self.uploaded_blobs,
            uploaded_bytes=self.uploaded_bytes,
            mounted_blobs=self.mounted_blobs,
            present_blobs=len(present),
            manifest_uploaded=manifest_uploaded,
            seconds=time.monotonic() - started,
            dry_run=dry_run,
        )
        if not dry_run:
            self.on_event(result.event())
        return result

    @staticmethod
    async def _each(work: Callable[[Layer], Coroutine[Any, Any, None]], layers: Sequence[Layer]) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                for layer in layers:
                    group.create_task(work(layer))
        except* OllamaPullError as failures:
            # One meaningful error, not a group; anything else (a bug) stays in its group and is not hidden.
            raise failures.exceptions[0] from None

    async def _request(self, method: str, url: str | httpx2.URL, what: str, **options: object) -> httpx2.Response:
        """One request with the pull's retry rules for 429, 5xx and network failures (bodies are not retried:
        callers that send one retry the whole step)."""
        reason = ""
        for attempt in range(1, self.settings.attempts + 1):
            wait: float | None = None
            try:
                response = await self.http.request(method, url, **options)  # type: ignore[arg-type]
            except httpx2.RequestError as exc:
                reason = describe_transport_error(exc)
            else:
                if response.status_code not in RETRYABLE_STATUS:
                    return response
                reason, wait = f"HTTP {response.status_code}", retry_after(response)
            if attempt < self.settings.attempts:
                await self._sleep(max(wait or 0.0, self.settings.backoff.delay(attempt, random.random())))
        raise RegistryError(
            f"cannot {what} for {self.target.name} on {self.target.host}: {reason} "
            f"(tried {self.settings.attempts} times)"
        )

    async def _has_blob(self, layer: Layer) -> bool:
        response = await self._request("HEAD", f"{self.base}/blobs/{layer.digest}", f"check blob {layer.digest}")
        if response.status_code == 200:
            return True
        if response.status_code == 404:
            return False
        raise self._refused(response, f"a check of blob {layer.digest}")

    async def _send_blob(self, layer: Layer) -> None:
        state = _Progress(self.target.short, layer, self.on_event)
        for attempt in range(1, self.settings.attempts + 1):
            try:
                await self._try_blob(layer, state)
                return
            except _UploadFailed as exc:
                if attempt == self.settings.attempts:
                    raise RegistryError(
                        f"cannot upload blob {layer.digest} to {self.target.host}: {exc} "
                        f"(tried {self.settings.attempts} times)"
                    ) from exc
                delay = max(exc.wait or 0.0, self.settings.backoff.delay(attempt, random.random()))
                self.on_event(BlobRetry(self.target.short, layer.digest, attempt, str(exc), delay))
                await self._sleep(delay)

    async def _try_blob(self, layer: Layer, state: _Progress) -> None:
        params = {"mount": layer.digest, "from": self.mount_from} if self.mount_from else None
        session = await self._request(
            "POST", f"{self.base}/blobs/uploads/", f"start an upload of {layer.digest}", params=params
        )
        if session.status_code == 201 and self.mount_from:
            self.mounted_blobs += 1
            self.on_event(BlobMounted(self.target.short, layer.digest, layer.size, self.mount_from))
            return
        if session.status_code != 202:
            raise self._refused(session, f"an upload of blob {layer.digest}")
        location = _location(session)
        state.start()
        if layer.size >= self.settings.chunked_min_size:
            start = 0
            while start < layer.size:
                length = min(self.settings.chunk_size, layer.size - start)
                headers = {
                    "Content-Type": _OCTETS,
                    "Content-Length": str(length),
                    "Content-Range": f"{start}-{start + length - 1}",
                }
                answer = await self._send("PATCH", location, layer, start, length, headers, state)
                if answer.status_code != 202:
                    raise self._upload_error(answer, layer)
                location = _location(answer)
                start += length
            final = await self._send(
                "PUT", location.copy_merge_params({"digest": layer.digest}), layer, 0, 0, {}, state
            )
        else:
            headers = {"Content-Type": _OCTETS, "Content-Length": str(layer.size)}
            final = await self._send("PUT", _with_digest(location, layer), layer, 0, layer.size, headers, state)
        if final.status_code != 201:
            raise self._upload_error(final, layer)
        self.uploaded_blobs += 1
        self.uploaded_bytes += layer.size
        state.finish()

    async def _send(
        self,
        method: str,
        url: httpx2.URL,
        layer: Layer,
        start: int,
        length: int,
        headers: dict[str, str],
        state: _Progress,
    ) -> httpx2.Response:
        content = _body(self.source.chunks(layer, start, length), state) if length else b""
        try:
            return await self.http.request(method, url, content=content, headers=headers)
        except (httpx2.RequestError, httpx2.StreamError) as exc:
            # A stream error: the registry challenged us again mid-push and httpx2 cannot replay the body.
            raise _UploadFailed(
                describe_transport_error(exc) if isinstance(exc, httpx2.RequestError) else str(exc)
            ) from exc

    def _upload_error(self, response: httpx2.Response, layer: Layer) -> Exception:
        code, _ = _oci_error(response)
        if code == "DIGEST_INVALID" or code == "SIZE_INVALID":
            return IntegrityError(layer.digest, f"the registry says its bytes are not the digest's ({code})", 1)
        if response.status_code in RETRYABLE_STATUS:
            return _UploadFailed(f"HTTP {response.status_code}", retry_after(response))
        return self._refused(response, f"an upload of blob {layer.digest}")

    async def _send_manifest(self) -> bool:
        """PUT the manifest unless the registry holds exactly these bytes under the tag already."""
        manifest = self.source.manifest
        media_type = manifest.media_type
        url = f"{self.base}/manifests/{self.target.tag}"
        held = await self._request("HEAD", url, "check the manifest", headers={"Accept": media_type})
        if held.status_code == 200 and held.headers.get("Docker-Content-Digest") == manifest.digest:
            return False
        if held.status_code in (401, 403):
            raise self._refused(held, "a check of the manifest")
        answer = await self._request(
            "PUT", url, "upload the manifest", content=manifest.raw, headers={"Content-Type": media_type}
        )
        if answer.status_code != 201:
            raise self._refused(answer, "the manifest")
        return True

    def _refused(self, response: httpx2.Response, what: str) -> OllamaPullError:
        status = response.status_code
        if status in (401, 403):
            return AuthenticationError(
                f"the registry {self.target.host} refused to take {what} for {self.target.name} (HTTP {status}): "
                f"{auth_hint(response)}"
            )
        code, message = _oci_error(response)
        detail = f": {code} {message}".rstrip() if code else ""
        return RegistryError(
            f"the registry {self.target.host} refused {what} for {self.target.name} (HTTP {status}{detail})"
        )


class _UploadFailed(Exception):
    """One upload attempt failed in a way worth another try."""

    def __init__(self, reason: str, wait: float | None = None) -> None:
        super().__init__(reason)
        self.wait = wait


class _Progress:
    """One blob's upload progress: it only grows, even when an attempt starts over."""

    def __init__(self, model: str, layer: Layer, on_event: EventCallback) -> None:
        self.model = model
        self.layer = layer
        self.on_event = on_event
        self.started = 0.0
        self.sent = 0
        self.best = 0

    def start(self) -> None:
        if not self.started:
            self.started = time.monotonic()
            self.on_event(BlobStarted(self.model, self.layer.digest, self.layer.label, self.layer.size, 0))
        self.sent = 0

    def advance(self, count: int) -> None:
        self.sent += count
        if self.sent > self.best:
            self.best = self.sent
            self.on_event(BlobProgress(self.model, self.layer.digest, self.best, self.layer.size))

    def finish(self) -> None:
        self.on_event(BlobFinished(self.model, self.layer.digest, self.layer.size, time.monotonic() - self.started))


async def _body(chunks: Iterator[bytes], state: _Progress) -> AsyncIterator[bytes]:
    """A request body read from disk in a worker thread, a chunk at a time, so the loop never blocks on it."""
    try:
        # Waited for even when cancelled: closing the generator while the thread is inside it would fail.
        while (chunk := await finished_in_thread(lambda: next(chunks, None))) is not None:
            state.advance(len(chunk))
            yield chunk
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def _with_digest(location: httpx2.URL, layer: Layer) -> httpx2.URL:
    """The upload's URL with ``?digest=``, beside the registry's own state parameters."""
    return location.copy_merge_params({"digest": layer.digest})


def _location(response: httpx2.Response) -> httpx2.URL:
    location = response.headers.get("Location")
    if not location:
        raise RegistryError(f"the registry answered HTTP {response.status_code} without a Location for the upload")
    return response.url.join(location)


def _oci_error(response: httpx2.Response) -> tuple[str, str]:
    """The first ``errors[]`` entry of an OCI error body: its code and message, or empty strings."""
    try:
        errors = json.loads(response.content).get("errors")
        first = errors[0]
        return str(first.get("code", "")), str(first.get("message", ""))[:200]
    except (ValueError, AttributeError, TypeError, IndexError, KeyError, httpx2.ResponseNotRead):
        return "", ""
