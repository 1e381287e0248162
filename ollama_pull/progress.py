"""Progress renderers: Rich bars on a terminal, plain lines in pipes, JSON lines for scripts.

Each renderer is an event callback (see :mod:`ollama_pull.events`); the engine never knows which one listens.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from typing import IO, Any

from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from .events import (
    BlobFinished,
    BlobProgress,
    BlobRetry,
    BlobStarted,
    Event,
    ManifestResolved,
    PullFinished,
)
from .units import format_size

# More bars than this flood a terminal and say nothing more; the rest are summed up in one line.
MAX_BLOB_BARS = 8


def summary_line(event: PullFinished) -> str:
    speed = event.downloaded_bytes / event.seconds if event.seconds > 0 else 0.0
    return (
        f"pulled {event.model}: {format_size(event.total_bytes)} in {event.seconds:.1f}s "
        f"({format_size(speed)}/s), {event.downloaded_blobs} blobs downloaded, "
        f"{event.present_blobs} already present; manifest {event.manifest_path}"
    )


class Tally:
    """Overall bytes done for the model being pulled; it only grows, because blob progress only grows."""

    def __init__(self) -> None:
        self.total = 0
        self.completed = 0
        self._blobs: dict[str, int] = {}

    def apply(self, event: Event) -> None:
        if isinstance(event, ManifestResolved):
            self.total, self.completed, self._blobs = event.total_bytes, event.present_bytes, {}
        elif isinstance(event, BlobStarted):
            self._advance(event.digest, event.offset)
        elif isinstance(event, BlobProgress):
            self._advance(event.digest, event.completed)
        elif isinstance(event, BlobFinished):
            self._advance(event.digest, event.size)

    def _advance(self, digest: str, completed: int) -> None:
        before = self._blobs.get(digest, 0)
        if completed > before:
            self.completed += completed - before
            self._blobs[digest] = completed


class JsonRenderer:
    """One JSON object per line: every event but per-chunk progress, which would drown a script."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def __call__(self, event: Event) -> None:
        if not isinstance(event, BlobProgress):
            self.write({"event": event.kind, **asdict(event)})

    def write(self, record: dict[str, Any]) -> None:
        self._stream.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._stream.flush()

    def close(self) -> None:
        pass


class PlainRenderer:
    """Greppable lines for logs and pipes: start, retries, a progress line now and then, and the end."""

    def __init__(self, stream: IO[str], *, interval: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._stream = stream
        self._interval = interval
        self._clock = clock
        self._tally = Tally()
        self._labels: dict[str, str] = {}
        self._next_report = 0.0

    def __call__(self, event: Event) -> None:
        self._tally.apply(event)
        if isinstance(event, ManifestResolved):
            self._next_report = self._clock() + self._interval
            self._line(
                f"pulling {event.model}: {event.blobs} blobs, {format_size(event.total_bytes)} "
                f"({event.present_blobs} already present)"
            )
        elif isinstance(event, BlobStarted):
            self._labels[event.digest] = event.label
        elif isinstance(event, BlobRetry):
            label = self._labels.get(event.digest, event.digest)
            self._line(f"retrying {label} (failure {event.attempt}, in {event.delay:.1f}s): {event.reason}")
        elif isinstance(event, BlobProgress) and self._clock() >= self._next_report:
            self._next_report = self._clock() + self._interval
            percent = 100 * self._tally.completed / self._tally.total if self._tally.total else 100.0
            self._line(
                f"{event.model}: {percent:.0f}% ({format_size(self._tally.completed)} "
                f"of {format_size(self._tally.total)})"
            )
        elif isinstance(event, PullFinished):
            self._line(summary_line(event))

    def _line(self, text: str) -> None:
        self._stream.write(text + "\n")
        self._stream.flush()

    def close(self) -> None:
        pass


class _BlobColumn(ProgressColumn):
    """A column drawn for real tasks only, so the "+N more" row shows as plain text."""

    def __init__(self, inner: ProgressColumn) -> None:
        super().__init__()
        self._inner = inner

    def render(self, task: Task) -> RenderableType:
        return Text("") if task.fields.get("note") else self._inner.render(task)


class _Display(Progress):
    """Rich's progress display with the "+N more" row always drawn last, whatever order tasks were added in."""

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(sorted(self.tasks, key=lambda task: bool(task.fields.get("note"))))


class RichRenderer:
    """An overall bar plus a bar for each blob in flight (the first few), on a terminal; one display per model."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._tally = Tally()
        self._progress: Progress | None = None
        self._overall: TaskID | None = None
        self._more: TaskID | None = None
        self._bars: dict[str, TaskID] = {}
        self._waiting: dict[str, BlobStarted] = {}

    def __call__(self, event: Event) -> None:
        self._tally.apply(event)
        if isinstance(event, ManifestResolved):
            self._start(event)
            return
        progress = self._progress
        if progress is None or self._overall is None:
            return
        if isinstance(event, BlobStarted):
            self._waiting[event.digest] = event
            self._show_waiting(progress)
        elif isinstance(event, BlobProgress) and event.digest in self._bars:
            progress.update(self._bars[event.digest], completed=event.completed)
        elif isinstance(event, BlobFinished):
            self._waiting.pop(event.digest, None)
            bar = self._bars.pop(event.digest, None)
            if bar is not None:
                progress.remove_task(bar)
            self._show_waiting(progress)
        elif isinstance(event, BlobRetry):
            progress.console.print(f"[yellow]retrying[/] {event.digest[:19]}: {event.reason}", highlight=False)
        progress.update(self._overall, completed=self._tally.completed)
        if isinstance(event, PullFinished):
            self.close()
            self._console.print(summary_line(event), markup=False, highlight=False)

    def _start(self, event: ManifestResolved) -> None:
        self.close()
        self._progress = _Display(
            TextColumn("{task.description}", table_column=None),
            *(
                _BlobColumn(column)
                for column in (
                    BarColumn(),
                    DownloadColumn(binary_units=True),
                    TransferSpeedColumn(),
                    TimeRemainingColumn(),
                )
            ),
            console=self._console,
        )
        self._overall = self._progress.add_task(
            f"[bold]{event.model}", total=event.total_bytes, completed=event.present_bytes
        )
        self._progress.start()

    def _show_waiting(self, progress: Progress) -> None:
        while self._waiting and len(self._bars) < MAX_BLOB_BARS:
            digest, started = next(iter(self._waiting.items()))
            del self._waiting[digest]
            self._bars[digest] = progress.add_task(f"  {started.label}", total=started.size, completed=started.offset)
        if self._waiting and self._more is None:
            self._more = progress.add_task("", total=None, note=True)
        if self._more is not None:
            if self._waiting:
                progress.update(self._more, description=f"  +{len(self._waiting)} more")
            else:
                progress.remove_task(self._more)
                self._more = None

    def close(self) -> None:
        """Stop the display, leaving the overall bar on screen and dropping the blob bars."""
        if self._progress is None:
            return
        for task in (*self._bars.values(), *([self._more] if self._more is not None else [])):
            self._progress.remove_task(task)
        self._bars.clear()
        self._waiting.clear()
        self._more = None
        self._progress.stop()
        self._progress = None
