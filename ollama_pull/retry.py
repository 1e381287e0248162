"""When to try again: the retry rules of blobs, chunks and manifests (:class:`RetryBudget`), backoff with jitter,
and what a server's ``Retry-After`` asks for."""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass, field
from enum import Enum

import httpx2

# A server may ask for hours; past this we would rather fail with a clear message than look hung.
MAX_RETRY_AFTER = 60.0
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# The request extension that marks a token request (its value: the token service's host), so that a failure of
# one names the token service rather than the registry.
TOKEN_SERVICE = "ollama_pull.token_service"


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff, ``base * 2**(n-1)`` capped, times a jitter factor in [0.5, 1.5)."""

    base: float = 0.2
    cap: float = 10.0

    def delay(self, failures: int, jitter: float) -> float:
        return float(min(self.base * 2 ** max(failures - 1, 0), self.cap)) * (0.5 + jitter)


class FailureKind(Enum):
    """How an attempt failed, which decides how it is counted (see :class:`RetryBudget`)."""

    FAILURE = "failure"
    STALL = "stall"
    SLOW = "slow"


@dataclass
class RetryBudget:
    """The tries left to one download (a blob, a chunk of one, or a manifest), counted by how each failed.

    =======  ============================================  =======================================
    failure  counts against ``attempts``                   bounded by
    =======  ============================================  =======================================
    stall    not with ``free_stalls`` (a blob or a chunk:  ``max_stalls``: one stall more ends the
             its bytes so far are kept); else yes (a       download, whatever ``attempts`` allows
             manifest: it has no bytes in flight)
    slow     from the ``free_slows + 1``-th slow abort on  ``attempts``, once they count
    failure  yes: resets, truncation, digest mismatch,     ``attempts``
             429, 5xx, network and token service errors
    =======  ============================================  =======================================

    A blob's attempt that stalls waiting on a token service is charged by the engine as a failure, not a stall:
    like a manifest, it has no bytes in flight to keep.

    Every failure, counted or not, is one more for the backoff: a retry waits ``backoff.delay(failures so far)``,
    or what the server's ``Retry-After`` asks if that is longer. Pure and synchronous: the caller makes the
    attempts, sleeps the delay and raises its own error when :meth:`charge` says the tries are used up.
    """

    attempts: int
    backoff: Backoff = Backoff()
    max_stalls: int = 10
    free_stalls: bool = True
    free_slows: int = 0
    counted: int = 0
    stalls: int = 0
    slows: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def attempt(self) -> int:
        """The counted attempt under way: 1 at first, one more after each failure that counts, so never more than
        ``attempts``. A free failure (a blob's stall, an early slow abort) is retried as the same attempt."""
        return self.counted + 1

    def charge(self, kind: FailureKind, reason: str) -> str | None:
        """Count one failed attempt by its kind's rule: None while tries are left, else the reason to give up."""
        self.failures.append(reason)
        if kind is FailureKind.STALL:
            self.stalls += 1
            if self.stalls > self.max_stalls:
                return f"stalled {self.stalls} times: {reason}"
            if not self.free_stalls:
                self.counted += 1
        elif kind is FailureKind.SLOW:
            self.slows += 1
            if self.slows > self.free_slows:
                self.counted += 1
        else:
            self.counted += 1
        return reason if self.counted >= self.attempts else None

    def delay(self, jitter: float, *, wait: float | None = None) -> float:
        """Seconds before the next try: the backoff for the failures so far, or ``wait`` if longer."""
        return max(self.backoff.delay(len(self.failures), jitter), wait or 0.0)


def retry_after(response: httpx2.Response, *, now: float | None = None) -> float | None:
    """Seconds to wait as the response's ``Retry-After`` says (delta-seconds or HTTP date), if it says."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


# What OpenSSL says when a TLS setting is wrong rather than the network, and what to do about it: trying again
# cannot help.
_TLS_MISTAKES = (
    (
        "CERTIFICATE_VERIFY_FAILED",
        "the server's TLS certificate is not trusted",
        "pass --ca-cert FILE or set SSL_CERT_FILE",
    ),
    # The other end answered the TLS handshake in plain HTTP.
    ("WRONG_VERSION_NUMBER", "the server does not speak TLS", "for a plain-HTTP registry pass --insecure"),
    ("record layer failure", "the server does not speak TLS", "for a plain-HTTP registry pass --insecure"),
)


def describe_transport_error(exc: httpx2.RequestError) -> str:
    """A short reason for a network failure, without URLs or headers (which may carry credentials); it names the
    token service when the request that failed was a token request."""
    kind = {
        httpx2.ConnectError: "connection failed",
        httpx2.ConnectTimeout: "connection timed out",
        httpx2.ReadTimeout: "read timed out",
        httpx2.RemoteProtocolError: "connection closed early",
        httpx2.ReadError: "connection reset",
        httpx2.WriteError: "connection reset while sending",
        httpx2.TooManyRedirects: "too many redirects",
        httpx2.UnsupportedProtocol: "redirected to an unsupported URL scheme",
    }.get(type(exc), "network error")
    detail = str(exc).splitlines()[0] if str(exc) else ""
    reason = f"{kind} ({detail})" if detail and detail != kind else kind
    for marker, what, fix in _TLS_MISTAKES:
        if marker in detail:
            reason = f"{what} ({detail}): {fix}"
            break
    try:
        service = exc.request.extensions.get(TOKEN_SERVICE)
    except RuntimeError:
        # An error raised before any request was made has none.
        service = None
    return f"the token service at {service}: {reason}" if service else reason


def is_tls_mistake(exc: httpx2.RequestError) -> bool:
    """Whether the failure is a TLS setting to fix (see :data:`_TLS_MISTAKES`), which no retry can get past."""
    return any(marker in str(exc) for marker, _, _ in _TLS_MISTAKES)
