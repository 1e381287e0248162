"""Our connection pool (ollama_pull.pool) through the client's transport, against servers on 127.0.0.1: how many
connections it opens, which request gets one, and in what order those that wait are served."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx2
import pytest

from ollama_pull.network import DirectTransport
from tests.test_network import Handler, answering, connects, serving

pytestmark = pytest.mark.anyio

__all__ = ["connects"]


def holding(until: asyncio.Event, paths: list[str]) -> Handler:
    """A keep-alive server that records each request's path and answers it once ``until`` is set."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                paths.append(head.split(b" ")[1].decode())
                await until.wait()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass

    return answer


@dataclass
class Held:
    """A client with a pool of one connection, which carries ``holder``, a request to ``/holder`` that the server
    answers once ``released`` is set; ``paths`` are the requests the server has seen, in order."""

    client: httpx2.AsyncClient
    url: str
    released: asyncio.Event
    paths: list[str]
    holder: asyncio.Task[httpx2.Response]


@asynccontextmanager
async def holding_the_one_connection() -> AsyncIterator[Held]:
    released = asyncio.Event()
    paths: list[str] = []
    async with (
        serving(holding(released, paths)) as port,
        httpx2.AsyncClient(transport=DirectTransport(1, verify=True)) as client,
    ):
        url = f"http://127.0.0.1:{port}"
        holder = asyncio.create_task(client.get(f"{url}/holder"))
        while not paths:
            await asyncio.sleep(0.01)
        yield Held(client, url, released, paths, holder)


async def test_requests_beyond_the_pools_size_wait_and_are_served_in_the_order_they_came(
    connects: list[tuple[str, int]],
) -> None:
    released = asyncio.Event()
    paths: list[str] = []
    transport = DirectTransport(1, verify=True)
    async with serving(holding(released, paths)) as port, httpx2.AsyncClient(transport=transport) as client:
        requests = [asyncio.create_task(client.get(f"http://127.0.0.1:{port}/{n}")) for n in range(6)]
        while not paths:
            await asyncio.sleep(0.01)
        released.set()
        async with asyncio.timeout(10):
            responses = await asyncio.gather(*requests)
    assert [response.content for response in responses] == [b"ok"] * 6
    assert paths == [f"/{n}" for n in range(6)]
    assert len(connects) == 1


async def test_a_full_pool_closes_an_idle_connection_to_another_host_for_a_new_one(
    connects: list[tuple[str, int]],
) -> None:
    transport = DirectTransport(1, verify=True)
    async with (
        serving(answering(b"first")) as first,
        serving(answering(b"second")) as second,
        httpx2.AsyncClient(transport=transport) as client,
    ):
        async with asyncio.timeout(10):
            assert (await client.get(f"http://127.0.0.1:{first}/")).content == b"first"
            assert (await client.get(f"http://127.0.0.1:{second}/")).content == b"second"
            assert len(transport.pool.connections) == 1
            assert (await client.get(f"http://127.0.0.1:{first}/")).content == b"first"
    assert connects == [("127.0.0.1", first), ("127.0.0.1", second), ("127.0.0.1", first)]


async def test_a_waiting_request_that_is_cancelled_gives_its_turn_to_the_next() -> None:
    async with holding_the_one_connection() as held:
        cancelled = asyncio.create_task(held.client.get(f"{held.url}/cancelled"))
        after = asyncio.create_task(held.client.get(f"{held.url}/after"))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        held.released.set()
        async with asyncio.timeout(10):
            assert (await held.holder).content == (await after).content == b"ok"
        with pytest.raises(asyncio.CancelledError):
            await cancelled
    assert held.paths == ["/holder", "/after"]


async def test_a_connection_handed_to_a_request_cancelled_before_it_ran_goes_to_the_next() -> None:
    transport = DirectTransport(1, verify=True)
    async with serving(answering(b"ok")) as port, httpx2.AsyncClient(transport=transport) as client:
        url = f"http://127.0.0.1:{port}/"
        # The holder's body is left unread: read to its end, httpx2 would close the response there and then.
        async with client.stream("GET", url):
            waiter = asyncio.create_task(client.get(url))
            await asyncio.sleep(0.01)
        # The holder's close handed the waiter the connection's place, and the waiter has not run since.
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        async with asyncio.timeout(10):
            assert (await client.get(url)).content == b"ok"


async def test_no_connection_free_within_the_pool_timeout_is_a_pool_timeout() -> None:
    async with holding_the_one_connection() as held:
        with pytest.raises(httpx2.PoolTimeout, match="no connection came free"):
            await held.client.get(f"{held.url}/late", timeout=httpx2.Timeout(10.0, pool=0.05))
        held.released.set()
        assert (await held.holder).content == b"ok"
        # The request that gave up left no turn behind: the next one is served at once.
        assert (await held.client.get(f"{held.url}/next")).content == b"ok"
    assert held.paths == ["/holder", "/next"]


async def test_a_client_closed_while_a_response_is_open_closes_its_connection_for_good() -> None:
    transport = DirectTransport(2, verify=True)
    async with serving(answering(b"ok")) as port:
        client = httpx2.AsyncClient(transport=transport)
        async with client.stream("GET", f"http://127.0.0.1:{port}/") as response:
            await response.aread()
            [connection] = transport.pool.connections
            await client.aclose()
        # The response's close came after the pool's: the connection is not taken back.
        assert connection.is_closed()
        assert not transport.pool.connections
