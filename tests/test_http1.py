"""Our HTTP/1.1 connection (ollama_pull.http1) through the client's transport, against raw servers on 127.0.0.1.

Each server here writes bytes by hand, so that every framing rule of RFC 9112 section 6 is what the client meets:
the body it must read, and whether the connection may carry the next request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx2
import pytest

from ollama_pull.network import DirectTransport, make_client
from tests.integration.test_tls import certificate_authority
from tests.test_network import Handler, connects, serving

pytestmark = pytest.mark.anyio

__all__ = ["connects"]


def replying(*responses: bytes, requests: list[bytes] | None = None) -> Handler:
    """A server that answers the n-th request on a connection with ``responses[n]`` (the last one over and over),
    recording each request's head (and body) in ``requests``, and closes when the client does."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        count = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if b"content-length:" in head.lower():
                    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                    head += await reader.readexactly(length)
                elif b"transfer-encoding: chunked" in head.lower():
                    head += await reader.readuntil(b"0\r\n\r\n")
                if requests is not None:
                    requests.append(head)
                writer.write(responses[min(count, len(responses) - 1)])
                await writer.drain()
                count += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return answer


async def twice(handler: Handler, connects: list[tuple[str, int]], method: str = "GET") -> list[httpx2.Response]:
    """Two requests in turn to a server running ``handler``, bodies read."""
    async with serving(handler) as port, httpx2.AsyncClient(transport=DirectTransport(8, verify=True)) as client:
        return [await client.request(method, f"http://127.0.0.1:{port}/blob") for _ in range(2)]


@pytest.mark.parametrize(
    ("response", "body", "reused"),
    [
        # Each row: what the server sends, the body the client must read, whether the next request reuses the
        # connection.
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", b"hello", True),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", b"", True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello", b"hello", True),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n",
            b"hello world",
            True,
        ),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nTrailer: x\r\n\r\n", b"abc", True),
        # Transfer-Encoding wins over Content-Length, and such a response is never trusted to leave the
        # connection clean.
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 99\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
            b"hi",
            False,
        ),
        (b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", b"", True),
        (b"HTTP/1.1 304 Not Modified\r\n\r\n", b"", True),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", b"ok", True),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", b"ok", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", b"ok", False),
        # More bytes than the response holds: nothing after it was asked for.
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokAND MORE", b"ok", False),
        # Bare line feeds, which RFC 9112 lets a client accept.
        (b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", b"ok", True),
    ],
)
async def test_a_response_is_framed_as_rfc_9112_says(
    response: bytes, body: bytes, reused: bool, connects: list[tuple[str, int]]
) -> None:
    first, second = await twice(replying(response), connects)
    assert first.content == body
    assert second.content == body
    assert len(connects) == (1 if reused else 2)


async def test_a_body_that_runs_until_the_close_is_read_whole_and_the_connection_not_reused(
    connects: list[tuple[str, int]],
) -> None:
    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 300_000)
        await writer.drain()
        writer.close()

    first, second = await twice(until_close, connects)
    assert first.content == second.content == b"x" * 300_000
    assert len(connects) == 2


async def test_a_head_request_reads_no_body_despite_its_content_length(connects: list[tuple[str, int]]) -> None:
    first, second = await twice(replying(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"), connects, "HEAD")
    assert first.headers["Content-Length"] == "1234"
    assert first.content == second.content == b""
    assert len(connects) == 1


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (b"", "Server disconnected without sending a response"),
        (b"HTTP/1.1 200 OK\r\nContent-Len", "cut short"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1.1 status line"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "invalid response header"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello", "invalid Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "invalid Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello", "received 5 bytes, expected 10"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "invalid chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel", "in the middle of a chunk"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhello\r\n0\r\n\r\n", "longer than its size"),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "switched protocols"),
        (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 20_000, "more than 102400 bytes"),
    ],
)
async def test_a_broken_response_is_a_protocol_error_and_closes_the_connection(response: bytes, message: str) -> None:
    async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(response)
        await writer.drain()
        writer.close()

    transport = DirectTransport(8, verify=True)
    async with serving(broken) as port, httpx2.AsyncClient(transport=transport) as client:
        with pytest.raises(httpx2.RemoteProtocolError, match=message):
            await client.get(f"http://127.0.0.1:{port}/")
        assert not transport.pool.connections


