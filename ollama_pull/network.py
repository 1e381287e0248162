"""How bytes reach us: our transport, over our connection pool, on asyncio's own transports.

httpcore2's default backend goes through anyio, and every read pays for it: a cancel scope for the timeout, a
checkpoint that costs a turn of the event loop even when data is already waiting, exception mapping, and a
split of anything above 64 KiB. On a 1 GiB blob that was the largest cost left on the event loop (see
bench/PROFILE.md). Here the event loop's transport buffers what arrives, and a read hands over what is buffered
without waiting at all, one received chunk at a time.

httpx2's own transport has no parameter for the network backend, so ``DirectTransport`` does what it does
with public API only: it owns the pool, builds the pool's request from httpx2's, and httpx2's response from the
pool's. The pool, its connections and this backend fail with httpx2's exceptions, so nothing here imports
httpcore2: 25-33 ms of the start-up of a pull over plain HTTP, where httpx2 itself loads it only to make a TLS
context or a transport of its own (through a proxy); the context is made when the first TLS connection, or a
pull that needs one at once, asks for it. A ruff banned-api rule keeps it out of the package.
``make_client`` builds the client a pull uses: TLS, proxies and the choice of transport.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import urllib.request
import warnings
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import Any, cast

import httpx2

from . import __version__
from .auth import RegistryAuth
from .errors import RegistryError
from .http1 import URL, Request
from .huggingface import HuggingFaceToken
from .pool import ConnectionPool

# Reading stops while more than this is buffered and unread, and starts again once the reader has taken it all:
# it bounds each connection's buffer at this plus one read of the transport (256 KiB). Stopping at 64 KiB
# paused and resumed the socket after nearly every read, two epoll_ctl calls that were a fifth of the event
# loop's time on a 1 GiB blob (256 KiB: big 2.27 s -> 2.15 s, many 1.56 s -> 1.40 s, 4 alternated runs each).
# Since reads reach the reader whole and the body path has fewer hops, 128 KiB is no slower than 256 KiB (big
# x0.983, many x1.007 in one process, x0.960 with a forked helper, many at 20 MB/s per connection x0.969; 5-6
# alternated runs each) and holds 5-10 MiB less: many with a helper peaked at 74-78 MiB against 83-89 MiB.
_PAUSE_AT = 128 * 1024


class _Receiver(asyncio.Protocol):
    """A connection's inbound side: what the transport received and the stream has not read yet."""

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._ended = False
        self._error: Exception | None = None
        self._transport: asyncio.Transport | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream's transport, as the protocol's place in create_connection() makes it; not asserted, since
        # uvloop's transports have asyncio.Transport's methods without being its subclasses.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > _PAUSE_AT and not self._reading_paused:
            self._pause()
        self._wake()

    def eof_received(self) -> bool:
        self._ended = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended = True
        self._error = exc
        self._writing_paused = False
        self._wake()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake()

    def lend(self) -> list[bytes]:
        """Stop reading the connection for someone who reads its socket itself; what was received is theirs."""
        self._pause()
        chunks = list(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return chunks

    def take_back(self) -> None:
        self._resume()

    def _pause(self) -> None:
        if not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()

    def _resume(self) -> None:
        if self._reading_paused and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()

    def switch(self, transport: asyncio.Transport) -> None:
        """Follow the connection onto a TLS transport, which delivers here from now on."""
        self._transport = transport

    @property
    def readable(self) -> bool:
        """Whether a read would return at once: data, or the end of the connection, is waiting."""
        return bool(self._chunks) or self._ended

    @property
    def writing_paused(self) -> bool:
        return self._writing_paused

    def take(self) -> bytes:
        """The oldest received chunk, whole; b"" at a clean end. A connection lost with an error raises it,
        but only after everything received before it has been read."""
        if self._chunks:
            data = self._chunks.popleft()
            self._buffered -= len(data)
            if self._reading_paused and not self._chunks:
                self._resume()
            return data
        if self._error is not None:
            raise httpx2.ReadError(str(self._error) or type(self._error).__name__) from self._error
        return b""

    async def changed(self, timeout: float | None, timed_out: type[httpx2.TimeoutException]) -> None:
        """Wait until data, the end of the connection, or room to write arrives; ``timed_out`` after ``timeout``."""
        # A connection carries one request at a time, reading or writing: there is one waiter at most. A plain
        # timer, not asyncio.timeout(), whose task bookkeeping on every wait was 5% of the event loop's time on a
        # 1 GiB blob.
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, _expire, waiter, timed_out, timeout)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


def _after(timeout: float | None) -> str:
    """How long a wait that timed out lasted, for its message. The message of a ``TimeoutError`` that came with
    no timeout of ours set is the kernel's (ETIMEDOUT), so the callers prefer an exception's own message."""
    return "" if timeout is None else f" after {timeout:g} s"


