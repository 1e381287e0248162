"""What a person sees, renderer by renderer: rows that fit, one unit system, the phases, output that goes away."""

from __future__ import annotations

import io
import os

import pytest
from rich.console import Console

from ollama_pull.events import (
    BlobFinished,
    BlobProgress,
    BlobRetry,
    BlobStarted,
    BlobWaiting,
    Failed,
    ManifestResolved,
    PullFinished,
    Removed,
    Resolving,
    WritingManifest,
)
from ollama_pull.progress import (
    SUMMARY_WIDTH,
    JsonRenderer,
    PlainRenderer,
    Stream,
    summary_line,
)
from ollama_pull.terminal import MAX_BLOB_BARS, RichRenderer
from ollama_pull.units import format_progress, format_size, plural

MODEL = "registry.example.com:5000/some-team/a-model-with-a-rather-long-name:q4_K_M-2026"
LABEL = "text_encoder/model.layers.31.self_attn.q_proj.weight-00017-of-00042.safetensors"


def digest(n: int) -> str:
    return f"sha256:{n:064x}"


def terminal(width: int) -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=width, color_system=None)


def drawn_rows(renderer: RichRenderer, width: int) -> list[str]:
    """The rows of the display's current frame, rendered at ``width``."""
    progress = renderer._progress
    assert progress is not None
    console = terminal(width)
    [table] = list(progress.get_renderables())
    return ["".join(segment.text for segment in line) for line in console.render_lines(table, console.options)]


def started_pull(console: Console, blobs: int = 12, size: int = 5 * 1024 * 1024) -> RichRenderer:
    renderer = RichRenderer(console)
    renderer(Resolving(MODEL))
    renderer(ManifestResolved(MODEL, digest(999), blobs, blobs * size, 0, 0))
    for n in range(blobs):
        renderer(BlobStarted(MODEL, digest(n), f"{LABEL}.{n}", size, 0))
        renderer(BlobProgress(MODEL, digest(n), 1536 * 1024, size))
    return renderer


@pytest.mark.parametrize("width", [60, 80, 120])
def test_every_row_fits_on_one_line_and_long_labels_end_in_an_ellipsis(width: int) -> None:
    renderer = started_pull(terminal(width))
    rows = drawn_rows(renderer, width)
    # The overall row, eight blob rows and "+N more": one line each, none wider than the terminal.
    assert len(rows) == 1 + MAX_BLOB_BARS + 1
    assert all(len(row) <= width for row in rows)
    assert "…" in rows[1]
    assert rows[-1].strip() == "+4 more"


def test_sizes_and_speeds_are_binary_without_thousands_separators() -> None:
    assert format_size(1029734) == "1005.6 KiB"
    assert format_progress(1536 * 1024, 5 * 1024 * 1024) == "1.5/5.0 MiB"
    assert format_progress(512, 5 * 1024 * 1024) == "512 B/5.0 MiB"
    assert plural(1, "blob") == "1 blob"
    assert plural(2, "blob") == "2 blobs"
    renderer = started_pull(terminal(120))
    text = "\n".join(drawn_rows(renderer, 120))
    assert "1.5/5.0 MiB" in text
    assert "MB" not in text.replace("MiB", "")
    assert "," not in text


def test_a_blob_row_that_appears_from_more_shows_the_bytes_it_already_has() -> None:
    renderer = started_pull(terminal(120))
    waiting = digest(MAX_BLOB_BARS)
    renderer(BlobProgress(MODEL, waiting, 3 * 1024 * 1024, 5 * 1024 * 1024))
    renderer(BlobFinished(MODEL, digest(0), 5 * 1024 * 1024, 1.0))
    progress = renderer._progress
    assert progress is not None
    bar = next(task for task in progress.tasks if task.id == renderer._bars[waiting])
    assert bar.completed == 3 * 1024 * 1024
    rows = [row for row in drawn_rows(renderer, 120) if row.startswith("  text_encoder")]
    assert sum("3.0/5.0 MiB" in row for row in rows) == 1
    assert not any("?" in row for row in rows)


