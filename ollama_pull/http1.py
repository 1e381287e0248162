"""HTTP/1.1 on one connection, as our pool (:mod:`ollama_pull.pool`) asks of a connection: h11's work, for what a
registry client sends and receives.

httpcore2's HTTP/1.1 connection runs every request through h11 (event objects, header validation, a receive
buffer) under two locks taken through anyio and sniffio. On a model of thousands of small blobs that was a fifth
of the event loop's time; on a 1 GiB blob h11's receive buffer copied every byte twice more on the loop's thread
(bench/PROFILE.md). A registry client's exchanges are plain: no upgrades, no pipelining, no ``Expect``. This
connection writes the request head at once and hands the response body over as the transport received it,
framed as RFC 9112 section 6 says: no body (HEAD, 1xx, 204, 304), chunked transfer coding, ``Content-Length``, or
everything until the server closes. A connection goes back to the pool only after a complete response that
leaves nothing unread; anything else closes it. The pool and its connections take a :class:`Request` and give a
:class:`Response` of their own, and fail with httpx2's exceptions, so that a pull that does not verify TLS
never loads httpcore2 (:mod:`ollama_pull.network`).
"""

from __future__ import annotations

import contextlib
import enum
import re
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

import httpx2

from .drain import DRAIN, DRAIN_MIN, SUPPORTED, Drain, Lender

# The most a response head may take, as h11 bounds it (its max_incomplete_event_size): a server that sends more
# without ending its head is not speaking HTTP.
MAX_HEAD = 100 * 1024
# A read asks the network stream for this much (ours hands over whatever one receive brought).
_READ = 64 * 1024

_STATUS_LINE = re.compile(rb"HTTP/(1\.[01]) ([0-9]{3})(?: (.*))?")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_HEX = re.compile(rb"[0-9A-Fa-f]+")


@dataclass(frozen=True)
class Origin:
    """Where a connection goes: a pool keeps connections to one origin apart from another's."""

    scheme: bytes
    host: bytes
    port: int

    def __str__(self) -> str:
        return f"{self.scheme.decode('ascii')}://{self.host.decode('ascii')}:{self.port}"


@dataclass(frozen=True)
class URL:
    """A request's URL in the pieces HTTP/1.1 sends; no port means the scheme's own."""

    scheme: bytes
    host: bytes
    port: int | None
    target: bytes

    @property
    def origin(self) -> Origin:
        return Origin(self.scheme, self.host, self.port or (443 if self.scheme == b"https" else 80))


@dataclass(slots=True, eq=False)
class Request:
    """A request as the pool and its connections take it: httpx2's, in bytes, with httpx2's extensions (the
    timeouts, ``sni_hostname``). It has the attributes of httpcore's request, so that respx's httpcore mocker
    can stand in for the pool in tests. Like a response, it is compared and hashed as itself, as any request
    object is."""

    method: bytes
    url: URL
    headers: list[tuple[bytes, bytes]]
    stream: AsyncIterable[bytes]
    extensions: dict[str, Any]


@dataclass(slots=True, eq=False)
class Response:
    """A response's status and headers, and its body (``stream``), which is read as it arrives."""

    status: int
    headers: list[tuple[bytes, bytes]]
    stream: AsyncIterable[bytes]
    extensions: dict[str, Any]


class Stream(Protocol):
    """A connection's bytes, plain or TLS (:class:`ollama_pull.network.AsyncioStream`). Failures are httpx2's
    exceptions: ``ReadError``, ``ReadTimeout`` and so on."""

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes: ...

    async def write(self, buffer: bytes, timeout: float | None = None) -> None: ...

    async def aclose(self) -> None: ...

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> Stream: ...

    def get_extra_info(self, info: str) -> Any: ...


class Backend(Protocol):
    """How a connection opens its stream (:class:`ollama_pull.network.AsyncioBackend`)."""

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None) -> Stream: ...


class _State(enum.Enum):
    NEW = "new"
    ACTIVE = "active"
    IDLE = "idle"
    CLOSED = "closed"