def _expire(waiter: asyncio.Future[None], timed_out: type[httpx2.TimeoutException], timeout: float) -> None:
    if not waiter.done():
        waiter.set_exception(timed_out(f"timed out{_after(timeout)}"))


class AsyncioStream:
    """One connection, plain or TLS, as our connections use it (:class:`ollama_pull.http1.Stream`). A plain one
    lends its socket to a body's drain (:mod:`ollama_pull.drain`)."""

    def __init__(self, transport: asyncio.Transport, receiver: _Receiver, *, plain: bool = True) -> None:
        self._transport = transport
        self._receiver = receiver
        self.plain = plain

    def lend(self) -> tuple[list[bytes], int]:
        if not self.plain:
            raise RuntimeError("a TLS connection's socket carries ciphertext")
        # A connection the server has closed already has no descriptor (-1): what it sent is all there is.
        sock = self._transport.get_extra_info("socket")
        return self._receiver.lend(), -1 if sock is None else sock.fileno()

    def take_back(self) -> None:
        self._receiver.take_back()

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        # ``max_bytes`` (our connections ask for 64 KiB) is taken as a hint: a received chunk, at most the 256 KiB
        # the transport reads at once, is handed over whole. Splitting it would only add trips through the
        # framing for the same bytes, and those trips are the cost this backend exists to cut.
        if not self._receiver.readable:
            await self._receiver.changed(timeout, httpx2.ReadTimeout)
        return self._receiver.take()

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if self._transport.is_closing():
            raise httpx2.WriteError("the connection is closed")
        self._transport.write(buffer)
        while self._receiver.writing_paused and not self._transport.is_closing():
            await self._receiver.changed(timeout, httpx2.WriteTimeout)

    async def aclose(self) -> None:
        self._transport.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> AsyncioStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport = await loop.start_tls(
                    self._transport, self._receiver, ssl_context, server_hostname=server_hostname
                )
        except TimeoutError as exc:
            self._transport.abort()
            raise httpx2.ConnectTimeout(str(exc) or f"no TLS handshake{_after(timeout)}") from exc
        except (OSError, EOFError) as exc:
            self._transport.abort()
            raise httpx2.ConnectError(str(exc) or type(exc).__name__) from exc
        if transport is None:
            raise httpx2.ConnectError("the connection closed during the TLS handshake")
        self._receiver.switch(transport)
        return AsyncioStream(transport, self._receiver, plain=False)

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            # Asked before an idle connection is reused: readable then means the server closed it.
            return self._receiver.readable
        return self._transport.get_extra_info({"client_addr": "sockname", "server_addr": "peername"}.get(info, info))


class AsyncioBackend:
    """Connections on the running event loop's transports (:class:`ollama_pull.http1.Backend`)."""

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None) -> AsyncioStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport, receiver = await loop.create_connection(_Receiver, host, port)
        except TimeoutError as exc:
            raise httpx2.ConnectTimeout(str(exc) or f"no connection{_after(timeout)}") from exc
        except OSError as exc:
            raise httpx2.ConnectError(str(exc) or type(exc).__name__) from exc
        return AsyncioStream(transport, receiver)


class _ResponseStream(httpx2.AsyncByteStream):
    """A response body of another stream type, as httpx2's responses take one: respx's, where it stands in for
    the pool in tests. Our connections' bodies are httpx2's type already."""

    def __init__(self, stream: AsyncIterable[bytes]) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        aclose = getattr(self._stream, "aclose", None)
        if aclose is not None:
            await aclose()


