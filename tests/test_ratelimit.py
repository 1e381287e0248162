from __future__ import annotations

import asyncio

import pytest

from ollama_pull.ratelimit import RateLimiter, parse_rate

from .fakes import FakeClock


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("100000", 100000),
        ("500k", 500 * 1024),
        ("50M", 50 * 1024**2),
        ("50MiB/s", 50 * 1024**2),
        ("1.5G", 1.5 * 1024**3),
        (" 2mb ", 2 * 1024**2),
    ],
)
def test_parse_rate(text: str, rate: float) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["", "0", "fast", "5x", "-1M", "1.M", "M"])
def test_parse_rate_refuses_nonsense(text: str) -> None:
    with pytest.raises(ValueError, match="is not a rate"):
        parse_rate(text)


@pytest.mark.anyio
async def test_concurrent_readers_share_one_rate() -> None:
    clock = FakeClock()
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.advance(seconds)
        await asyncio.sleep(0)

    limiter = RateLimiter(1000.0, clock=clock, sleep=sleep)
    start = clock.now

    async def reader() -> None:
        for _ in range(10):
            await limiter.take(100)

    async with asyncio.TaskGroup() as group:
        for _ in range(4):
            group.create_task(reader())
    # 4000 bytes at 1000 B/s, less the 100-byte burst the bucket starts with.
    assert clock.now - start == pytest.approx(3.9, abs=0.01)
    assert all(seconds > 0 for seconds in slept)
