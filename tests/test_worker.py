"""Worker threads: calls handed to our own pool, outcomes back on the event loop's future."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading

import pytest

from ollama_pull.worker import THREADS, in_thread

pytestmark = pytest.mark.anyio


def _fails(message: str) -> None:
    raise ValueError(message)


async def test_a_call_runs_in_a_worker_thread_and_its_outcome_comes_back() -> None:
    name = await in_thread(lambda: threading.current_thread().name)
    assert name.startswith("ollama-pull-worker-")
    assert await in_thread(divmod, 7, 2) == (3, 1)
    with pytest.raises(ValueError, match="no such blob"):
        await in_thread(_fails, "no such blob")


async def test_calls_run_side_by_side_up_to_the_pool_size() -> None:
    # Each call waits for all the others: it completes only if THREADS of them run at once.
    barrier = threading.Barrier(THREADS, timeout=10)
    indices = await asyncio.gather(*(in_thread(barrier.wait) for _ in range(THREADS)))
    assert sorted(indices) == list(range(THREADS))


async def test_a_cancelled_call_runs_to_its_end_and_its_outcome_is_dropped() -> None:
    loop = asyncio.get_running_loop()
    reported: list[object] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    release, ended = threading.Event(), threading.Event()

    def held() -> None:
        release.wait(10)
        ended.set()
        raise ValueError("nobody hears this")

    future = in_thread(held)
    future.cancel()
    release.set()
    assert await asyncio.to_thread(ended.wait, 10)
    # A turn of the loop for the outcome to arrive at the cancelled future, then for any report of it.
    await asyncio.sleep(0.05)
    assert future.cancelled()
    assert reported == []


def _in_child(results: multiprocessing.SimpleQueue[object]) -> None:
    results.put(asyncio.run(_one_call()))


async def _one_call() -> int:
    return await in_thread(sum, (1, 2, 3))


async def test_a_forked_child_starts_threads_of_its_own() -> None:
    # The parent's pool is running (the call below starts it if no test did); the child has none of its threads.
    assert await _one_call() == 6
    context = multiprocessing.get_context("fork")
    results: multiprocessing.SimpleQueue[object] = context.SimpleQueue()
    child = context.Process(target=_in_child, args=(results,))
    child.start()
    await asyncio.to_thread(child.join, 20)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0
    assert results.get() == 6