class Http1Connection:
    """One connection to one origin, plain or TLS, carrying one request at a time; ``returned`` is told each
    time a response's body is closed, when the connection has become idle or has closed."""

    def __init__(
        self,
        origin: Origin,
        *,
        ssl_context: Callable[[], ssl.SSLContext],
        keepalive_expiry: float | None,
        backend: Backend,
        returned: Callable[[Http1Connection], Awaitable[None]],
    ) -> None:
        self._origin = origin
        self._returned = returned
        self._ssl_context = ssl_context
        self._keepalive_expiry = keepalive_expiry
        self._backend = backend
        self._stream: Stream | None = None
        self._state = _State.NEW
        self._expire_at: float | None = None
        self._requests = 0

    async def handle_async_request(self, request: Request) -> Response:
        if request.url.origin != self._origin:
            raise RuntimeError(f"a request to {request.url.origin} on a connection to {self._origin}")
        # No await between the check and the claim: on one event loop nobody else can claim it in between.
        if self._state not in (_State.NEW, _State.IDLE):
            raise RuntimeError(f"a request on a connection that is {self._state.value}")
        self._state = _State.ACTIVE
        self._expire_at = None
        self._requests += 1
        timeouts = request.extensions.get("timeout", {})
        try:
            if self._stream is None:
                self._stream = await self._connect(request, timeouts.get("connect"))
            # A server may answer and close before it has read the whole request (a 401 or a 413 to an upload):
            # its response says more than the write error, so read it, as httpcore2 does.
            with contextlib.suppress(httpx2.WriteError):
                await _send(self._stream, request, timeouts.get("write"))
            head = await _Head.receive(self._stream, timeouts.get("read"))
            body = _Body(self, self._stream, request, head, timeouts.get("read"))
        except BaseException:
            await self.aclose()
            raise
        extensions: dict[str, object] = {"http_version": b"HTTP/" + head.version, "reason_phrase": head.reason}
        drain = body.drain()
        if drain is not None:
            extensions[DRAIN] = drain
        return Response(head.status, head.headers, body, extensions)

    async def _connect(self, request: Request, timeout: float | None) -> Stream:
        host = self._origin.host.decode("ascii")
        # The TLS context before the socket: making it may fail, and then there is no socket to close.
        context = self._ssl_context() if self._origin.scheme == b"https" else None
        stream = await self._backend.connect_tcp(host, self._origin.port, timeout=timeout)
        if context is None:
            return stream
        server_hostname = request.extensions.get("sni_hostname") or host
        try:
            return await stream.start_tls(context, server_hostname=server_hostname, timeout=timeout)
        except BaseException:
            await stream.aclose()
            raise

    async def response_closed(self, *, reusable: bool) -> None:
        """The response's body is closed: the connection waits for the next request, or closes."""
        if reusable and self._state is _State.ACTIVE:
            self._state = _State.IDLE
            if self._keepalive_expiry is not None:
                self._expire_at = time.monotonic() + self._keepalive_expiry
        else:
            await self.aclose()
        await self._returned(self)

    @property
    def origin(self) -> Origin:
        return self._origin

    async def aclose(self) -> None:
        self._state = _State.CLOSED
        if self._stream is not None:
            await self._stream.aclose()

    def has_expired(self) -> bool:
        if self._state is _State.CLOSED:
            return True
        if self._state is not _State.IDLE:
            return False
        if self._expire_at is not None and time.monotonic() > self._expire_at:
            return True
        # Idle and readable: the server closed it (or sent something unasked for); either way it is done.
        assert self._stream is not None
        return bool(self._stream.get_extra_info("is_readable"))

    def is_idle(self) -> bool:
        return self._state is _State.IDLE

    def is_closed(self) -> bool:
        return self._state is _State.CLOSED

    def __repr__(self) -> str:
        return f"<{type(self).__name__} [{self._origin}, HTTP/1.1, {self._state.name}, {self._requests} requests]>"


