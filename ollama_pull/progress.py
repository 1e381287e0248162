"""Renderers: every line a command prints, as plain lines in pipes and logs, JSON records for scripts, or nothing
but errors; on a terminal, as Rich bars and tables (:mod:`ollama_pull.terminal`, which alone of the renderers
imports Rich: a pull in a pipe or a CI log does not pay 24 ms to load it).

Each renderer is an event callback (see :mod:`ollama_pull.events`); what produces the events never knows which
one listens. Data (the rows of ``list``, what a dry run would do, what was verified or removed) goes to ``out``,
standard output; a pull's progress and every error go to ``err``, standard error. Output whose reader has gone
away (``ollama-pull --json ... | head -1``) is dropped without a word, and the command carries on to the end.
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import IO, Any

from .events import (
    BlobFinished,
    BlobMounted,
    BlobProgress,
    BlobRetry,
    BlobStarted,
    BlobWaiting,
    Event,
    ExportFinished,
    ExportPlanned,
    Failed,
    ImportFinished,
    ImportPlanned,
    LocalModel,
    ManifestResolved,
    ManifestRetry,
    Pruned,
    PullFinished,
    PushFinished,
    PushPlanned,
    Removed,
    Resolving,
    Verified,
    WritingManifest,
)
from .units import format_rate, format_size, plural

# The summary of a pull fits on one line of this many columns, however long the model's name.
SUMMARY_WIDTH = 100
# Events the JSON renderer leaves out: per-chunk progress would drown a script, and the phases that are over in a
# moment tell it nothing that the next record does not.
JSON_SILENT_KINDS = frozenset({BlobProgress.kind, Resolving.kind, WritingManifest.kind})
# On a dry run, JSON has a `manifest` record per model, whatever it took to fetch it: a cache key made of the
# output stays the same when a fetch had to be retried.
_DRY_RUN_SILENT_KINDS = JSON_SILENT_KINDS | {ManifestRetry.kind}


def summary_line(event: PullFinished, width: int = SUMMARY_WIDTH) -> str:
    """One line of at most ``width`` columns. The model's name is cut first, down to a few letters; on a narrow
    terminal the speed goes next, then the end of the line."""
    if event.downloaded_blobs == 0:
        size = f"{format_size(event.total_bytes)}, {plural(event.present_blobs, 'blob')}"
        forms = [f"{{}} is already up to date: {size}"]
    else:
        speed = event.downloaded_bytes / event.seconds if event.seconds > 0 else 0.0
        blobs = f"{plural(event.downloaded_blobs, 'blob')} new, {event.present_blobs} present"
        took = f"{format_size(event.total_bytes)} in {event.seconds:.1f}s"
        forms = [f"pulled {{}}: {took} at {format_rate(speed)}, {blobs}", f"pulled {{}}: {took}, {blobs}"]
    for text in forms:
        room = max(width - len(text) + 2, 8)
        line = text.format(event.model if len(event.model) <= room else event.model[: room - 1] + "…")
        if len(line) <= width:
            return line
    return line[: width - 1] + "…"


def plan_line(event: ManifestResolved) -> str:
    """What a dry run of a pull would do, from its manifest event."""
    missing = event.blobs - event.present_blobs
    return (
        f"{event.model}: {plural(event.blobs, 'blob')}, {format_size(event.total_bytes)}; "
        f"{event.present_blobs} already present, {missing} to download "
        f"({format_size(event.total_bytes - event.present_bytes)}); manifest {event.digest}"
    )


Plan = ManifestResolved | ExportPlanned | ImportPlanned | PushPlanned
PLANS = (ManifestResolved, ExportPlanned, ImportPlanned, PushPlanned)
Finish = PullFinished | ExportFinished | ImportFinished | PushFinished
FINISHES = (PullFinished, ExportFinished, ImportFinished, PushFinished)


def plan_totals(event: Plan) -> tuple[str, int, int]:
    """What a plan's display is called, the bytes it moves in all, and those already where they go."""
    if isinstance(event, ExportPlanned):
        return event.output, event.total_bytes, 0
    return event.model, event.total_bytes, event.present_bytes


def is_dry_run(event: Plan, dry_run: bool) -> bool:
    """A pull's dry run is the renderer's to know; the other commands' plans say so themselves."""
    return dry_run if isinstance(event, ManifestResolved) else event.dry_run


