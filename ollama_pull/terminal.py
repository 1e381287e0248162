"""The renderer for a terminal: Rich bars while a pull runs, and tables.

It speaks the same events and prints the same lines as the plain renderer (:mod:`ollama_pull.progress`), drawn
with Rich; only this module and the CLI import Rich.
"""

from __future__ import annotations

from collections.abc import Iterable

from rich.console import Console, RenderableType
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskID, TextColumn, TimeRemainingColumn
from rich.table import Column, Table
from rich.text import Text

from .events import (
    BlobFinished,
    BlobProgress,
    BlobRetry,
    BlobStarted,
    BlobWaiting,
    Event,
    Failed,
    LocalModel,
    ManifestRetry,
    Resolving,
    WritingManifest,
)
from .progress import (
    FINISHES,
    PLANS,
    SUMMARY_WIDTH,
    Tally,
    error_line,
    finish_line,
    is_dry_run,
    model_row,
    plan_text,
    plan_totals,
    result_lines,
    silence,
)
from .units import format_progress, format_rate

# More bars than this flood a terminal and say nothing more; the rest are summed up in one line.
MAX_BLOB_BARS = 8


class Output(Console):
    """A Rich console that goes quiet when its reader goes away, where Rich's own would exit the process in the
    middle of a pull."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        silence(self.file)


class _StatusColumn(ProgressColumn):
    """A blob's speed, or what it is doing when bytes are not flowing (waiting for a lock, verifying)."""

    def render(self, task: Task) -> RenderableType:
        status = task.fields.get("status")
        if status:
            return Text(status, style="cyan")
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else format_rate(speed), style="progress.data.speed")


class _BytesColumn(ProgressColumn):
    def render(self, task: Task) -> RenderableType:
        if task.total is None:
            return Text("")
        return Text(format_progress(task.completed, task.total), style="progress.download")


class _BlobColumn(ProgressColumn):
    """A column drawn for real tasks only, so the "+N more" row shows as plain text."""

    def __init__(self, inner: ProgressColumn) -> None:
        super().__init__(table_column=inner.get_table_column())
        self._inner = inner

    def render(self, task: Task) -> RenderableType:
        return Text("") if task.fields.get("note") else self._inner.render(task)


class _Display(Progress):
    """Rich's progress display with the "+N more" row always drawn last, whatever order tasks were added in."""

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(sorted(self.tasks, key=lambda task: bool(task.fields.get("note"))))