def test_the_phases_show_on_the_overall_row() -> None:
    renderer = RichRenderer(terminal(100))
    renderer(Resolving(MODEL))
    assert drawn_rows(renderer, 100)[0].rstrip().endswith("resolving")
    renderer(ManifestResolved(MODEL, digest(999), 2, 200, 0, 0))
    assert "resolving" not in drawn_rows(renderer, 100)[0]
    renderer(BlobWaiting(MODEL, digest(1), "held.st"))
    held = next(row for row in drawn_rows(renderer, 100) if "held.st" in row)
    assert "waiting for another process" in held
    renderer(BlobStarted(MODEL, digest(1), "held.st", 100, 0))
    renderer(BlobStarted(MODEL, digest(2), "other.st", 100, 0))
    renderer(BlobProgress(MODEL, digest(2), 100, 100))
    other = next(row for row in drawn_rows(renderer, 100) if "other.st" in row)
    assert "verifying" in other
    renderer(BlobProgress(MODEL, digest(1), 100, 100))
    assert "verifying" in drawn_rows(renderer, 100)[0]
    renderer(BlobFinished(MODEL, digest(1), 100, 0.1))
    renderer(BlobFinished(MODEL, digest(2), 100, 0.1))
    renderer(WritingManifest(MODEL, "/models/manifests/x"))
    assert "writing manifest" in drawn_rows(renderer, 100)[0]


def test_a_retry_line_names_the_blob_by_its_label() -> None:
    console = terminal(100)
    renderer = started_pull(console, blobs=2)
    renderer(BlobRetry(MODEL, digest(1), 1, "connection reset", 0.2))
    renderer.close()
    output = console.file.getvalue()  # type: ignore[attr-defined]
    retry = next(line for line in output.splitlines() if "retrying" in line)
    assert "text_encoder/model.layers" in retry
    assert digest(1) not in retry


@pytest.mark.parametrize("model", ["qwen3:8b", MODEL, "h" * 350 + "/ns/model:tag"])
def test_the_summary_fits_on_one_line_of_100_columns_or_of_the_terminal(model: str) -> None:
    event = PullFinished(model, digest(1), "/m", 5 * 1024**3, 5 * 1024**3, 12, 5, 3.5)
    for width in (60, 80):
        assert len(summary_line(event, width)) <= width
    assert summary_line(event, 80).endswith("12 blobs new, 5 present")
    line = summary_line(PullFinished(model, digest(1), "/m", 5 * 1024**3, 5 * 1024**3, 1234, 5, 1234.5))
    assert len(line) <= SUMMARY_WIDTH
    assert "1234 blobs new, 5 present" in line
    up_to_date = summary_line(PullFinished(model, digest(1), "/m", 5 * 1024**3, 0, 0, 5, 0.1))
    assert len(up_to_date) <= SUMMARY_WIDTH
    assert "is already up to date: 5.0 GiB, 5 blobs" in up_to_date


def test_a_stream_whose_reader_went_away_goes_quiet_for_good() -> None:
    read, write = os.pipe()
    os.close(read)
    with os.fdopen(write, "w") as pipe:
        stream = Stream(pipe)
        stream.write("first\n")  # EPIPE: dropped, and the descriptor now points at /dev/null
        stream.write("second\n")
        renderer = JsonRenderer(pipe)
        renderer(Failed(None, "still no traceback", 1))


def test_plain_and_json_say_an_error_on_stderr_and_json_also_as_a_record() -> None:
    out, err = io.StringIO(), io.StringIO()
    JsonRenderer(out, err)(Failed("m:latest", "model 'm:latest' not found", 3))
    assert (
        out.getvalue()
        == '{"event":"error","model":"m:latest","message":"model \'m:latest\' not found","exit_code":3}\n'
    )
    assert err.getvalue() == "error: model 'm:latest' not found\n"
    plain = io.StringIO()
    PlainRenderer(plain)(Failed("m:latest", "connection reset", 1))
    assert plain.getvalue() == "error: m:latest: connection reset\n"


def test_a_dry_run_of_rm_lists_what_would_go_on_stdout() -> None:
    out, err = io.StringIO(), io.StringIO()
    PlainRenderer(err, out)(
        Removed("m:latest", digest(9), "/models/manifests/m", 2, 3072, (digest(1), digest(2)), True)
    )
    assert out.getvalue().splitlines() == [
        "would remove m:latest: its manifest and 2 blobs no other model uses (3.0 KiB)",
        "  /models/manifests/m",
        f"  {digest(1)}",
        f"  {digest(2)}",
    ]
    assert err.getvalue() == ""


def test_the_terminal_renderers_old_home_still_works_and_says_its_new_one() -> None:
    import ollama_pull.progress

    with pytest.warns(DeprecationWarning, match="progress.RichRenderer is now ollama_pull.terminal.RichRenderer"):
        assert ollama_pull.progress.RichRenderer is RichRenderer
