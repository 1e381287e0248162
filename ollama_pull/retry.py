"""When to try again: backoff with jitter, and what a server's ``Retry-After`` asks for."""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass

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
