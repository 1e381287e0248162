"""How bytes reach us: httpcore2's connection pools running on asyncio's own transports, in shards.

httpcore2's default backend goes through anyio, and every read pays for it: a cancel scope for the timeout, a
checkpoint that costs a turn of the event loop even when data is already waiting, exception mapping, and a
split of anything above 64 KiB. On a 1 GiB blob that was the largest cost left on the event loop (see
bench/PROFILE.md). Here the event loop's transport buffers what arrives, and a read hands over what is buffered
without waiting at all, one received chunk at a time.
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
from collections import deque
from typing import Any

import httpcore2
import httpx2

# Reading stops while this much is buffered and unread, and starts again once the reader has taken it all: it
# bounds each connection's buffer at this plus one read of the transport (256 KiB).
_PAUSE_AT = 64 * 1024


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
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered >= _PAUSE_AT and not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()
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
            if self._reading_paused and not self._chunks and self._transport is not None:
                self._reading_paused = False
                self._transport.resume_reading()
            return data
        if self._error is not None:
            raise httpcore2.ReadError(str(self._error) or type(self._error).__name__) from self._error
        return b""

    async def changed(self, timeout: float | None, timed_out: type[httpcore2.TimeoutException]) -> None:
        """Wait until data, the end of the connection, or room to write arrives; ``timed_out`` after ``timeout``."""
        # httpcore2 uses a connection for one request at a time, reading or writing: there is one waiter at most.
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                await self._waiter
        except TimeoutError as exc:
            raise timed_out() from exc
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class AsyncioStream(httpcore2.AsyncNetworkStream):
    """One connection, plain or TLS, as httpcore2 sees it."""

    def __init__(self, transport: asyncio.Transport, receiver: _Receiver) -> None:
        self._transport = transport
        self._receiver = receiver

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        # ``max_bytes`` (httpcore2 asks for 64 KiB) is taken as a hint: a received chunk, at most the 256 KiB the
        # transport reads at once, is handed over whole. Splitting it would only add trips through httpcore2 and
        # h11 for the same bytes, and those trips are the cost this backend exists to cut.
        if not self._receiver.readable:
            await self._receiver.changed(timeout, httpcore2.ReadTimeout)
        return self._receiver.take()

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if self._transport.is_closing():
            raise httpcore2.WriteError("the connection is closed")
        self._transport.write(buffer)
        while self._receiver.writing_paused and not self._transport.is_closing():
            await self._receiver.changed(timeout, httpcore2.WriteTimeout)

    async def aclose(self) -> None:
        self._transport.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport = await loop.start_tls(
                    self._transport, self._receiver, ssl_context, server_hostname=server_hostname
                )
        except TimeoutError as exc:
            self._transport.abort()
            raise httpcore2.ConnectTimeout() from exc
        except (OSError, EOFError) as exc:
            self._transport.abort()
            raise httpcore2.ConnectError(str(exc) or type(exc).__name__) from exc
        if transport is None:
            raise httpcore2.ConnectError("the connection closed during the TLS handshake")
        self._receiver.switch(transport)
        return AsyncioStream(transport, self._receiver)

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            # httpcore2 asks before reusing an idle connection: readable then means the server closed it.
            return self._receiver.readable
        return self._transport.get_extra_info({"client_addr": "sockname", "server_addr": "peername"}.get(info, info))


class AsyncioBackend(httpcore2.AsyncNetworkBackend):
    """Connections on the running event loop's transports."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore2.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        local = (local_address, 0) if local_address else None
        try:
            async with asyncio.timeout(timeout):
                transport, receiver = await loop.create_connection(_Receiver, host, port, local_addr=local)
        except TimeoutError as exc:
            raise httpcore2.ConnectTimeout() from exc
        except OSError as exc:
            raise httpcore2.ConnectError(str(exc) or type(exc).__name__) from exc
        sock = transport.get_extra_info("socket")
        for option in socket_options or ():
            sock.setsockopt(*option)
        return AsyncioStream(transport, receiver)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class AsyncioTransport(httpx2.AsyncHTTPTransport):
    """httpx2's transport (its request mapping and exceptions) over a connection pool on ``AsyncioBackend``."""

    def __init__(self, *, ssl_context: ssl.SSLContext, limits: httpx2.Limits) -> None:
        super().__init__(verify=ssl_context, limits=limits)
        # httpx2 has no parameter for the network backend; its transport keeps the pool it talks to in ``_pool``.
        # Were that to change, this pool would go unused and the pull would run as fast as before, not fail:
        # test_network checks that requests go through this backend.
        self._pool = httpcore2.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=AsyncioBackend(),
        )


class ShardedTransport(httpx2.AsyncBaseTransport):
    """Several connection pools behind one transport, taking requests in turn.

    httpcore2's pool matches every queued request against every connection each time a request starts or ends,
    which costs O(requests x connections): with 64 downloads in one pool that bookkeeping was 40% of our CPU.
    Pools of at most ``SHARD_SIZE`` connections cut it by the number of pools squared; each keeps its own
    keep-alive connections, so reuse is unchanged.
    """

    SHARD_SIZE = 8

    def __init__(self, connections: int, *, verify: bool | ssl.SSLContext) -> None:
        count = max(1, -(-connections // self.SHARD_SIZE))
        per_shard = -(-connections // count)
        limits = httpx2.Limits(max_connections=per_shard, max_keepalive_connections=per_shard)
        # One TLS context for all: building one loads the CA bundle, a few milliseconds each.
        context = httpx2.create_ssl_context(verify=verify)
        self._shards = [AsyncioTransport(ssl_context=context, limits=limits) for _ in range(count)]
        self._turn = itertools.cycle(self._shards)

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        return await next(self._turn).handle_async_request(request)

    async def aclose(self) -> None:
        for shard in self._shards:
            await shard.aclose()
