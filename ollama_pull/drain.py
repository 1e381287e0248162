"""Large response bodies read straight from the socket into their file, by a thread of their own.

On the event loop a body arrives 256 KiB at a time, each read a fresh ``bytes`` object that travels through the
protocol, the framing and the engine before a worker thread writes it: on one 1 GiB blob the loop's thread was
busy for every byte while the machine's second core waited (bench/PROFILE.md). A body of known length on a plain
TCP connection can instead be drained by a thread that owns the socket for that long: it receives into two
reused buffers in turn and hands each read to a second thread that writes it (and hashes it, for a blob in one
stream), with no event loop in between. The event loop stops reading the connection first and takes it back
after the body's last byte, so the connection is reused as before.

The engine sees a :class:`Drain` in a response's extensions (``response.extensions[DRAIN]``) when the body
qualifies, and either drains it or reads the body as usual. A TLS connection's bytes pass through the event
loop's TLS protocol, so its bodies are never offered.
"""

from __future__ import annotations

import asyncio
import os
import queue
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import httpx2

from .worker import settle_soon

# The response extension that carries a body's drain.
DRAIN = "ollama_pull.drain"
# Bodies at least this long are offered: below it, a thread's start costs more than the loop's reads.
DRAIN_MIN = 4 * 1024 * 1024
# One receive takes at most this much, into one of a few buffers reused for the whole body.
_BUFFER = 512 * 1024
_BUFFERS = 2
# How often a waiting thread (on the network, or on the other thread) looks whether it was told to stop.
_WAIT = 0.05
# How often the awaiting task passes on what the thread has received (progress, and the stall watchdog).
_REPORT_EVERY = 0.1

Writer = Callable[[Sequence[memoryview]], None]


class Lender(Protocol):
    """A connection that can lend its socket: the event loop stops reading it until it is given back."""

    def lend(self) -> tuple[list[bytes], int]:
        """Stop reading; return what was received and not read yet, and the socket's descriptor (-1 when the
        connection has closed)."""
        ...

    def take_back(self) -> None:
        """Read the connection again."""
        ...


class _Stop(Exception):
    """The awaiting task was cancelled: the thread leaves the body where it is."""