class RichRenderer:
    """On a terminal: an overall bar plus a bar for each blob in flight (the first few), one display per model,
    every row on one line whatever the width; and ``list`` as a table."""

    def __init__(self, console: Console, out: Console | None = None, *, dry_run: bool = False) -> None:
        self._console = console
        self._out = out or console
        self._dry_run = dry_run
        self._tally = Tally()
        self._progress: Progress | None = None
        self._overall: TaskID | None = None
        self._model = ""
        self._more: TaskID | None = None
        self._bars: dict[str, TaskID] = {}
        self._waiting: dict[str, BlobStarted] = {}
        self._labels: dict[str, str] = {}
        self._rows: list[tuple[str, str, str, str, str]] = []

    def __call__(self, event: Event) -> None:
        self._tally.apply(event)
        if isinstance(event, PLANS) and is_dry_run(event, self._dry_run):
            self._out.print(plan_text(event, dry_run=True), markup=False, highlight=False)
        elif isinstance(event, Resolving) and not self._dry_run:
            self._start(event.model, "resolving")
        elif isinstance(event, ManifestRetry):
            self._note(f"retrying the manifest of {event.model} (attempt {event.attempt}): {event.reason}")
            self._phase(f"retry in {event.delay:.1f}s")
        elif isinstance(event, PLANS):
            self._resolved(*plan_totals(event))
        elif isinstance(event, LocalModel):
            self._rows.append(model_row(event))
        elif isinstance(event, Failed):
            self._note(error_line(event), style="bold red")
        elif isinstance(event, FINISHES):
            self._phase("")
            self.close()
            width = min(self._console.width, SUMMARY_WIDTH)
            self._console.print(finish_line(event, width), markup=False, highlight=False, soft_wrap=True)
        elif self._progress is not None:
            self._blob_event(self._progress, event)
        else:
            for line in result_lines(event):
                self._out.print(line, markup=False, highlight=False)

    def _blob_event(self, progress: Progress, event: Event) -> None:
        if isinstance(event, BlobWaiting):
            self._labels[event.digest] = event.label
            self._add_bar(progress, event.digest, event.label, None, status="waiting for another process")
        elif isinstance(event, BlobStarted):
            self._labels[event.digest] = event.label
            if event.digest in self._bars:
                progress.update(self._bars[event.digest], total=event.size, completed=event.offset, status="")
            else:
                self._waiting[event.digest] = event
                self._show_waiting(progress)
        elif isinstance(event, BlobProgress) and event.digest in self._bars:
            done = event.completed >= event.size
            progress.update(self._bars[event.digest], completed=event.completed, status="verifying" if done else "")
        elif isinstance(event, BlobFinished):
            self._waiting.pop(event.digest, None)
            bar = self._bars.pop(event.digest, None)
            if bar is not None:
                progress.remove_task(bar)
            self._show_waiting(progress)
        elif isinstance(event, BlobRetry):
            self._note(f"retrying {self._labels.get(event.digest, event.digest)}: {event.reason}", style="yellow")
        elif isinstance(event, WritingManifest):
            self._phase("writing manifest")
            return
        if self._overall is not None:
            progress.update(self._overall, completed=self._tally.completed)
            if self._tally.total and self._tally.completed >= self._tally.total:
                self._phase("verifying")

    def _start(self, model: str, phase: str) -> None:
        self.close()
        self._model = model
        self._progress = _Display(
            TextColumn(
                "{task.description}",
                table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis", min_width=8),
            ),
            *(
                _BlobColumn(column)
                for column in (
                    BarColumn(bar_width=None, table_column=Column(ratio=1, min_width=6, max_width=40)),
                    _BytesColumn(table_column=Column(no_wrap=True, justify="right")),
                    _StatusColumn(table_column=Column(no_wrap=True, justify="right")),
                    TimeRemainingColumn(compact=True, table_column=Column(no_wrap=True)),
                )
            ),
            console=self._console,
            expand=True,
        )
        self._overall = self._progress.add_task(Text(model, style="bold").markup, total=None, status=phase)
        self._progress.start()

    def _phase(self, phase: str) -> None:
        """What the model as a whole is doing, where its speed shows while bytes flow."""
        if self._progress is not None and self._overall is not None:
            self._progress.update(self._overall, status=phase)

    def _resolved(self, name: str, total: int, present: int) -> None:
        if self._progress is None or self._model != name:
            self._start(name, "")
        assert self._progress is not None
        assert self._overall is not None
        self._progress.update(self._overall, total=total, completed=present, status="")

    def _note(self, text: str, *, style: str = "") -> None:
        """A line above the bars (or on its own when no display runs), cut to the width rather than wrapped."""
        line = Text(text, style=style, no_wrap=True, overflow="ellipsis")
        (self._progress.console if self._progress is not None else self._console).print(line, soft_wrap=False)

    def _add_bar(self, progress: Progress, digest: str, label: str, total: int | None, *, status: str) -> None:
        self._bars[digest] = progress.add_task(
            Text(f"  {label}").markup, total=total, completed=self._tally.blob(digest), status=status
        )

    def _show_waiting(self, progress: Progress) -> None:
        while self._waiting and len(self._bars) < MAX_BLOB_BARS:
            digest, started = next(iter(self._waiting.items()))
            del self._waiting[digest]
            # A blob that waited behind "+N more" may be well under way: its bar starts where the blob is.
            self._add_bar(progress, digest, started.label, started.size, status="")
        if self._waiting and self._more is None:
            self._more = progress.add_task("", total=None, note=True)
        if self._more is not None:
            if self._waiting:
                progress.update(self._more, description=f"  +{len(self._waiting)} more")
            else:
                progress.remove_task(self._more)
                self._more = None

    def close(self) -> None:
        """Stop the display, leaving the overall bar on screen and dropping the blob bars; print a ``list``."""
        if self._rows:
            table = Table("MODEL", "SIZE", "BLOBS", "DIGEST", "", box=None, header_style="bold")
            for row in self._rows:
                table.add_row(*row)
            self._out.print(table)
            self._rows = []
        if self._progress is None:
            return
        for task in (*self._bars.values(), *([self._more] if self._more is not None else [])):
            self._progress.remove_task(task)
        self._bars.clear()
        self._waiting.clear()
        self._more = None
        self._progress.stop()
        self._progress = None
