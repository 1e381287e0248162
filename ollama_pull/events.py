"""Typed events: everything a command reports, from a pull's progress to the rows of ``list``.

The engine and the store's housekeeping emit them through a callback and never draw; a renderer (Rich bars,
plain lines, JSON) turns them into output. Each event's ``kind`` is its name in ``--json`` output and its fields
are that record's fields, a public interface: add fields, never rename or remove one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class Resolving:
    """The manifest of a model is being fetched."""

    kind: ClassVar[str] = "resolving"
    model: str


@dataclass(frozen=True)
class ManifestRetry:
    """Fetching the manifest failed and will be tried again; ``attempt`` is the attempt that failed (every failure
    of a manifest counts against ``--retries``)."""

    kind: ClassVar[str] = "manifest_retry"
    model: str
    attempt: int
    reason: str
    delay: float


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
class BlobWaiting:
    """Another process sharing the store is downloading this blob; we wait for it rather than fetch it twice."""

    kind: ClassVar[str] = "blob_wait"
    model: str
    digest: str
    label: str


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
    """An attempt at a blob (or a chunk of one) failed and will be tried again. ``attempt`` is the counted attempt
    that failed, as ``--retries`` counts them: a stall or an early slow abort is retried as the same attempt."""

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
class WritingManifest:
    """Every blob is in place; the manifest, which makes the model visible to Ollama, is written last."""

    kind: ClassVar[str] = "writing_manifest"
    model: str
    manifest_path: str


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


@dataclass(frozen=True)
class Verified:
    """``verify`` re-hashed every blob of a model and found each one intact."""

    kind: ClassVar[str] = "verified"
    model: str
    digest: str
    blobs: int
    total_bytes: int


@dataclass(frozen=True)
class LocalModel:
    """A model in the store, one per row of ``list``; ``digest`` is None when its manifest cannot be read."""

    kind: ClassVar[str] = "model"
    model: str
    digest: str | None
    total_bytes: int
    blobs: int
    missing_blobs: int
    manifest_path: str


@dataclass(frozen=True)
class Pruned:
    """Blobs that no manifest references were removed (or, with ``dry_run``, would be)."""

    kind: ClassVar[str] = "pruned"
    blobs: int
    freed_bytes: int
    digests: tuple[str, ...]
    dry_run: bool


@dataclass(frozen=True)
class Removed:
    """``rm`` removed a model's manifest and the blobs no other model uses (or, with ``dry_run``, would)."""

    kind: ClassVar[str] = "removed"
    model: str
    digest: str | None
    manifest_path: str
    blobs: int
    freed_bytes: int
    digests: tuple[str, ...]
    dry_run: bool


@dataclass(frozen=True)
class Failed:
    """A command failed for one model, or (``model`` None) as a whole; ``exit_code`` is what the process exits
    with for it."""

    kind: ClassVar[str] = "error"
    model: str | None
    message: str
    exit_code: int


@dataclass(frozen=True)
class ExportPlanned:
    """What an export writes: every model by its full name, each blob once (``blobs`` and ``total_bytes`` count
    the blobs, not the manifests); ``layout`` is ``tar`` or ``dir``."""

    kind: ClassVar[str] = "export_plan"
    output: str
    layout: str
    models: tuple[str, ...]
    blobs: int
    total_bytes: int
    dry_run: bool


@dataclass(frozen=True)
class ExportFinished:
    kind: ClassVar[str] = "export_done"
    output: str
    layout: str
    models: tuple[str, ...]
    blobs: int
    total_bytes: int
    seconds: float


@dataclass(frozen=True)
class ImportPlanned:
    """One model of a bundle, about to be installed; ``present_*`` counts blobs the store already holds."""

    kind: ClassVar[str] = "import_plan"
    model: str
    digest: str
    blobs: int
    total_bytes: int
    present_blobs: int
    present_bytes: int
    dry_run: bool


@dataclass(frozen=True)
class ImportFinished:
    kind: ClassVar[str] = "import_done"
    model: str
    digest: str
    manifest_path: str
    installed_blobs: int
    installed_bytes: int
    present_blobs: int
    seconds: float


@dataclass(frozen=True)
class PushPlanned:
    """A push to ``model`` (the destination), after asking the registry which blobs it has: those are
    ``present_*``; ``mountable_blobs`` may be mounted from ``source`` on the same registry instead of uploaded."""

    kind: ClassVar[str] = "push_plan"
    model: str
    source: str
    digest: str
    blobs: int
    total_bytes: int
    present_blobs: int
    present_bytes: int
    mountable_blobs: int
    dry_run: bool


@dataclass(frozen=True)
class BlobMounted:
    """The registry linked a blob from another of its repositories: no byte was uploaded."""

    kind: ClassVar[str] = "blob_mount"
    model: str
    digest: str
    size: int
    source: str


@dataclass(frozen=True)
class PushFinished:
    kind: ClassVar[str] = "push_done"
    model: str
    digest: str
    uploaded_blobs: int
    uploaded_bytes: int
    mounted_blobs: int
    present_blobs: int
    manifest_uploaded: bool
    seconds: float


PullEvent = (
    Resolving
    | ManifestRetry
    | ManifestResolved
    | BlobWaiting
    | BlobStarted
    | BlobProgress
    | BlobRetry
    | BlobFinished
    | WritingManifest
    | PullFinished
)
TransferEvent = (
    ExportPlanned | ExportFinished | ImportPlanned | ImportFinished | PushPlanned | BlobMounted | PushFinished
)
Event = PullEvent | Verified | LocalModel | Pruned | Removed | Failed | TransferEvent
EventCallback = Callable[[Event], None]


def ignore_event(event: Event) -> None:
    """The callback for callers who do not watch progress."""
