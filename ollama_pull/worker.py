"""Blocking file work (tar streams, copies, fsyncs) in a worker thread that reports to the event loop.

A thread cannot be cancelled, so the work checks a stop flag between reads: Ctrl-C stops an export or an import
within one read instead of after the current multi-gigabyte blob. Events cross back to the loop with
``call_soon_threadsafe``, so a callback (a renderer) only ever runs on the loop's thread, in order.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TypeVar

from .events import Event, EventCallback

T = TypeVar("T")


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
    loop = asyncio.get_running_loop()
    channel = Channel(loop, on_event)
    future = loop.run_in_executor(None, work, channel)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        channel.stop.set()
        await asyncio.wait({future})
        if not future.cancelled():
            # Collected, or asyncio reports it as never retrieved: the cancellation is what goes on.
            future.exception()
        raise