def plan_text(event: Plan, *, dry_run: bool) -> str:
    """What a command is about to do: said as it starts, and as the whole answer of a dry run."""
    if isinstance(event, ManifestResolved):
        if dry_run:
            return plan_line(event)
        return (
            f"pulling {event.model}: {plural(event.blobs, 'blob')}, {format_size(event.total_bytes)} "
            f"({event.present_blobs} already present)"
        )
    if isinstance(event, ExportPlanned):
        return (
            f"{'would export' if dry_run else 'exporting'} {plural(len(event.models), 'model')} to "
            f"{event.output} ({event.layout}): {plural(event.blobs, 'blob')}, {format_size(event.total_bytes)}"
        )
    if isinstance(event, ImportPlanned):
        verb = "would import" if dry_run else "importing"
    else:
        verb = f"{'would push' if dry_run else 'pushing'} {event.source} to"
    line = (
        f"{verb} {event.model}: {plural(event.blobs, 'blob')}, {format_size(event.total_bytes)} "
        f"({event.present_blobs} already there"
    )
    if isinstance(event, PushPlanned) and event.mountable_blobs:
        line += f", {event.mountable_blobs} to mount"
    return line + ")"


def finish_line(event: Finish, width: int = SUMMARY_WIDTH) -> str:
    """The one line a command ends with, at most ``width`` columns."""
    if isinstance(event, PullFinished):
        return summary_line(event, width)
    text = _finish_text(event)
    return text if len(text) <= width else text[: width - 1] + "…"


def _finish_text(event: ExportFinished | ImportFinished | PushFinished) -> str:
    if isinstance(event, ExportFinished):
        return (
            f"exported {plural(len(event.models), 'model')} to {event.output}: {plural(event.blobs, 'blob')}, "
            f"{format_size(event.total_bytes)} in {event.seconds:.1f}s"
        )
    if isinstance(event, ImportFinished):
        return (
            f"imported {event.model}: {format_size(event.installed_bytes)} in {event.seconds:.1f}s, "
            f"{plural(event.installed_blobs, 'blob')} new, {event.present_blobs} present"
        )
    mounted = f", {event.mounted_blobs} mounted" if event.mounted_blobs else ""
    manifest = "" if event.manifest_uploaded else "; the registry already had this manifest"
    return (
        f"pushed {event.model}: {format_size(event.uploaded_bytes)} in {event.seconds:.1f}s, "
        f"{plural(event.uploaded_blobs, 'blob')} uploaded{mounted}, {event.present_blobs} already there{manifest}"
    )


def result_lines(event: Event) -> list[str]:
    """The human lines for the outcome of ``verify``, ``prune`` and ``rm``, the same in every human renderer."""
    if isinstance(event, Verified):
        return [
            f"verified {event.model}: {plural(event.blobs, 'blob')}, {format_size(event.total_bytes)}, "
            "every one matches its digest"
        ]
    if isinstance(event, Pruned):
        what = f"{plural(event.blobs, 'blob')} no model uses"
        if not event.dry_run:
            return [f"pruned {what}, {format_size(event.freed_bytes)} freed"]
        return [f"would prune {what} ({format_size(event.freed_bytes)})", *(f"  {d}" for d in event.digests)]
    if isinstance(event, Removed):
        what = f"its manifest and {plural(event.blobs, 'blob')} no other model uses"
        if not event.dry_run:
            return [f"removed {event.model}: {what}, {format_size(event.freed_bytes)} freed"]
        return [
            f"would remove {event.model}: {what} ({format_size(event.freed_bytes)})",
            f"  {event.manifest_path}",
            *(f"  {d}" for d in event.digests),
        ]
    return []


def model_row(event: LocalModel) -> tuple[str, str, str, str, str]:
    """One row of ``list``: name, size, blobs, the start of the manifest digest, and what is wrong if anything."""
    return (
        event.model,
        format_size(event.total_bytes) if event.digest else "-",
        str(event.blobs),
        (event.digest or "")[7:19] or "invalid manifest",
        f"{plural(event.missing_blobs, 'blob')} missing" if event.missing_blobs else "",
    )


def error_line(event: Failed) -> str:
    if event.model and event.model not in event.message:
        return f"error: {event.model}: {event.message}"
    return f"error: {event.message}"


class Tally:
    """Bytes done, overall and per blob, for the model being pulled; both only grow, because blob progress only
    grows."""

    def __init__(self) -> None:
        self.total = 0
        self.completed = 0
        self._blobs: dict[str, int] = {}

    def apply(self, event: Event) -> None:
        if isinstance(event, PLANS):
            _, self.total, self.completed = plan_totals(event)
            self._blobs = {}
        elif isinstance(event, BlobMounted):
            self._advance(event.digest, event.size)
        elif isinstance(event, BlobStarted):
            self._advance(event.digest, event.offset)
        elif isinstance(event, BlobProgress):
            self._advance(event.digest, event.completed)
        elif isinstance(event, BlobFinished):
            self._advance(event.digest, event.size)

    def blob(self, digest: str) -> int:
        return self._blobs.get(digest, 0)

    def _advance(self, digest: str, completed: int) -> None:
        before = self._blobs.get(digest, 0)
        if completed > before:
            self.completed += completed - before
            self._blobs[digest] = completed