async def test_request_bodies_go_out_framed_by_their_length_or_in_chunks() -> None:
    requests: list[bytes] = []

    async def chunks() -> AsyncIterator[bytes]:
        yield b"first "
        yield b""
        yield b"second"

    ok = b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
    async with (
        serving(replying(ok, requests=requests)) as port,
        httpx2.AsyncClient(transport=DirectTransport(8, verify=True)) as client,
    ):
        await client.put(f"http://127.0.0.1:{port}/upload", content=b"0123456789")
        await client.patch(f"http://127.0.0.1:{port}/upload", content=chunks())
    assert requests[0].startswith(b"PUT /upload HTTP/1.1\r\n")
    assert b"\r\nContent-Length: 10\r\n" in requests[0]
    assert requests[0].endswith(b"\r\n\r\n0123456789")
    assert b"\r\nTransfer-Encoding: chunked\r\n" in requests[1]
    assert requests[1].endswith(b"\r\n\r\n6\r\nfirst \r\n6\r\nsecond\r\n0\r\n\r\n")


async def test_a_header_value_with_a_line_break_is_refused_before_anything_is_sent() -> None:
    requests: list[bytes] = []
    async with (
        serving(replying(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", requests=requests)) as port,
        httpx2.AsyncClient(transport=DirectTransport(8, verify=True)) as client,
    ):
        with pytest.raises(httpx2.LocalProtocolError, match="invalid request header"):
            await client.get(f"http://127.0.0.1:{port}/", headers={"X-Evil": "a\r\nInjected: yes"})
    assert requests == []


async def test_a_body_closed_before_its_end_closes_the_connection(connects: list[tuple[str, int]]) -> None:
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1_000_000
    async with (
        serving(replying(response)) as port,
        httpx2.AsyncClient(transport=DirectTransport(8, verify=True)) as client,
    ):
        async with client.stream("GET", f"http://127.0.0.1:{port}/") as streamed:
            async for _chunk in streamed.aiter_raw():
                break
        # The unread rest would be taken for the next response: that connection must not be used again.
        assert (await client.get(f"http://127.0.0.1:{port}/")).content == b"x" * 1_000_000
    assert len(connects) == 2


async def test_a_connection_the_server_closed_while_idle_is_not_reused(connects: list[tuple[str, int]]) -> None:
    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    async with serving(once) as port, httpx2.AsyncClient(transport=DirectTransport(8, verify=True)) as client:
        assert (await client.get(f"http://127.0.0.1:{port}/")).content == b"ok"
        # The server's close reaches us while the connection is idle in the pool.
        await asyncio.sleep(0.1)
        assert (await client.get(f"http://127.0.0.1:{port}/")).content == b"ok"
    assert len(connects) == 2


async def test_a_connection_is_not_reused_after_its_keepalive_expiry(
    connects: list[tuple[str, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(DirectTransport, "KEEPALIVE_EXPIRY", 0.0)
    first, second = await twice(replying(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"), connects)
    assert first.content == second.content == b"ok"
    assert len(connects) == 2


async def test_a_cancelled_request_closes_its_connection() -> None:
    arrived = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        arrived.set()
        await reader.read()

    transport = DirectTransport(8, verify=True)
    async with serving(silent) as port, httpx2.AsyncClient(transport=transport) as client:
        request = asyncio.create_task(client.get(f"http://127.0.0.1:{port}/"))
        await arrived.wait()
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        assert not transport.pool.connections


async def test_over_tls_the_connection_offers_only_http_1_1(tmp_path: Path) -> None:
    ca, server_context = certificate_authority(tmp_path)
    # A server that would rather speak HTTP/2: it must not be offered it.
    server_context.set_alpn_protocols(["h2", "http/1.1"])
    chosen: list[str | None] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        chosen.append(writer.get_extra_info("ssl_object").selected_alpn_protocol())
        await replying(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecret")(reader, writer)

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    try:
        async with make_client(ca_cert=ca) as client:
            assert (await client.get(f"https://127.0.0.1:{port}/")).content == b"secret"
            assert (await client.get(f"https://127.0.0.1:{port}/")).content == b"secret"
    finally:
        server.close()
        await server.wait_closed()
    assert chosen == ["http/1.1"]
