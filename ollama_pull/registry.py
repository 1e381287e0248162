"""The registry client: manifests and blob streams over the OCI distribution v2 API."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import httpx2

from .credentials import PASSWORD_VARIABLE, USERNAME_VARIABLE
from .errors import AuthenticationError, ClientTooOld, InvalidManifest, ModelNotFound, RegistryError
from .manifest import MANIFEST_MEDIA_TYPE, MAX_MANIFEST_BYTES, Manifest, parse_manifest
from .reference import ModelReference
from .retry import RETRYABLE_STATUS, Backoff, describe_transport_error, retry_after


class RegistryClient:
    """Talks to the registry a reference names; knows URLs, status codes and retries, nothing of the store.

    With a ``mirror`` (a registry mirror such as a pull-through cache), every request goes to the mirror first
    and falls back to the origin when the mirror cannot answer it. A mirror that is down (a network error or a
    5xx) is left alone for the rest of the pull, so a dead mirror costs one failed request, not one per blob.
    """

    def __init__(
        self,
        client: httpx2.AsyncClient,
        *,
        insecure: bool = False,
        attempts: int = 6,
        backoff: Backoff = Backoff(),
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
        mirror: str | None = None,
    ) -> None:
        self.client = client
        self.scheme = "http" if insecure else "https"
        self.mirror = mirror.rstrip("/") if mirror else None
        self.mirror_failure: str | None = None
        self.attempts = attempts
        self.backoff = backoff
        self._sleep = sleep
        self._jitter = jitter

    def repository_url(self, reference: ModelReference) -> str:
        return f"{self.scheme}://{reference.host}/v2/{reference.repository}"

    def _mirror_url(self, reference: ModelReference) -> str | None:
        return None if self.mirror is None or self.mirror_failure else f"{self.mirror}/v2/{reference.repository}"

    def _mirror_failed(self, reason: str, *, down: bool) -> None:
        if down:
            self.mirror_failure = reason

    async def fetch_manifest(self, reference: ModelReference) -> Manifest:
        """Fetch and validate the manifest, retrying 429, 5xx and network failures with backoff."""
        mirror = self._mirror_url(reference)
        if mirror is not None:
            try:
                async with self.client.stream(
                    "GET", f"{mirror}/manifests/{reference.tag}", headers={"Accept": MANIFEST_MEDIA_TYPE}
                ) as response:
                    if response.status_code == 200:
                        return await _read_manifest(response, reference)
                    self._mirror_failed(f"HTTP {response.status_code}", down=response.status_code >= 500)
            except httpx2.RequestError as exc:
                self._mirror_failed(describe_transport_error(exc), down=True)
            except InvalidManifest:
                # A mirror that serves a bad manifest is no reason to fail: the origin may serve a good one.
                self._mirror_failed("invalid manifest", down=False)
        url = f"{self.repository_url(reference)}/manifests/{reference.tag}"
        reason = ""
        for attempt in range(1, self.attempts + 1):
            wait: float | None = None
            try:
                async with self.client.stream("GET", url, headers={"Accept": MANIFEST_MEDIA_TYPE}) as response:
                    if response.status_code == 200:
                        return await _read_manifest(response, reference)
                    _raise_for_manifest_status(response, reference)
                    reason = f"HTTP {response.status_code}"
                    wait = retry_after(response)
            except httpx2.RequestError as exc:
                reason = describe_transport_error(exc)
            except _DigestMismatch as exc:
                # Bytes changed in transit (a proxy, a flaky link): the next attempt may get them whole.
                reason = str(exc)
            if attempt < self.attempts:
                await self._sleep(max(wait or 0.0, self.backoff.delay(attempt, self._jitter())))
        raise RegistryError(
            f"cannot fetch the manifest of {reference.short} from {reference.host}: {reason} "
            f"(tried {self.attempts} times)"
        )

    @asynccontextmanager
    async def stream_blob(
        self, reference: ModelReference, digest: str, *, offset: int = 0, end: int | None = None
    ) -> AsyncIterator[httpx2.Response]:
        """Open a blob's bytes from ``offset`` (up to ``end``, exclusive, if given); the caller judges the status
        and reads the raw body."""
        # Blobs are hashed as stored: ask for no content coding, and the engine reads the raw bytes.
        headers = {"Accept-Encoding": "identity"}
        if end is not None:
            headers["Range"] = f"bytes={offset}-{end - 1}"
        elif offset:
            headers["Range"] = f"bytes={offset}-"
        mirror = self._mirror_url(reference)
        if mirror is not None:
            # Only opening the mirror's response may fall back; a failure while the caller reads it is an
            # ordinary failed attempt, which the engine retries (through the mirror again).
            stack = AsyncExitStack()
            try:
                response = await stack.enter_async_context(
                    self.client.stream("GET", f"{mirror}/blobs/{digest}", headers=headers)
                )
            except httpx2.RequestError as exc:
                self._mirror_failed(describe_transport_error(exc), down=True)
            else:
                if response.status_code in (200, 206):
                    async with stack:
                        yield response
                    return
                await stack.aclose()
                self._mirror_failed(f"HTTP {response.status_code}", down=response.status_code >= 500)
        async with self.client.stream("GET", f"{self.repository_url(reference)}/blobs/{digest}", headers=headers) as r:
            yield r


def _raise_for_manifest_status(response: httpx2.Response, reference: ModelReference) -> None:
    """Raise the final error a manifest status means; return when the status is worth retrying."""
    status = response.status_code
    if status == 404:
        raise ModelNotFound(reference.short)
    if status in (401, 403):
        sent = response.request.headers.get("Authorization", "").split(" ", 1)[0].lower()
        if sent == "basic":
            hint = "the credentials were refused: check them"
        elif sent == "bearer":
            hint = "the token it issued does not grant access: the model may be private, or the credentials wrong"
        else:
            hint = f"it wants credentials: set {USERNAME_VARIABLE} and {PASSWORD_VARIABLE}, or use docker login"
        raise AuthenticationError(
            f"the registry {reference.host} refused access to {reference.short} (HTTP {status}): {hint}"
        )
    if status == 412:
        raise ClientTooOld(reference.short)
    if status not in RETRYABLE_STATUS:
        raise RegistryError(f"the registry {reference.host} answered HTTP {status} for {reference.short}")


async def _read_manifest(response: httpx2.Response, reference: ModelReference) -> Manifest:
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > MAX_MANIFEST_BYTES:
            raise InvalidManifest(reference.short, f"it is larger than {MAX_MANIFEST_BYTES} bytes")
    raw = bytes(body)
    announced = response.headers.get("Docker-Content-Digest", "")
    if announced.startswith("sha256:") and announced != "sha256:" + hashlib.sha256(raw).hexdigest():
        raise _DigestMismatch(f"the manifest's bytes do not match its Docker-Content-Digest {announced}")
    return parse_manifest(raw, model=reference.short)


class _DigestMismatch(Exception):
    """The manifest arrived, but not as the registry says it sent it."""