class Drain:
    """What is left of one body, to be written by ``write`` from a thread (:meth:`into`); ``ended`` learns
    whether the body was read whole, after which the connection is the event loop's again."""

    def __init__(self, lender: Lender, rest: bytes, length: int, ended: Callable[[bool], None]) -> None:
        self.length = length
        self.received = 0
        # Seconds the receiving thread has waited for the network, since it started (``elapsed``).
        self.waited = 0.0
        self._started: float | None = None
        self._told = 0
        self._lender = lender
        self._rest = rest
        self._ended = ended
        self._used = False

    async def into(self, write: Writer, progress: Callable[[int], None]) -> None:
        """Drain the body through ``write``; ``progress`` is told, on the loop, of the bytes received since it
        was last told. Cancelled, the threads stop within a twentieth of a second (or the write under way), and
        this returns only once they have."""
        if self._used:
            raise RuntimeError("a body is drained once")
        self._used = True
        pending, fd = self._lender.lend()
        if self._rest:
            pending.insert(0, self._rest)
        stop = threading.Event()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        thread = threading.Thread(
            target=self._run, args=(loop, done, pending, fd, write, stop), name="ollama-pull-drain"
        )
        complete = False
        try:
            thread.start()
            while not done.done():
                await asyncio.wait({done}, timeout=_REPORT_EVERY)
                self._tell(progress)
            done.result()
            complete = True
        finally:
            if not done.done():
                stop.set()
                await asyncio.wait({done})
            if thread.is_alive():
                # It has settled ``done`` and has nothing left to do but end: no thread outlives the body.
                thread.join()
            self._ended(complete)
            if complete:
                self._lender.take_back()
            # Bytes written before a failure are the caller's to keep: it hears of them all, last, since what it
            # does with them may raise.
            self._tell(progress)

    @property
    def elapsed(self) -> float:
        """Seconds since the receiving thread started."""
        return 0.0 if self._started is None else time.monotonic() - self._started

    def _tell(self, progress: Callable[[int], None]) -> None:
        received = self.received
        if received > self._told:
            # Counted as told before it is told: what progress raises must not have it told twice.
            count, self._told = received - self._told, received
            progress(count)

    def _run(
        self,
        loop: asyncio.AbstractEventLoop,
        done: asyncio.Future[None],
        pending: list[bytes],
        fd: int,
        write: Writer,
        stop: threading.Event,
    ) -> None:
        error: BaseException | None = None
        self._started = time.monotonic()
        try:
            self._pump(pending, fd, write, stop)
        except _Stop:
            pass
        except BaseException as exc:  # noqa: BLE001 - every outcome goes back to the awaiting task
            error = exc
        settle_soon(loop, done, (error is None, error))

    def _pump(self, pending: list[bytes], fd: int, write: Writer, stop: threading.Event) -> None:
        remaining = self.length
        if pending:
            # Received by the event loop before the body was lent: beyond the body's end is none of ours.
            views = [memoryview(data) for data in pending]
            owed = sum(len(view) for view in views)
            if owed > remaining:
                raise httpx2.RemoteProtocolError(f"the server sent more than the body's {self.length} bytes")
            write(views)
            remaining -= owed
            self.received += owed
        if not remaining:
            return
        if fd < 0:
            raise self._cut_short(remaining)
        try:
            # A descriptor of our own for the same socket: it stays open however the event loop's side ends.
            sock = socket.socket(fileno=os.dup(fd))
        except OSError as exc:
            raise httpx2.ReadError(str(exc) or type(exc).__name__) from exc
        with sock:
            sock.setblocking(False)
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            writer = _Writer(write)
            try:
                buffer = writer.buffer()
                while remaining:
                    if stop.is_set():
                        raise _Stop
                    try:
                        got = sock.recv_into(buffer, min(remaining, _BUFFER))
                    except BlockingIOError:
                        began = time.monotonic()
                        poller.poll(_WAIT * 1000)
                        self.waited += time.monotonic() - began
                        continue
                    except OSError as exc:
                        raise httpx2.ReadError(str(exc) or type(exc).__name__) from exc
                    if not got:
                        raise self._cut_short(remaining)
                    remaining -= got
                    self.received += got
                    buffer = writer.send(buffer, got, stop)
            finally:
                writer.close()

    def _cut_short(self, remaining: int) -> httpx2.RemoteProtocolError:
        return httpx2.RemoteProtocolError(
            "peer closed connection without sending complete message body: "
            f"received {self.length - remaining} bytes, expected {self.length}"
        )


class _Writer:
    """The writing half of a drain, in a thread of its own, so that receiving and writing (with the hash that a
    blob in one stream adds) run side by side: buffers go to it full and come back empty, a few at a time."""

    def __init__(self, write: Writer) -> None:
        self._write = write
        self._full: queue.SimpleQueue[tuple[memoryview, int] | None] = queue.SimpleQueue()
        self._empty: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        self._error: BaseException | None = None
        for _ in range(_BUFFERS):
            self._empty.put(memoryview(bytearray(_BUFFER)))
        self._thread = threading.Thread(target=self._run, name="ollama-pull-drain-writer", daemon=True)
        self._thread.start()

    def buffer(self) -> memoryview:
        return self._empty.get()

    def send(self, buffer: memoryview, length: int, stop: threading.Event) -> memoryview:
        """Hand the first ``length`` bytes of ``buffer`` over to be written; returns the next empty buffer."""
        self._full.put((buffer, length))
        while self._error is None:
            try:
                return self._empty.get(timeout=_WAIT)
            except queue.Empty:
                if stop.is_set():
                    raise _Stop from None
        raise self._error

    def close(self) -> None:
        """Write what was handed over, then end the thread; raise what writing raised."""
        self._full.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while (sent := self._full.get()) is not None:
            buffer, length = sent
            if self._error is None:
                try:
                    self._write([buffer[:length]])
                except BaseException as exc:  # noqa: BLE001 - raised in the receiving thread
                    self._error = exc
            self._empty.put(buffer)
