"""One bandwidth limit shared by every stream of a pull (``--max-rate``)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable

_RATE = re.compile(r"(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[kmg]?)(?:i?b)?(?:/s)?", re.IGNORECASE)
_MULTIPLIERS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_rate(text: str) -> float:
    """Bytes per second from ``500k``, ``50M``, ``1.5G``, ``50MiB/s`` or a plain number (binary multiples, as
    curl's --limit-rate and aria2's --max-download-limit count them)."""
    match = _RATE.fullmatch(text.strip())
    if match is None or float(match["number"]) <= 0:
        raise ValueError(f"{text!r} is not a rate such as 500k, 50M or 1.5G (bytes per second)")
    return float(match["number"]) * _MULTIPLIERS[match["unit"].lower()]


class RateLimiter:
    """A token bucket that every stream draws from after each read.

    A reader takes what it read even when that leaves the bucket in debt, then sleeps until the debt is paid:
    concurrent readers queue up behind each other's debt, so the sum of all streams stays at the rate.
    """

    def __init__(
        self,
        rate: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.rate = rate
        # A tenth of a second of burst: smooth at any rate, and no long free start that would skew the average.
        self._capacity = rate / 10
        self._tokens = self._capacity
        self._clock = clock
        self._sleep = sleep
        self._updated = clock()

    async def take(self, amount: int) -> None:
        now = self._clock()
        self._tokens = min(self._capacity, self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        self._tokens -= amount
        if self._tokens < 0:
            await self._sleep(-self._tokens / self.rate)