class DirectTransport(httpx2.AsyncBaseTransport):
    """httpx2's transport API over our connection pool (:mod:`ollama_pull.pool`) on ``AsyncioBackend``."""

    # httpx2's default: an idle connection older than this may have been dropped by the server.
    KEEPALIVE_EXPIRY = 5.0

    def __init__(self, connections: int, *, verify: bool | ssl.SSLContext, ca_cert: Path | None = None) -> None:
        self._verify = verify
        self._ca_cert = ca_cert
        self._ssl_context: ssl.SSLContext | None = None
        self.pool = ConnectionPool(
            size=connections,
            ssl_context=self.tls_context,
            keepalive_expiry=self.KEEPALIVE_EXPIRY,
            backend=AsyncioBackend(),
        )

    def tls_context(self) -> ssl.SSLContext:
        """The TLS context, made the first time it is asked for: at the first TLS connection, or before it
        (:meth:`ollama_pull.registry.RegistryClient.prepare_tls`). Making one imports httpcore2 and, to verify,
        loads the system's CAs: 35-70 ms of start-up that a pull over plain HTTP has no use for
        (bench/PROFILE.md). ``ca_cert`` is trusted besides those. A CA bundle or certificate that cannot be
        loaded is a :class:`RegistryError` that says which, before any connection is opened, and not an httpx2
        error: a pull would retry that, and no retry can get past it."""
        if self._ssl_context is None:
            context = _tls_context(self._verify, self._ca_cert)
            # Our connections speak HTTP/1.1 only; a server must not pick h2 for them.
            context.set_alpn_protocols(["http/1.1"])
            self._ssl_context = context
        return self._ssl_context

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        assert isinstance(request.stream, httpx2.AsyncByteStream)
        url = request.url
        ours = Request(
            request.method.encode("ascii"),
            URL(url.raw_scheme, url.raw_host, url.port, url.raw_path),
            request.headers.raw,
            request.stream,
            request.extensions,
        )
        response = await self.pool.handle_async_request(ours)
        stream = response.stream
        return httpx2.Response(
            status_code=response.status,
            headers=response.headers,
            # Every level of async generators costs each piece of a body a resumption.
            stream=stream if isinstance(stream, httpx2.AsyncByteStream) else _ResponseStream(stream),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self.pool.aclose()


def __getattr__(name: str) -> object:
    if name == "ShardedTransport":
        warnings.warn(
            "ollama_pull.network.ShardedTransport is now DirectTransport; the old name goes in 0.3",
            DeprecationWarning,
            stacklevel=2,
        )
        return DirectTransport
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


USER_AGENT = f"ollama-pull/{__version__}"


def make_client(
    *,
    insecure: bool = False,
    concurrency: int = 64,
    read_timeout: float = 60.0,
    ca_cert: Path | None = None,
    transport: httpx2.AsyncBaseTransport | None = None,
) -> httpx2.AsyncClient:
    """The HTTP client a pull uses: registry auth, redirects followed, enough connections for every download.

    httpx2 drops the ``Authorization`` header on a redirect to another host, so a CDN never sees the registry's
    token. The read timeout only backs up the engine's own stall detection for sockets that go silent.
    ``transport`` is the seam for tests (``httpx2.MockTransport``) and for custom networking. Proxies come from
    ``HTTP(S)_PROXY``/``ALL_PROXY``/``NO_PROXY``, through httpx2. The CAs trusted are httpx2's: the operating
    system's store (OpenSSL's on Linux, through truststore on macOS and Windows), or instead the bundle that
    ``SSL_CERT_FILE`` (or the directory ``SSL_CERT_DIR``) names; ``ca_cert`` adds a CA to those. Our transport
    loads them for its first TLS connection, or when :meth:`DirectTransport.tls_context` is asked first.
    """
    chosen = transport or _direct_transport(concurrency + 4, verify=not insecure, ca_cert=ca_cert)
    # Through a proxy httpx2 builds its transports itself, and they take the context now.
    verify = _tls_context(True, ca_cert) if chosen is None and not insecure else not insecure
    limits = httpx2.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    return PullClient(
        auth=RegistryAuth(preset=HuggingFaceToken()),
        follow_redirects=True,
        verify=verify,
        headers={"User-Agent": USER_AGENT},
        timeout=httpx2.Timeout(30.0, read=read_timeout, pool=None),
        limits=limits,
        transport=chosen,
    )


def _tls_context(verify: bool | ssl.SSLContext, ca_cert: Path | None) -> ssl.SSLContext:
    """httpx2's context for ``verify``, trusting ``ca_cert`` too when it verifies. A bundle that ``SSL_CERT_FILE``
    names and OpenSSL cannot load (the only way making httpx2's fails), or a ``ca_cert`` it cannot, is a
    :class:`RegistryError` that says which."""
    try:
        context = httpx2.create_ssl_context(verify=verify)
    except (OSError, ssl.SSLError) as exc:
        raise RegistryError(
            f"cannot use the CA certificates SSL_CERT_FILE names ({os.environ.get('SSL_CERT_FILE')}): {exc}; "
            "point SSL_CERT_FILE at a PEM bundle, or unset it"
        ) from exc
    if ca_cert is not None and verify is not False:
        try:
            context.load_verify_locations(cafile=ca_cert)
        except (OSError, ssl.SSLError) as exc:
            raise RegistryError(f"cannot use the CA certificate {ca_cert}: {exc}") from exc
    return context


class PullClient(httpx2.AsyncClient):
    """The client :func:`make_client` builds; it keeps the transport it was given, for ``registry.BlobGets``."""

    def __init__(self, *, transport: httpx2.AsyncBaseTransport | None, **options: Any) -> None:
        super().__init__(transport=transport, **options)
        self.blob_transport = transport


def _direct_transport(connections: int, *, verify: bool, ca_cert: Path | None) -> DirectTransport | None:
    """Our transport for direct connections; with a proxy in the environment, None, because httpx2 applies
    HTTP(S)_PROXY/ALL_PROXY/NO_PROXY only when it builds the transports itself."""
    proxies = urllib.request.getproxies()
    if any(proxies.get(scheme) for scheme in ("http", "https", "all")):
        return None
    return DirectTransport(connections, verify=verify, ca_cert=ca_cert)
