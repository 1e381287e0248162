"""The network layer: our transport over our pool on asyncio's transports, against real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import NoReturn

import httpx2
import pytest

from ollama_pull import network
from ollama_pull.errors import RegistryError
from ollama_pull.network import AsyncioBackend, AsyncioStream, DirectTransport, _direct_transport, make_client
from ollama_pull.pool import ConnectionPool
from ollama_pull.processes import MIN_BLOBS
from tests.fault_registry import FaultRegistry

pytestmark = pytest.mark.anyio

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[int]:
    """A TCP server on 127.0.0.1 running ``handler`` for each connection; yields its port."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every connection the asyncio backend opens, as (host, port)."""
    opened: list[tuple[str, int]] = []
    connect = AsyncioBackend.connect_tcp

    async def counting(self: AsyncioBackend, host: str, port: int, **kwargs: object) -> AsyncioStream:
        opened.append((host, port))
        return await connect(self, host, port, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(AsyncioBackend, "connect_tcp", counting)
    return opened


def answering(body: bytes, *, arrived: Callable[[], Awaitable[None]] | None = None) -> Handler:
    """A keep-alive HTTP/1.1 server's connection handler: ``body`` for every request, after ``arrived()``."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                if arrived is not None:
                    await arrived()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass

    return answer


async def test_a_pull_client_talks_through_the_asyncio_backend(connects: list[tuple[str, int]]) -> None:
    body = bytes(range(256)) * 4096
    async with serving(answering(body)) as port, make_client(insecure=True, concurrency=4) as client:
        for _ in range(3):
            response = await client.get(f"http://127.0.0.1:{port}/blob")
            assert response.content == body
    assert connects == [("127.0.0.1", port)]


def test_direct_connections_go_through_one_pool_of_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    transport = _direct_transport(68, verify=True, ca_cert=None)
    assert isinstance(transport, DirectTransport)
    assert isinstance(transport.pool, ConnectionPool)
    # With a proxy configured, httpx2 must build the transports itself to honour it and NO_PROXY.
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:1")
    assert _direct_transport(68, verify=True, ca_cert=None) is None


def test_the_transports_old_name_still_works_and_says_its_new_one() -> None:
    with pytest.warns(DeprecationWarning, match="ShardedTransport is now DirectTransport"):
        assert network.ShardedTransport is DirectTransport


async def test_one_hosts_requests_in_turn_reuse_one_connection(connects: list[tuple[str, int]]) -> None:
    async with (
        serving(answering(b"ok")) as port,
        httpx2.AsyncClient(transport=DirectTransport(24, verify=True)) as client,
    ):
        for _ in range(6):
            assert (await client.get(f"http://127.0.0.1:{port}/")).content == b"ok"
    assert connects == [("127.0.0.1", port)]


async def test_a_burst_opens_a_connection_per_request_and_the_next_one_reuses_them(
    connects: list[tuple[str, int]],
) -> None:
    # 16 requests at once are all answered only if each has a connection of its own, since the server answers
    # none before all 16 have arrived.
    transport = DirectTransport(16, verify=True)
    arrived = 0
    everyone = asyncio.Event()

    async def barrier() -> None:
        nonlocal arrived
        arrived += 1
        if arrived % 16 == 0:
            everyone.set()
        await everyone.wait()

    async with serving(answering(b"ok", arrived=barrier)) as port, httpx2.AsyncClient(transport=transport) as client:
        for wave in range(2):
            everyone.clear()
            async with asyncio.timeout(10):
                responses = await asyncio.gather(*(client.get(f"http://127.0.0.1:{port}/") for _ in range(16)))
            assert [response.content for response in responses] == [b"ok"] * 16, wave
            assert len(transport.pool.connections) == 16
    assert len(connects) == 16


@pytest.mark.parametrize(
    ("server", "timeout", "error"),
    [
        # Each row: how the server behaves, the client's timeout, and the httpx2 exception the client must see.
        ("refuses", 5.0, httpx2.ConnectError),
        ("silent", 0.05, httpx2.ReadTimeout),
        ("closes mid-body", 5.0, httpx2.RemoteProtocolError),
    ],
)
async def test_failures_reach_the_client_as_httpx2_exceptions(
    server: str, timeout: float, error: type[httpx2.TransportError]
) -> None:
    async def behave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if server == "closes mid-body":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")
            await writer.drain()
            writer.close()
        else:
            await reader.read()

    async with serving(behave) as port, httpx2.AsyncClient(transport=DirectTransport(8, verify=True)) as client:
        if server == "refuses":
            # A port nobody listens on: a server's, once it has closed.
            async with serving(behave) as port:
                pass
        with pytest.raises(error) as raised:
            await client.get(f"http://127.0.0.1:{port}/", timeout=timeout)
    # Raised as httpx2's own by the backend or the framing, with what went wrong: no exception of httpcore2's is
    # left to translate.
    assert type(raised.value) is error
    assert str(raised.value)


async def test_bytes_received_before_a_reset_are_read_before_the_error() -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"first bytes")
        await writer.drain()
        await asyncio.sleep(0.05)
        # Linger 0: closing sends a reset, not a clean end.
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    received: list[bytes] = []

    async def read_all(stream: AsyncioStream) -> None:
        while chunk := await stream.read(65536, timeout=5):
            received.append(chunk)

    async with serving(reset) as port:
        stream = await AsyncioBackend().connect_tcp("127.0.0.1", port, timeout=5)
        await asyncio.sleep(0.2)
        with pytest.raises(httpx2.ReadError, match="reset"):
            await read_all(stream)
        await stream.aclose()
    assert b"".join(received) == b"first bytes"


async def test_a_clean_close_reads_as_the_end_and_makes_the_connection_readable() -> None:
    async def close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"bye")
        await writer.drain()
        writer.close()

    async with serving(close) as port:
        stream = await AsyncioBackend().connect_tcp("127.0.0.1", port, timeout=5)
        assert await stream.read(65536, timeout=5) == b"bye"
        assert await stream.read(65536, timeout=5) == b""
        # The pool asks this before reusing an idle connection: readable means the server went away.
        assert stream.get_extra_info("is_readable") is True
        assert stream.get_extra_info("server_addr") == ("127.0.0.1", port)
        await stream.aclose()
        with pytest.raises(httpx2.WriteError):
            await stream.write(b"GET / HTTP/1.1\r\n\r\n", timeout=5)


async def test_a_silent_server_times_the_read_out() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async with serving(silent) as port:
        stream = await AsyncioBackend().connect_tcp("127.0.0.1", port, timeout=5)
        assert stream.get_extra_info("is_readable") is False
        with pytest.raises(httpx2.ReadTimeout):
            await stream.read(65536, timeout=0.01)
        await stream.aclose()


async def test_a_slow_reader_stops_the_socket_instead_of_buffering_everything() -> None:
    sent = asyncio.Event()
    # Far more than loopback's socket buffers hold once the kernel has grown them (several MiB each way), so that
    # only our pause keeps the server from sending it all.
    body = b"x" * (32 * 1024 * 1024)

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(body)
        await writer.drain()
        sent.set()

    async with serving(flood) as port:
        stream = await AsyncioBackend().connect_tcp("127.0.0.1", port, timeout=5)
        assert isinstance(stream, network.AsyncioStream)
        received = bytearray(await stream.read(65536, timeout=5))
        await asyncio.sleep(0.1)
        # The kernel's buffers hold the rest; ours holds at most the pause mark and one more read of the socket.
        assert stream._receiver._buffered <= network._PAUSE_AT + 256 * 1024
        assert not sent.is_set()
        while len(received) < len(body):
            received += await stream.read(65536, timeout=5)
        assert received == body
        await stream.aclose()


async def test_a_refused_connection_is_a_connect_error() -> None:
    async with serving(lambda reader, writer: asyncio.sleep(0)) as port:
        pass
    with pytest.raises(httpx2.ConnectError):
        await AsyncioBackend().connect_tcp("127.0.0.1", port, timeout=5)


def test_a_command_loads_neither_cryptography_nor_pydantic_nor_rich_in_a_pipe(tmp_path: Path) -> None:
    # cryptography costs every process about 10 MiB, and only a pull that signs an Ollama token request needs
    # it; pydantic (which typer 0.29 brings) cost 0.1 s of start-up and 11 MiB; Rich, 24 ms, and only a terminal
    # needs it (typer 0.16, the oldest allowed, imports Rich itself; then only our renderer must stay unloaded).
    # Checked after a whole command, whose output goes to a pipe.
    code = (
        "import atexit, sys, typer\n"
        "unwanted = {'cryptography', 'pydantic', 'ollama_pull.terminal'} | ({'rich'} - set(sys.modules))\n"
        "atexit.register(lambda: print(sorted(unwanted & set(sys.modules)), file=sys.stderr))\n"
        "from ollama_pull.cli import main\n"
        f"sys.argv = ['ollama-pull', 'list', '--models-dir', {str(tmp_path)!r}]\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("plain", ["--insecure", "http://"])
def test_a_pull_over_plain_http_loads_no_tls_context_and_no_httpcore2(tmp_path: Path, plain: str) -> None:
    # httpcore2, with h11, anyio and truststore, was 25-33 ms of a pull's start-up, and the system's CAs another
    # 25-40 ms: a pull over plain HTTP needs neither, whether --insecure or an http:// reference (which verifies
    # any TLS it is redirected to) says so. httpx2 makes a TLS context through httpcore2, so with httpcore2
    # unloaded, no context was made either. An audit hook sees every import, in the command and in the helper
    # it forks (which leaves with os._exit, past any atexit hook).
    with FaultRegistry() as registry:
        model = registry.add_synthetic_model("library/demo", blobs=MIN_BLOBS + 4, blob_size=4096)
        code = (
            "import os, sys\n"
            "unwanted = {'httpcore2', 'h11', 'anyio', 'truststore'}\n"
            "def seen(event, args):\n"
            "    if event == 'import' and args[0] in unwanted or event == 'os.fork':\n"
            "        os.write(2, f'{event} {args[0] if args else \"\"}\\n'.encode())\n"
            "sys.addaudithook(seen)\n"
            "from ollama_pull.cli import main\n"
            "sys.argv = ['ollama-pull', *sys.argv[3:], '-q', '--models-dir', sys.argv[1], sys.argv[2]]\n"
            "main()\n"
        )
        name = f"{registry.host}/{model.name}:{model.tag}"
        arguments = [name, "--insecure"] if plain == "--insecure" else [f"http://{name}"]
        result = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / "models"), *arguments], capture_output=True, text=True
        )
    assert result.returncode == 0, result.stderr
    # A helper was forked, and nothing unwanted was imported by either process.
    assert result.stderr.splitlines() == ["os.fork "]
    assert len(list((tmp_path / "models" / "blobs").iterdir())) == MIN_BLOBS + 4 + 1


async def test_a_verifying_transport_whose_ca_bundle_cannot_be_loaded_fails_before_it_connects(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, connects: list[tuple[str, int]]
) -> None:
    # The context is made at the first TLS connection: a failure there is ours, not an httpx2 error that a pull
    # would retry (no retry can get past it), and it leaves no socket behind.
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "missing.pem"))
    async with (
        serving(answering(b"ok")) as port,
        httpx2.AsyncClient(transport=DirectTransport(8, verify=True)) as client,
    ):
        # More than the pool holds.
        for _ in range(9):
            with pytest.raises(RegistryError, match="point SSL_CERT_FILE at a PEM bundle, or unset it"):
                await client.get(f"https://127.0.0.1:{port}/")
        # The pool is not left holding the place of a connection that never was.
        assert (await client.get(f"http://127.0.0.1:{port}/")).status_code == 200
    assert connects == [("127.0.0.1", port)]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_kernels_connect_timeout_is_a_connect_timeout_with_its_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # ETIMEDOUT is a TimeoutError too, the only one there is when no connect timeout of ours is set.
    async def timing_out(*args: object, **kwargs: object) -> NoReturn:
        raise TimeoutError(errno.ETIMEDOUT, "Connection timed out")

    monkeypatch.setattr(asyncio.get_running_loop(), "create_connection", timing_out)
    async with httpx2.AsyncClient(transport=DirectTransport(8, verify=False)) as client:
        with pytest.raises(httpx2.ConnectTimeout, match="Connection timed out"):
            await client.get("http://127.0.0.1:9/", timeout=None)
