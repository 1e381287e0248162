"""Connections kept for reuse: at most so many at once, an idle one to the request's origin taken first.

httpcore2's pool matches its queue of requests against all its connections whenever a request starts or ends,
under a lock and a shielded cancel scope taken through anyio: on 4,096 small blobs that was 15% of the event
loop's time, even spread over pools of eight (bench/PROFILE.md). Here each origin has a stack of idle
connections, so a request finds one, or room for a new one, without looking at the others, and waits only when
every connection is in use; a connection given back goes straight to the request that has waited longest.
One event loop runs the pool, and it decides without awaiting anything: nothing can happen between a look and
a take.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable, Iterable

import httpx2

from .http1 import Backend, Http1Connection, Origin, Request, Response

# A request waiting for a connection: the origin it is for, and where the connection is handed to it.
_Turn = tuple[Origin, "asyncio.Future[Http1Connection]"]


class ConnectionPool:
    """HTTP/1.1 connections (:mod:`ollama_pull.http1`) to any origin, ``size`` at most, as httpcore2's pools
    serve httpx2's transports: ``handle_async_request`` takes a request and returns its response, and closing the
    response's body gives the connection back. ``ssl_context`` is asked for the TLS context when a connection
    needs one."""

    def __init__(
        self,
        *,
        size: int,
        ssl_context: Callable[[], ssl.SSLContext],
        keepalive_expiry: float | None,
        backend: Backend,
    ) -> None:
        self._size = size
        self._new_connection = (ssl_context, keepalive_expiry, backend)
        # Every connection the pool holds, in use or idle; the idle ones by origin, the most recently used last.
        self._connections: set[Http1Connection] = set()
        self._idle: dict[Origin, list[Http1Connection]] = {}
        self._waiting: deque[_Turn] = deque()

    @property
    def connections(self) -> list[Http1Connection]:
        return list(self._connections)

    async def handle_async_request(self, request: Request) -> Response:
        url = request.url
        if url.scheme not in (b"http", b"https"):
            raise httpx2.UnsupportedProtocol(f"Request URL has an unsupported protocol {url.scheme.decode()!r}.")
        retired: list[Http1Connection] = []
        try:
            # _wait_for puts the request in line before it awaits anything, so that no connection given back
            # in between goes unnoticed.
            connection = self._take(url.origin, retired) or await self._wait_for(
                url.origin, request.extensions.get("timeout", {}).get("pool")
            )
        finally:
            await _close(retired)
        try:
            return await connection.handle_async_request(request)
        except BaseException:
            # The connection has closed itself: its place is free.
            await self._returned(connection)
            raise

    def _take(self, origin: Origin, retired: list[Http1Connection]) -> Http1Connection | None:
        """An idle connection to ``origin``, else a new one if there is room, made if need be by retiring the
        longest idle connection to another origin; None when every connection is in use. Connections found
        expired are retired too: the caller closes what ``retired`` holds."""
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            if not connection.has_expired():
                return connection
            self._retire(connection, retired)
        if len(self._connections) >= self._size:
            others = next((stack for stack in self._idle.values() if stack), None)
            if others is None:
                return None
            self._retire(others.pop(0), retired)
        context, expiry, backend = self._new_connection
        connection = Http1Connection(
            origin, ssl_context=context, keepalive_expiry=expiry, backend=backend, returned=self._returned
        )
        self._connections.add(connection)
        return connection

    def _retire(self, connection: Http1Connection, retired: list[Http1Connection]) -> None:
        self._connections.discard(connection)
        retired.append(connection)

    async def _wait_for(self, origin: Origin, timeout: float | None) -> Http1Connection:
        """A connection for ``origin`` once one is handed over, in the order the requests came; PoolTimeout after
        ``timeout``."""
        turn: asyncio.Future[Http1Connection] = asyncio.get_running_loop().create_future()
        entry = (origin, turn)
        self._waiting.append(entry)
        try:
            async with asyncio.timeout(timeout):
                return await turn
        except BaseException as exc:
            if turn.done() and not turn.cancelled():
                # Handed a connection just as it gave up: the connection goes to the next in line.
                await self._returned(turn.result())
            else:
                self._waiting.remove(entry)
            if isinstance(exc, TimeoutError):
                raise httpx2.PoolTimeout(f"no connection came free within {timeout} s") from exc
            raise

    async def _returned(self, connection: Http1Connection) -> None:
        """``connection`` carries no request any more: it waits for the next one, or it has closed."""
        if connection.is_idle():
            self._idle.setdefault(connection.origin, []).append(connection)
        else:
            self._connections.discard(connection)
        await self._serve()

    async def _serve(self) -> None:
        """Hand connections to waiting requests, first come first served, while there are any to hand."""
        retired: list[Http1Connection] = []
        while self._waiting:
            origin, turn = self._waiting[0]
            connection = self._take(origin, retired)
            if connection is None:
                break
            self._waiting.popleft()
            turn.set_result(connection)
        await _close(retired)

    async def aclose(self) -> None:
        connections, self._connections, self._idle = self._connections, set(), {}
        await _close(connections)


async def _close(connections: Iterable[Http1Connection]) -> None:
    for connection in connections:
        await connection.aclose()
