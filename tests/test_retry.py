"""The retry rules of blobs, chunks and manifests, without HTTP: what each kind of failure costs, and when it ends."""

from __future__ import annotations

from typing import Any

import pytest

from ollama_pull.engine import DownloadSettings
from ollama_pull.registry import MANIFEST_STALL_RETRIES
from ollama_pull.retry import Backoff, FailureKind, RetryBudget

FAILURE, STALL, SLOW = FailureKind.FAILURE, FailureKind.STALL, FailureKind.SLOW
# The rules as the engine and the registry client set them up, with the defaults the README documents.
BLOB: dict[str, Any] = {"max_stalls": DownloadSettings().max_stalls, "free_slows": DownloadSettings().free_slow_aborts}
MANIFEST: dict[str, Any] = {"max_stalls": MANIFEST_STALL_RETRIES, "free_stalls": False}


def charged(budget: RetryBudget, kinds: list[FailureKind]) -> list[str | None]:
    """What the budget says after each failure, the n-th named ``reason n``."""
    return [budget.charge(kind, f"reason {n}") for n, kind in enumerate(kinds, 1)]


@pytest.mark.parametrize(
    ("attempts", "rules", "kinds", "counted", "ends"),
    [
        # Failures count: the attempts-th ends the download, with its own reason.
        (3, BLOB, [FAILURE] * 3, 3, "reason 3"),
        (1, BLOB, [FAILURE], 1, "reason 1"),
        # A blob's stalls are free, however many attempts are left...
        (1, BLOB, [STALL] * 10, 0, None),
        # ...but the one after max_stalls ends it.
        (6, BLOB, [STALL] * 11, 0, "stalled 11 times: reason 11"),
        # Stalls in between do not use up the attempts.
        (2, BLOB, [FAILURE, STALL, STALL, FAILURE], 2, "reason 4"),
        # The first free_slows slow aborts are free, the ones after count.
        (6, BLOB, [SLOW] * 3, 1, None),
        (2, BLOB, [SLOW] * 4, 2, "reason 4"),
        (2, BLOB, [SLOW, FAILURE, SLOW, SLOW], 2, "reason 4"),
        # A manifest's stalls count like any failure...
        (2, MANIFEST, [STALL, FAILURE], 2, "reason 2"),
        (6, MANIFEST, [FAILURE, STALL, FAILURE], 3, None),
        # ...and the third ends it, whatever attempts are left.
        (6, MANIFEST, [STALL, STALL, STALL], 2, "stalled 3 times: reason 3"),
        (6, MANIFEST, [STALL, FAILURE, STALL, STALL], 3, "stalled 3 times: reason 4"),
    ],
)
def test_each_kind_of_failure_is_counted_and_bounded_by_its_rule(
    attempts: int, rules: dict[str, Any], kinds: list[FailureKind], counted: int, ends: str | None
) -> None:
    budget = RetryBudget(attempts, **rules)
    said = charged(budget, kinds)
    assert said[:-1] == [None] * (len(kinds) - 1)  # every failure before the last is retried
    assert said[-1] == ends
    assert budget.counted == counted
    assert budget.failures == [f"reason {n}" for n in range(1, len(kinds) + 1)]


def test_the_backoff_grows_with_every_failure_counted_or_not() -> None:
    budget = RetryBudget(6, backoff=Backoff(base=1.0, cap=5.0), **BLOB)
    delays = []
    for kind in [FAILURE, STALL, SLOW, FAILURE, STALL]:
        assert budget.charge(kind, "r") is None
        delays.append(budget.delay(0.5))  # a jitter of 0.5 is a factor of 1
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert budget.delay(0.0) == 2.5  # the jitter spans half to one and a half times the backoff
    assert budget.delay(0.999) == pytest.approx(7.495)


@pytest.mark.parametrize(
    ("wait", "delay"),
    [
        (None, 1.0),  # no Retry-After: the backoff
        (0.5, 1.0),  # a shorter Retry-After does not hurry the backoff
        (30.0, 30.0),  # a longer one is honoured
    ],
)
def test_a_retry_waits_for_the_backoff_or_the_servers_retry_after_if_longer(wait: float | None, delay: float) -> None:
    budget = RetryBudget(6, backoff=Backoff(base=1.0, cap=10.0))
    budget.charge(FAILURE, "HTTP 503")
    assert budget.delay(0.5, wait=wait) == delay


def test_the_attempt_under_way_moves_on_only_when_a_failure_counts() -> None:
    budget = RetryBudget(3, **BLOB)
    under_way = [budget.attempt]
    for kind in [STALL, SLOW, FAILURE, SLOW, STALL, SLOW]:
        assert budget.charge(kind, "r") is None
        under_way.append(budget.attempt)
    # The third slow abort is the first that counts. The third attempt is the last that attempts=3 allows.
    assert under_way == [1, 1, 1, 2, 2, 2, 3]
    assert budget.charge(FAILURE, "r") == "r"