async def _send(stream: Stream, request: Request, timeout: float | None) -> None:
    """The request head in one write, then its body, framed as its headers say."""
    lines = [b"%s %s HTTP/1.1\r\n" % (request.method, request.url.target)]
    chunked = False
    declared: int | None = None
    for name, value in request.headers:
        if not _TOKEN.fullmatch(name) or b"\r" in value or b"\n" in value or b"\0" in value:
            raise httpx2.LocalProtocolError(f"an invalid request header: {name!r}")
        lowered = name.lower()
        if lowered == b"transfer-encoding":
            chunked = value.strip().lower().endswith(b"chunked")
        elif lowered == b"content-length":
            if not value.isdigit():
                raise httpx2.LocalProtocolError(f"an invalid Content-Length: {value!r}")
            declared = int(value)
        lines.append(b"%s: %s\r\n" % (name, value))
    lines.append(b"\r\n")
    await stream.write(b"".join(lines), timeout=timeout)
    assert isinstance(request.stream, AsyncIterable)
    sent = 0
    async for piece in request.stream:
        if not piece:
            continue
        sent += len(piece)
        if chunked:
            piece = b"%x\r\n%s\r\n" % (len(piece), piece)
        elif declared is None or sent > declared:
            raise httpx2.LocalProtocolError("a request body longer than its Content-Length, or without one")
        await stream.write(piece, timeout=timeout)
    if chunked:
        await stream.write(b"0\r\n\r\n", timeout=timeout)
    elif declared is not None and sent != declared:
        raise httpx2.LocalProtocolError(f"a request body of {sent} bytes for a Content-Length of {declared}")


class _Head:
    """A response's status line and headers, and the bytes that came after them."""

    __slots__ = ("headers", "reason", "rest", "status", "version")

    def __init__(
        self, version: bytes, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], rest: bytes
    ) -> None:
        self.version = version
        self.status = status
        self.reason = reason
        self.headers = headers
        self.rest = rest

    @classmethod
    async def receive(cls, stream: Stream, timeout: float | None) -> _Head:
        """The final response's head; informational (1xx) responses before it are read and passed over."""
        buffer = b""
        while True:
            head = await _read_head(stream, buffer, timeout)
            buffer = head.rest
            if head.status == 101:
                raise httpx2.RemoteProtocolError("the server switched protocols, which nobody asked it to")
            if head.status >= 200:
                return head


async def _read_head(stream: Stream, buffer: bytes, timeout: float | None) -> _Head:
    searched = 0
    while (end := _HEAD_END.search(buffer, searched)) is None:
        if len(buffer) > MAX_HEAD:
            raise httpx2.RemoteProtocolError(f"a response head of more than {MAX_HEAD} bytes")
        # A head's end may straddle two reads: search again from a little before the new bytes.
        searched = max(0, len(buffer) - 3)
        data = await stream.read(_READ, timeout=timeout)
        if not data:
            raise httpx2.RemoteProtocolError(
                "Server disconnected without sending a response." if not buffer else "the response head was cut short"
            )
        buffer += data
    lines = buffer[: end.start()].split(b"\n")
    status = _STATUS_LINE.fullmatch(lines[0].rstrip(b"\r"))
    if status is None:
        raise httpx2.RemoteProtocolError(f"not an HTTP/1.1 status line: {lines[0][:80]!r}")
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, colon, value = line.rstrip(b"\r").partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise httpx2.RemoteProtocolError(f"an invalid response header line: {line[:80]!r}")
        headers.append((name, value.strip(b" \t")))
    version, code, reason = status.groups()
    return _Head(version, int(code), reason or b"", headers, buffer[end.end() :])


