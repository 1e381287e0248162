"""Response bodies read straight from the socket into their file, by threads instead of the event loop.

On the event loop a body arrives 256 KiB at a time, each read a fresh ``bytes`` object that travels through the
protocol, the framing and the engine before a worker thread writes it: on one 1 GiB blob the loop's thread was
busy for every byte while the machine's second core waited, and on 256 blobs of 0.5-3.5 MiB that path was most
of the loop's work (bench/PROFILE.md). A body of known length on a plain TCP connection can instead be drained
by a thread that reads the socket itself, with no event loop in between:

- a long body (``OWN_THREADS_MIN`` or more) by a thread of its own, which receives into two reused buffers in
  turn and hands each read to a second thread that writes it (and hashes it, for a blob in one stream), so that
  receiving and hashing one large blob run side by side;
- a shorter one by the process's one shared receiving thread, which waits on the sockets of every such body at
  once and writes (and hashes) each read itself, from one reused buffer: a thread per body, 64 at once, cost
  more than the event loop's reads it saved.

The event loop stops reading the connection first and takes it back after the body's last byte, so the
connection is reused as before. The engine sees a :class:`Drain` in a response's extensions
(``response.extensions[DRAIN]``) when the body qualifies, and either drains it or reads the body as usual. A TLS
connection's bytes pass through the event loop's TLS protocol, so its bodies are never offered.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import select
import selectors
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import httpx2

from .worker import settle_soon

# The response extension that carries a body's drain.
DRAIN = "ollama_pull.drain"
# A drain reads a duplicate of the connection's socket descriptor. On Windows a socket is a handle, which os.dup
# cannot duplicate (and select.poll is missing): there, bodies stay on the event loop.
SUPPORTED = os.name == "posix"
# Bodies at least this long are offered. A shorter one arrives in one or two of the event loop's reads (256 KiB),
# often with its head: handing 64 KiB bodies to the shared thread cost 4,096 blobs of them x1.06 wall and 8% more
# CPU (4 alternated runs).
DRAIN_MIN = 256 * 1024
# Bodies at least this long get threads of their own; shorter ones share the process's receiving thread.
OWN_THREADS_MIN = 4 * 1024 * 1024
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
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._started = time.monotonic()
        thread: threading.Thread | None = None
        stop: Callable[[], None]
        if self.length < OWN_THREADS_MIN:
            stop = _shared_receiver().start(_Body(self, pending, fd, write, loop, done))
        else:
            stopping = threading.Event()
            thread = threading.Thread(
                target=self._run, args=(loop, done, pending, fd, write, stopping), name="ollama-pull-drain"
            )
            thread.start()
            stop = stopping.set
        complete = False
        try:
            while not done.done():
                await asyncio.wait({done}, timeout=_REPORT_EVERY)
                self._tell(progress)
            done.result()
            complete = True
        finally:
            if not done.done():
                stop()
                await asyncio.wait({done})
            if thread is not None and thread.is_alive():
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
        """Seconds since the drain began."""
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
        try:
            self._pump(pending, fd, write, stop)
        except _Stop:
            pass
        except BaseException as exc:  # noqa: BLE001 - every outcome goes back to the awaiting task
            error = exc
        settle_soon(loop, done, (error is None, error))

    def _pump(self, pending: list[bytes], fd: int, write: Writer, stop: threading.Event) -> None:
        remaining = self._write_pending(pending, write)
        if not remaining:
            return
        with self._socket(fd, remaining) as sock:
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            writer = _Writer(write)
            try:
                buffer = writer.buffer()
                while remaining:
                    if stop.is_set():
                        raise _Stop
                    got = self._recv_into(sock, buffer, remaining)
                    if got is None:
                        began = time.monotonic()
                        poller.poll(_WAIT * 1000)
                        self.waited += time.monotonic() - began
                        continue
                    remaining -= got
                    self.received += got
                    buffer = writer.send(buffer, got, stop)
            finally:
                writer.close()

    def _write_pending(self, pending: list[bytes], write: Writer) -> int:
        """Write what the event loop received before the body was lent; returns how much of the body is left."""
        remaining = self.length
        if pending:
            # Beyond the body's end is none of ours.
            views = [memoryview(data) for data in pending]
            owed = sum(len(view) for view in views)
            if owed > remaining:
                raise httpx2.RemoteProtocolError(f"the server sent more than the body's {self.length} bytes")
            write(views)
            remaining -= owed
            self.received += owed
        return remaining

    def _socket(self, fd: int, remaining: int) -> socket.socket:
        """A descriptor of our own for the connection's socket, non-blocking: it stays open however the event
        loop's side ends."""
        if fd < 0:
            raise self._cut_short(remaining)
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError as exc:
            raise httpx2.ReadError(str(exc) or type(exc).__name__) from exc
        sock.setblocking(False)
        return sock

    def _recv_into(self, sock: socket.socket, buffer: memoryview, remaining: int) -> int | None:
        """One receive of at most ``remaining`` bytes into ``buffer``: how many came, or None when none are
        waiting. A connection that ends before the body does, or fails, raises."""
        try:
            got = sock.recv_into(buffer, min(remaining, _BUFFER))
        except BlockingIOError:
            return None
        except OSError as exc:
            raise httpx2.ReadError(str(exc) or type(exc).__name__) from exc
        if not got:
            raise self._cut_short(remaining)
        return got

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