class Stream:
    """A text stream that goes quiet, for good, once its reader has gone away (EPIPE) or it was closed."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream: IO[str] | None = stream

    def write(self, text: str) -> None:
        if self._stream is None:
            return
        try:
            self._stream.write(text)
            self._stream.flush()
        except (BrokenPipeError, ValueError):
            # ValueError: the stream was closed under us.
            self._give_up()
        except OSError as exc:
            if exc.errno != errno.EPIPE:
                raise
            self._give_up()

    def _give_up(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            silence(stream)


class QuietRenderer:
    """``-q``: errors only (and, for ``list``, the names alone, which is what a script wants of it)."""

    def __init__(self, out: IO[str], err: IO[str]) -> None:
        self._out = Stream(out)
        self._err = Stream(err)

    def __call__(self, event: Event) -> None:
        if isinstance(event, Failed):
            self._err.write(error_line(event) + "\n")
        elif isinstance(event, LocalModel):
            self._out.write(event.model + "\n")

    def close(self) -> None:
        pass


class JsonRenderer:
    """One JSON object per line on ``out``: every event but per-chunk progress. An error is also said on
    ``err`` as a line, for the person reading the log of the script."""

    def __init__(self, out: IO[str], err: IO[str] | None = None, *, dry_run: bool = False) -> None:
        self._out = Stream(out)
        self._err = Stream(err) if err is not None else None
        self._silent = _DRY_RUN_SILENT_KINDS if dry_run else JSON_SILENT_KINDS

    def __call__(self, event: Event) -> None:
        if event.kind in self._silent:
            return
        self.write({"event": event.kind, **asdict(event)})
        if isinstance(event, Failed) and self._err is not None:
            self._err.write(error_line(event) + "\n")

    def write(self, record: dict[str, Any]) -> None:
        self._out.write(json.dumps(record, separators=(",", ":")) + "\n")

    def close(self) -> None:
        pass


class PlainRenderer:
    """Greppable lines for logs and pipes: start, retries, a progress line now and then, and the end; ``list``
    as tab-separated rows."""

    def __init__(
        self,
        err: IO[str],
        out: IO[str] | None = None,
        *,
        dry_run: bool = False,
        interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._err = Stream(err)
        self._out = Stream(out) if out is not None else self._err
        self._dry_run = dry_run
        self._interval = interval
        self._clock = clock
        self._tally = Tally()
        self._labels: dict[str, str] = {}
        self._next_report = 0.0

    def __call__(self, event: Event) -> None:
        self._tally.apply(event)
        if isinstance(event, PLANS) and is_dry_run(event, self._dry_run):
            self._print(self._out, plan_text(event, dry_run=True))
        elif isinstance(event, ManifestRetry):
            self._line(
                f"retrying the manifest of {event.model} (attempt {event.attempt}, in {event.delay:.1f}s): "
                f"{event.reason}"
            )
        elif isinstance(event, PLANS):
            self._next_report = self._clock() + self._interval
            self._line(plan_text(event, dry_run=False))
        elif isinstance(event, BlobWaiting):
            self._labels[event.digest] = event.label
            self._line(f"waiting for {event.label}: another process sharing the store is downloading it")
        elif isinstance(event, BlobStarted):
            self._labels[event.digest] = event.label
        elif isinstance(event, BlobRetry):
            label = self._labels.get(event.digest, event.digest)
            self._line(f"retrying {label} (attempt {event.attempt}, in {event.delay:.1f}s): {event.reason}")
        elif isinstance(event, BlobProgress) and self._clock() >= self._next_report:
            self._next_report = self._clock() + self._interval
            percent = 100 * self._tally.completed / self._tally.total if self._tally.total else 100.0
            self._line(
                f"{event.model}: {percent:.0f}% ({format_size(self._tally.completed)} "
                f"of {format_size(self._tally.total)})"
            )
        elif isinstance(event, FINISHES):
            self._line(finish_line(event))
        elif isinstance(event, LocalModel):
            self._print(self._out, "\t".join(model_row(event)).rstrip())
        elif isinstance(event, Failed):
            self._line(error_line(event))
        else:
            for line in result_lines(event):
                self._print(self._out, line)

    def _line(self, text: str) -> None:
        self._print(self._err, text)

    @staticmethod
    def _print(stream: Stream, text: str) -> None:
        stream.write(text + "\n")

    def close(self) -> None:
        pass


def silence(stream: IO[str]) -> None:
    """Point a stream's descriptor at /dev/null, so that neither our next write nor the interpreter's final
    flush fails again on it."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def __getattr__(name: str) -> object:
    if name in ("RichRenderer", "Output", "MAX_BLOB_BARS"):
        import warnings

        from . import terminal

        warnings.warn(
            f"ollama_pull.progress.{name} is now ollama_pull.terminal.{name}; the old name goes in 0.3",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(terminal, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
