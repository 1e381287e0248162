"""Blocking file work (opening, writing, hashing, fsyncs, tar streams) in worker threads that report to the event
loop.

:func:`in_thread` hands a call to a small pool of threads of our own and answers an asyncio future. It is what
``asyncio.to_thread`` does, minus what a pull of thousands of small blobs paid for on every hand-off, twice per
blob: a copy of the context, a ``concurrent.futures`` future with its condition variable, and the executor's
semaphore, all on the event loop's thread or contending with it (4,096 blobs of 64 KiB x0.93 wall, 256 blobs of
0.5-3.5 MiB x0.89; bench/PROFILE.md). The call runs without the caller's context variables. The threads are
daemons: the process does not wait for a call at exit, so whoever hands one over awaits its end, even when
cancelled (:func:`ollama_pull.store.finished_in_thread`, :func:`run_blocking`).

A thread cannot be cancelled, so long work checks a stop flag between reads (:func:`run_blocking`): Ctrl-C stops
an export or an import within one read instead of after the current multi-gigabyte blob. Events cross back to
the loop with ``call_soon_threadsafe``, so a callback (a renderer) only ever runs on the loop's thread, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar, TypeVarTuple

from .events import Event, EventCallback

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

# As many threads as asyncio's default executor would start on this machine.
THREADS = min(32, (os.cpu_count() or 1) + 4)

_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


class _Threads:
    """The pool: daemon threads, started at the first hand-off, that take calls from one queue."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._started = False
        self._lock = threading.Lock()

    def submit(self, job: _Job) -> None:
        if not self._started:
            self._start()
        self.jobs.put(job)

    def _start(self) -> None:
        with self._lock:
            if self._started:
                return
            for number in range(THREADS):
                threading.Thread(target=self._serve, name=f"ollama-pull-worker-{number}", daemon=True).start()
            self._started = True

    def _serve(self) -> None:
        while True:
            loop, future, call, args = self.jobs.get()
            try:
                outcome: tuple[bool, Any] = (True, call(*args))
            except BaseException as exc:  # noqa: BLE001 - every outcome goes back to the awaiting side
                outcome = (False, exc)
            settle_soon(loop, future, outcome)
            # Not kept alive until the next job arrives.
            del loop, future, call, args, outcome


def settle_soon(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], outcome: tuple[bool, Any]) -> None:
    """From another thread: give ``future`` the outcome of a call made there, (True, result) or (False,
    exception), on its loop's thread."""
    # A closed loop (RuntimeError) has nobody awaiting the outcome any more.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(_settle, future, outcome)


def _settle(future: asyncio.Future[Any], outcome: tuple[bool, Any]) -> None:
    # A future cancelled meanwhile has nobody waiting for it.
    if future.cancelled():
        return
    succeeded, value = outcome
    if succeeded:
        future.set_result(value)
    else:
        future.set_exception(value)


_threads = _Threads()


def _after_fork() -> None:
    # A forked child has none of its parent's threads: it starts a pool of its own when it needs one.
    global _threads
    _threads = _Threads()


os.register_at_fork(after_in_child=_after_fork)


def in_thread(call: Callable[[*Ts], T], *args: *Ts) -> asyncio.Future[T]:
    """``call(*args)`` in a worker thread; the future (of the running loop) gets its result or its exception.
    Cancelling the future does not stop the call: it runs to its end and its outcome is dropped."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    _threads.submit((loop, future, call, args))
    return future


class Stopped(Exception):
    """Raised inside the worker when the awaiting task was cancelled."""


class Channel:
    """The worker's side: send events to the loop, and learn when to stop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_event: EventCallback) -> None:
        self._loop = loop
        self._on_event = on_event
        self.stop = threading.Event()

    def emit(self, event: Event) -> None:
        self._loop.call_soon_threadsafe(self._on_event, event)

    def check(self) -> None:
        if self.stop.is_set():
            raise Stopped


async def run_blocking(work: Callable[[Channel], T], on_event: EventCallback) -> T:
    """Run ``work`` in a thread; when cancelled, tell it to stop and wait for it, so that its ``finally``
    clauses (temp files removed, files closed) have run before the cancellation goes on."""
    channel = Channel(asyncio.get_running_loop(), on_event)
    future = in_thread(work, channel)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        channel.stop.set()
        await asyncio.wait({future})
        if not future.cancelled():
            # Collected, or asyncio reports it as never retrieved: the cancellation is what goes on.
            future.exception()
        raise