class _Body:
    """A body in the shared receiving thread's care."""

    __slots__ = ("done", "drain", "fd", "loop", "pending", "remaining", "sock", "stopped", "write")

    def __init__(
        self,
        drain: Drain,
        pending: list[bytes],
        fd: int,
        write: Writer,
        loop: asyncio.AbstractEventLoop,
        done: asyncio.Future[None],
    ) -> None:
        self.drain = drain
        self.pending = pending
        self.fd = fd
        self.write = write
        self.loop = loop
        self.done = done
        self.remaining = drain.length
        self.sock: socket.socket | None = None
        self.stopped = False


class _SharedReceiver:
    """One thread that drains every short body of the process: it waits on all their sockets at once, and
    writes each read before the next from one reused buffer. A body leaves it complete, failed, or stopped."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._arrived: queue.SimpleQueue[_Body] = queue.SimpleQueue()
        self._stopping = False
        self._buffer = memoryview(bytearray(_BUFFER))
        # Written to whenever a body arrives or is to stop, so that the thread need not wake up to look.
        self._waker, self._wakes = socket.socketpair()
        self._waker.setblocking(False)
        self._wakes.setblocking(False)
        self._selector.register(self._wakes, selectors.EVENT_READ)
        threading.Thread(target=self._run, name="ollama-pull-receiver", daemon=True).start()

    def start(self, body: _Body) -> Callable[[], None]:
        """Take ``body`` on; returns what stops it."""
        self._arrived.put(body)
        self._wake()

        def stop() -> None:
            body.stopped = self._stopping = True
            self._wake()

        return stop

    def _wake(self) -> None:
        # A full buffer wakes the thread as well as one more byte would.
        with contextlib.suppress(BlockingIOError):
            self._waker.send(b"\0")

    def _run(self) -> None:
        while True:
            for key, _ in self._selector.select():
                if key.data is None:
                    with contextlib.suppress(BlockingIOError):
                        self._wakes.recv(4096)
                else:
                    self._guarded(self._receive, key.data)
            while not self._arrived.empty():
                self._guarded(self._begin, self._arrived.get())
            if self._stopping:
                self._stopping = False
                for key in list(self._selector.get_map().values()):
                    if key.data is not None and key.data.stopped:
                        self._end(key.data, None)

    def _guarded(self, step: Callable[[_Body], None], body: _Body) -> None:
        """One step of one body; whatever it raises ends that body, not the thread the others depend on."""
        try:
            step(body)
        except BaseException as exc:  # noqa: BLE001 - every outcome goes back to the awaiting task
            self._end(body, exc)

    def _begin(self, body: _Body) -> None:
        if body.stopped:
            self._end(body, None)
            return
        body.remaining = body.drain._write_pending(body.pending, body.write)
        body.pending = []
        if not body.remaining:
            self._end(body, None)
            return
        body.sock = body.drain._socket(body.fd, body.remaining)
        self._selector.register(body.sock, selectors.EVENT_READ, body)

    def _receive(self, body: _Body) -> None:
        """One read, once the socket has something: the selector reports it again while more is waiting."""
        assert body.sock is not None
        got = body.drain._recv_into(body.sock, self._buffer, body.remaining)
        if got is None:
            return
        body.write([self._buffer[:got]])
        body.remaining -= got
        body.drain.received += got
        if not body.remaining:
            self._end(body, None)

    def _end(self, body: _Body, error: BaseException | None) -> None:
        sock = body.sock
        if sock is not None:
            body.sock = None
            with contextlib.suppress(KeyError):
                self._selector.unregister(sock)
            sock.close()
        settle_soon(body.loop, body.done, (error is None, error))


_receiver: _SharedReceiver | None = None
_receiver_lock = threading.Lock()


def _shared_receiver() -> _SharedReceiver:
    global _receiver
    with _receiver_lock:
        if _receiver is None:
            _receiver = _SharedReceiver()
        return _receiver


def _after_fork() -> None:
    # A forked child has none of its parent's threads: it starts a receiver of its own when it needs one.
    global _receiver
    _receiver = None


os.register_at_fork(after_in_child=_after_fork)
