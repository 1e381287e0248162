"""The registry client: manifests and blob streams over the OCI distribution v2 API."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, TypeVar

import httpx2

from .auth import UNKNOWN, RegistryAuth
from .credentials import PASSWORD_VARIABLE, USERNAME_VARIABLE
from .drain import SUPPORTED
from .errors import (
    AuthenticationError,
    ClientTooOld,
    InvalidManifest,
    ModelNotFound,
    RegistryError,
    TokenServiceError,
)
from .huggingface import is_hugging_face, rate_limited_message, refused_message
from .manifest import MANIFEST_MEDIA_TYPE, MAX_MANIFEST_BYTES, Manifest, parse_manifest
from .network import DirectTransport, PullClient
from .reference import ModelReference
from .retry import (
    RETRYABLE_STATUS,
    Backoff,
    FailureKind,
    RetryBudget,
    describe_transport_error,
    is_tls_mistake,
    retry_after,
)

T = TypeVar("T")


# A registry or token service that takes the request and then says nothing, again and again, is down for now:
# three silent attempts are enough to say so, about half a minute with the default --stall-timeout. Two stalls
# are retried; the third ends the fetch.
MANIFEST_STALL_RETRIES = 2


class BlobGets:
    """Blob GETs sent straight to the client's transport, with the client's policy done once, here.

    ``AsyncClient.stream`` runs, for every request, the auth flow, the redirect loop, cookie extraction (which
    builds urllib ``Request`` objects) and URL merging: about a fifth of the event loop's time on a model of a
    few thousand small blobs (bench/PROFILE.md). A blob GET needs little of that: the registry's cached
    ``Authorization`` value (or the token preset for the host, or none for a repository that answered without
    one), a redirect or two with the header dropped when the host changes (as httpx2 does), no cookies. Anything
    else (a repository not heard from yet, a 401 that wants a token, a client that holds cookies) goes through
    the client.
    """

    def __init__(self, client: httpx2.AsyncClient, transport: httpx2.AsyncBaseTransport, auth: RegistryAuth) -> None:
        self._client = client
        self._transport = transport
        self._auth = auth

    async def send(self, url: str, headers: dict[str, str]) -> httpx2.Response | None:
        """The open response (the caller closes it), or None when only the client can send this request."""
        client = self._client
        if client.cookies:
            # A registry that set cookies may want them back: the client's own path sends them.
            return None
        target = httpx2.URL(url)
        authorization = self._auth.cached_header(target)
        if authorization is UNKNOWN:
            # The first request to a repository: the auth flow learns what it wants (and bounds its tries).
            return None
        extensions = {"timeout": client.timeout.as_dict()}
        for _hop in range(client.max_redirects + 1):
            request = httpx2.Request("GET", target, headers=client.headers, extensions=extensions)
            request.headers.update(headers)
            if authorization is not None:
                request.headers["Authorization"] = authorization
            response = await self._transport.handle_async_request(request)
            response.request = request
            if response.status_code == 401:
                # A token to refresh: the auth flow's job. That costs the one refused request on top of its tries.
                await response.aclose()
                return None
            if not response.has_redirect_location:
                return response
            await response.aclose()
            location = target.join(response.headers["Location"])
            if location.scheme not in ("http", "https"):
                raise httpx2.UnsupportedProtocol(f"redirected to a {location.scheme!r} URL", request=request)
            if (location.scheme, location.host, location.port) != (target.scheme, target.host, target.port):
                # The registry's token is for the registry: a CDN never sees it.
                authorization = None
            target = location
        raise httpx2.TooManyRedirects(f"more than {client.max_redirects} redirects", request=request)


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
        stall_timeout: float = 10.0,
    ) -> None:
        self.client = client
        self.stall_timeout = stall_timeout
        self.scheme = "http" if insecure else "https"
        self.mirror = mirror.rstrip("/") if mirror else None
        self.mirror_failure: str | None = None
        self.attempts = attempts
        self.backoff = backoff
        self._sleep = sleep
        self._jitter = jitter
        transport = client.blob_transport if isinstance(client, PullClient) else None
        auth = client.auth
        self._blob_gets = BlobGets(client, transport, auth) if transport and isinstance(auth, RegistryAuth) else None
        # Our own transport, when the client has it: what drains bodies and makes its TLS context when asked.
        self._direct = transport if isinstance(transport, DirectTransport) else None

    def repository_url(self, reference: ModelReference) -> str:
        return f"{reference.scheme or self.scheme}://{reference.host}/v2/{reference.repository}"

    def awaited_token_service(self) -> str | None:
        """The host of the token service a token request is waiting on now, if any."""
        auth = self.client.auth
        return auth.awaiting if isinstance(auth, RegistryAuth) else None

    def stall_reason(self, silent: float) -> str:
        """Why an attempt that received nothing for ``silent`` seconds is aborted, naming the token service when
        a token request is what it waits for."""
        service = self.awaited_token_service()
        return f"stalled: no data for {silent:.1f}s" + (f" from the token service at {service}" if service else "")

    def drains_blobs(self, reference: ModelReference) -> bool:
        """Whether the bodies of the repository's blobs can come through a drain (:mod:`ollama_pull.drain`): our
        own transport, to a registry (and mirror) over plain HTTP, such as a cache host next to the machine."""
        return SUPPORTED and self._direct is not None and not self.uses_tls(reference)

    def uses_tls(self, reference: ModelReference) -> bool:
        """Whether the repository's registry, or the mirror asked first, is reached over anything but plain
        HTTP."""
        urls = [self.repository_url(reference), self._mirror_url(reference) or ""]
        return any(url and not url.startswith("http://") for url in urls)

    def prepare_tls(self, references: Iterable[ModelReference]) -> None:
        """Make the TLS context of our transport now, not at its first TLS connection, when one of
        ``references`` is reached over TLS at once: a CA bundle that cannot be loaded is then a
        :class:`RegistryError` before the first request, and processes forked afterwards have httpcore2 loaded
        already (each makes its own context). Through a proxy it was made with the client."""
        if self._direct is not None and any(self.uses_tls(reference) for reference in references):
            self._direct.tls_context()

    def _mirror_url(self, reference: ModelReference) -> str | None:
        return None if self.mirror is None or self.mirror_failure else f"{self.mirror}/v2/{reference.repository}"

    async def _ask_mirror(
        self, reference: ModelReference, ask: Callable[[str], Awaitable[T | httpx2.Response]]
    ) -> T | None:
        """Ask the mirror, if there is one still up, with ``ask`` (which answers a response it could not use as
        such): what it got, or None, the reason recorded, when the origin must answer instead."""
        mirror = self._mirror_url(reference)
        if mirror is None:
            return None
        try:
            got = await ask(mirror)
        except httpx2.RequestError as exc:
            self._mirror_failed(describe_transport_error(exc), down=True)
            return None
        except (_Stalled, TokenServiceError) as exc:
            self._mirror_failed(str(exc), down=True)
            return None
        except InvalidManifest:
            # A mirror that serves a bad manifest is no reason to fail: the origin may serve a good one.
            self._mirror_failed("invalid manifest", down=False)
            return None
        if isinstance(got, httpx2.Response):
            self._mirror_failed(f"HTTP {got.status_code}", down=got.status_code >= 500)
            return None
        return got

    def _mirror_failed(self, reason: str, *, down: bool) -> None:
        if down:
            self.mirror_failure = reason

    async def fetch_manifest(
        self, reference: ModelReference, *, on_retry: Callable[[int, str, float], None] | None = None
    ) -> Manifest:
        """Fetch and validate the manifest, retrying stalls, 429, 5xx, network and token service failures with
        backoff; ``on_retry`` hears of each failure that will be retried (failures so far, reason, delay)."""
        mirrored = await self._ask_mirror(
            reference,
            lambda mirror: self._unstalled(
                lambda seen: self._open_manifest(f"{mirror}/manifests/{reference.tag}", reference, seen)
            ),
        )
        if mirrored is not None:
            return mirrored
        url = f"{self.repository_url(reference)}/manifests/{reference.tag}"
        # Every failure counts, stalls too: a manifest has no bytes in flight that a free retry could continue.
        budget = RetryBudget(self.attempts, backoff=self.backoff, max_stalls=MANIFEST_STALL_RETRIES, free_stalls=False)
        unreachable = False
        while True:
            wait: float | None = None
            limited: httpx2.Request | None = None
            kind = FailureKind.FAILURE
            try:
                got = await self._unstalled(lambda seen: self._open_manifest(url, reference, seen))
                if isinstance(got, Manifest):
                    return got
                _raise_for_manifest_status(got, reference)
                reason = f"HTTP {got.status_code}"
                wait = retry_after(got)
                if got.status_code == 429:
                    limited = got.request
            except httpx2.RequestError as exc:
                reason = describe_transport_error(exc)
                if is_tls_mistake(exc):
                    raise RegistryError(f"cannot fetch the manifest of {reference.name}: {reason}") from exc
                unreachable = isinstance(exc, httpx2.ConnectError | httpx2.ConnectTimeout)
            except (_DigestMismatch, _Stalled, TokenServiceError) as exc:
                # A token service down for now, or bytes changed in transit (a proxy, a flaky link): the next
                # attempt may do better.
                reason = str(exc)
                if isinstance(exc, _Stalled):
                    kind = FailureKind.STALL
            if budget.charge(kind, reason) is not None:
                break
            delay = budget.delay(self._jitter(), wait=wait)
            if on_retry is not None:
                on_retry(len(budget.failures), reason, delay)
            await self._sleep(delay)
        attempt = len(budget.failures)
        if limited is not None and is_hugging_face(reference.host):
            sent = "Authorization" in limited.headers
            raise RegistryError(rate_limited_message(reference.name, attempt, token_sent=sent))
        hint = "; check the network connection, or set HTTPS_PROXY if you are behind a proxy" if unreachable else ""
        raise RegistryError(
            f"cannot fetch the manifest of {reference.name} from {reference.host}: {reason} "
            f"(tried {attempt} times){hint}"
        )

    async def _open_manifest(
        self, url: str, reference: ModelReference, seen: Callable[[], None]
    ) -> Manifest | httpx2.Response:
        """One manifest request: the manifest, or the response (body unread) when the status is not 200."""
        async with self.client.stream("GET", url, headers={"Accept": MANIFEST_MEDIA_TYPE}) as response:
            seen()
            if response.status_code == 200:
                return await _read_manifest(response, reference, seen)
            return response

    async def _unstalled(self, request: Callable[[Callable[[], None]], Coroutine[Any, Any, T]]) -> T:
        """Run ``request``, aborted with :class:`_Stalled` once nothing has arrived for ``stall_timeout``; it
        calls the function it is given whenever something does."""
        loop = asyncio.get_running_loop()
        last = loop.time()

        def seen() -> None:
            nonlocal last
            last = loop.time()

        task = asyncio.ensure_future(request(seen))
        try:
            while not task.done():
                silent = loop.time() - last
                if silent >= self.stall_timeout:
                    # Asked before the task is cancelled: the cancel ends the token request.
                    raise _Stalled(self.stall_reason(silent))
                await asyncio.wait({task}, timeout=self.stall_timeout - silent)
            return task.result()
        finally:
            task.cancel()
            # Collected even when it already ended, so that an error it ended with is never reported as lost.
            await asyncio.wait({task})
            if not task.cancelled():
                task.exception()

    @asynccontextmanager
    async def stream_blob(
        self, reference: ModelReference, digest: str, *, offset: int = 0, end: int | None = None
    ) -> AsyncIterator[httpx2.Response]:
        """Open a blob's bytes from ``offset`` (up to ``end``, exclusive, if given), judged before any byte is read
        (see :class:`UnusableBlobResponse`); the caller reads the raw body, and tells a 200 from a 206."""
        # Blobs are hashed as stored: ask for no content coding, and the engine reads the raw bytes.
        headers = {"Accept-Encoding": "identity"}
        if end is not None:
            headers["Range"] = f"bytes={offset}-{end - 1}"
        elif offset:
            headers["Range"] = f"bytes={offset}-"

        async def open_on(mirror: str) -> tuple[AsyncExitStack, httpx2.Response] | httpx2.Response:
            stack = AsyncExitStack()
            response = await stack.enter_async_context(self._get(f"{mirror}/blobs/{digest}", headers))
            if response.status_code in (200, 206):
                return stack, response
            await stack.aclose()
            return response

        # Only opening the mirror's response may fall back; a failure while the caller reads it is an ordinary
        # failed attempt, which the engine retries (through the mirror again).
        mirrored = await self._ask_mirror(reference, open_on)
        if mirrored is not None:
            stack, response = mirrored
            async with stack:
                _judge_blob_response(response, digest, offset)
                yield response
            return
        async with self._get(f"{self.repository_url(reference)}/blobs/{digest}", headers) as response:
            _judge_blob_response(response, digest, offset)
            yield response

    @asynccontextmanager
    async def _get(self, url: str, headers: dict[str, str]) -> AsyncIterator[httpx2.Response]:
        response = None if self._blob_gets is None else await self._blob_gets.send(url, headers)
        if response is None:
            async with self.client.stream("GET", url, headers=headers) as response:
                yield response
            return
        try:
            yield response
        finally:
            await response.aclose()


class UnusableBlobResponse(Exception):
    """A blob response whose bytes must not be written: the attempt failed, and says how to go on.

    ``restart``: the bytes so far cannot be continued (start at 0); ``integrity``: what the server sends is not the
    blob as stored; ``wait``: seconds the server asked for (``Retry-After``).
    """

    def __init__(
        self, reason: str, *, restart: bool = False, integrity: bool = False, wait: float | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.restart = restart
        self.integrity = integrity
        self.wait = wait


def _judge_blob_response(response: httpx2.Response, digest: str, start: int) -> None:
    """Judge a blob response's status and headers before any byte of it is written."""
    status = response.status_code
    if status in (401, 403):
        raise AuthenticationError(f"the registry refused access to blob {digest} (HTTP {status})")
    if status == 416:
        raise UnusableBlobResponse("the server cannot resume this blob (HTTP 416)", restart=True)
    if status not in (200, 206):
        raise UnusableBlobResponse(f"HTTP {status}", wait=retry_after(response))
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnusableBlobResponse(f"the server compressed the blob (Content-Encoding: {encoding})", integrity=True)
    if status == 206:
        first = response.headers.get("Content-Range", "").removeprefix("bytes ").split("-", 1)[0]
        if first != str(start):
            raise UnusableBlobResponse(
                f"the server resumed at the wrong offset ({first or '?'}, not {start})", restart=True
            )