class _Body(httpx2.AsyncByteStream):
    """A response body, handed over as it arrives; closing it gives the connection back or closes it. It is
    httpx2's stream type itself, so that the transport hands it over without a generator around it."""

    def __init__(
        self,
        connection: Http1Connection,
        stream: Stream,
        request: Request,
        head: _Head,
        timeout: float | None,
    ) -> None:
        self._connection = connection
        self._stream = stream
        self._timeout = timeout
        self._rest = head.rest
        self._complete = False
        self._closed = False
        codings = _values(head.headers, b"transfer-encoding")
        lengths = set(_values(head.headers, b"content-length"))
        self._length: int | None = None
        self._chunked = False
        keep_alive = head.version == b"1.1" and b"close" not in _values(head.headers, b"connection")
        self._reusable = keep_alive and b"close" not in _values(request.headers, b"connection")
        if request.method == b"HEAD" or head.status in (204, 304):
            self._length = 0
        elif codings:
            # Transfer-Encoding overrides Content-Length; a body whose last coding is not chunked runs to the close.
            self._chunked = codings[-1] == b"chunked"
            self._reusable = self._reusable and self._chunked and not lengths
        elif lengths:
            if len(lengths) > 1 or not all(value.isdigit() for value in lengths):
                raise httpx2.RemoteProtocolError(f"an invalid Content-Length: {sorted(lengths)!r}")
            self._length = int(lengths.pop())
        else:
            self._reusable = False

    def drain(self) -> Drain | None:
        """A drain for a body of known length (``DRAIN_MIN`` or more) on a connection that can lend its socket, else
        None."""
        stream = self._stream
        if not SUPPORTED or self._length is None or self._length < DRAIN_MIN or not getattr(stream, "plain", False):
            return None
        return Drain(cast(Lender, stream), self._rest, self._length, self._drained)

    def _drained(self, complete: bool) -> None:
        self._rest = b""
        self._complete = complete

    def __aiter__(self) -> AsyncIterator[bytes]:
        # The framing's own generator, not one that passes its pieces on: every level of async generators costs
        # each piece a resumption. Each marks the body complete when it has read the whole of it.
        if self._chunked:
            return self._dechunked()
        if self._length is None:
            return self._until_close()
        return self._counted(self._length)

    async def _read(self) -> bytes:
        if self._rest:
            data, self._rest = self._rest, b""
            return data
        return await self._stream.read(_READ, timeout=self._timeout)

    async def _counted(self, length: int) -> AsyncIterator[bytes]:
        remaining = length
        while remaining:
            data = await self._read()
            if not data:
                raise httpx2.RemoteProtocolError(
                    "peer closed connection without sending complete message body: "
                    f"received {length - remaining} bytes, expected {length}"
                )
            if len(data) > remaining:
                # More than the response holds: nothing was asked for after it, so the connection is spoilt.
                self._reusable = False
                data = data[:remaining]
            remaining -= len(data)
            yield data
        if self._rest:
            self._reusable = False
        self._complete = True

    async def _until_close(self) -> AsyncIterator[bytes]:
        while data := await self._read():
            yield data
        self._complete = True

    async def _dechunked(self) -> AsyncIterator[bytes]:
        while True:
            size_line = await self._line()
            size = size_line.split(b";", 1)[0].strip()
            if not _HEX.fullmatch(size):
                raise httpx2.RemoteProtocolError(f"an invalid chunk size: {size_line[:80]!r}")
            remaining = int(size, 16)
            if remaining == 0:
                # Trailer fields, if any, up to the empty line that ends the message; we have no use for them.
                while await self._line():
                    pass
                self._complete = True
                return
            while remaining:
                data = await self._read()
                if not data:
                    raise httpx2.RemoteProtocolError("peer closed connection in the middle of a chunk")
                piece, self._rest = data[:remaining], data[remaining:]
                remaining -= len(piece)
                yield piece
            if await self._line():
                raise httpx2.RemoteProtocolError("a chunk longer than its size")

    async def _line(self) -> bytes:
        """The next line of the chunked framing, without its line ending."""
        buffer = b""
        while (end := buffer.find(b"\n")) < 0:
            if len(buffer) > MAX_HEAD:
                raise httpx2.RemoteProtocolError("a chunk header line that never ends")
            data = await self._read()
            if not data:
                raise httpx2.RemoteProtocolError("peer closed connection in the chunked framing")
            buffer += data
        self._rest = buffer[end + 1 :]
        return buffer[:end].rstrip(b"\r")

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._connection.response_closed(reusable=self._complete and self._reusable)


def _values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """Every comma-separated value of the headers named ``name`` (lower case), in lower case."""
    return [
        item.strip().lower()
        for key, value in headers
        if key.lower() == name
        for item in value.split(b",")
        if item.strip()
    ]
