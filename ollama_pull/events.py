"""Typed progress events, the only thing the engine tells the outside world while it works.

A renderer (Rich bars, plain lines, JSON) receives them through a callback; the engine never draws.
Each event's ``kind`` is its name in ``--json`` output, a public interface: keep it stable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class ManifestResolved:
    """The manifest is fetched and valid; ``present_*`` counts blobs already in the store."""

    kind: ClassVar[str] = "manifest"
    model: str
    digest: str
    blobs: int
    total_bytes: int
    present_blobs: int
    present_bytes: int


@dataclass(frozen=True)
class BlobStarted:
    kind: ClassVar[str] = "blob_start"
    model: str
    digest: str
    label: str
    size: int
    offset: int


@dataclass(frozen=True)
class BlobProgress:
    """``completed`` is the most this blob has ever reached: a retry never makes it smaller."""

    kind: ClassVar[str] = "blob_progress"
    model: str
    digest: str
    completed: int
    size: int


@dataclass(frozen=True)
class BlobRetry:
    kind: ClassVar[str] = "retry"
    model: str
    digest: str
    attempt: int
    reason: str
    delay: float


@dataclass(frozen=True)
class BlobFinished:
    kind: ClassVar[str] = "blob_done"
    model: str
    digest: str
    size: int
    seconds: float


@dataclass(frozen=True)
class PullFinished:
    kind: ClassVar[str] = "done"
    model: str
    digest: str
    manifest_path: str
    total_bytes: int
    downloaded_bytes: int
    downloaded_blobs: int
    present_blobs: int
    seconds: float


Event = ManifestResolved | BlobStarted | BlobProgress | BlobRetry | BlobFinished | PullFinished
EventCallback = Callable[[Event], None]


def ignore_event(event: Event) -> None:
    """The callback for callers who do not watch progress."""