def auth_hint(response: httpx2.Response) -> str:
    """What to do about a 401 or 403, judged by what the refused request carried."""
    sent = response.request.headers.get("Authorization", "").split(" ", 1)[0].lower()
    if sent == "basic":
        return "the credentials were refused: check them"
    if sent == "bearer":
        return "the token it issued does not grant access: the model may be private, or the credentials wrong"
    return f"it wants credentials: set {USERNAME_VARIABLE} and {PASSWORD_VARIABLE}, or use docker login"


def _raise_for_manifest_status(response: httpx2.Response, reference: ModelReference) -> None:
    """Raise the final error a manifest status means; return when the status is worth retrying."""
    status = response.status_code
    if status == 404:
        raise ModelNotFound(reference.name)
    if status in (401, 403):
        sent = response.request.headers.get("Authorization", "").split(" ", 1)[0].lower()
        if is_hugging_face(reference.host):
            raise AuthenticationError(refused_message(reference, status, token_sent=bool(sent)))
        raise AuthenticationError(
            f"the registry {reference.host} refused access to {reference.name} (HTTP {status}): {auth_hint(response)}"
        )
    if status == 412:
        raise ClientTooOld(reference.name)
    if status not in RETRYABLE_STATUS:
        raise RegistryError(f"the registry {reference.host} answered HTTP {status} for {reference.name}")


async def _read_manifest(response: httpx2.Response, reference: ModelReference, seen: Callable[[], None]) -> Manifest:
    body = bytearray()
    async for chunk in response.aiter_bytes():
        seen()
        body += chunk
        if len(body) > MAX_MANIFEST_BYTES:
            raise InvalidManifest(reference.name, f"it is larger than {MAX_MANIFEST_BYTES} bytes")
    raw = bytes(body)
    announced = response.headers.get("Docker-Content-Digest", "")
    if announced.startswith("sha256:") and announced != "sha256:" + hashlib.sha256(raw).hexdigest():
        raise _DigestMismatch(f"the manifest's bytes do not match its Docker-Content-Digest {announced}")
    return parse_manifest(raw, model=reference.name)


class _DigestMismatch(Exception):
    """The manifest arrived, but not as the registry says it sent it."""


class _Stalled(Exception):
    """A manifest request (or its token request) received nothing for the stall timeout."""
