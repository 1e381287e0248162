"""The command line in-process: usage errors, version, help, completions, renderers."""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

import pytest
from typer.testing import CliRunner

from ollama_pull import __version__
from ollama_pull.cli import YOUNG_COLLECTION_THRESHOLD, ExitCode, app, exit_code_for
from ollama_pull.errors import (
    AuthenticationError,
    BlobError,
    ClientTooOld,
    IntegrityError,
    InvalidManifest,
    InvalidReference,
    ModelNotFound,
    RegistryError,
    StorageError,
)
from ollama_pull.events import BlobFinished, BlobProgress, BlobRetry, BlobStarted, ManifestResolved, PullFinished
from ollama_pull.progress import JsonRenderer, PlainRenderer

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()
DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize("reference", ["", "..", "a/b/c/d", "model:a:b", "my model", "ns/.x"])
def test_invalid_reference_is_a_one_line_usage_error(reference: str) -> None:
    result = runner.invoke(app, [reference])
    assert result.exit_code == ExitCode.USAGE
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: invalid model reference")
    assert "Traceback" not in result.output


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"ollama-pull {__version__}"


def test_the_command_line_raises_its_open_files_limit_to_the_hard_one() -> None:
    # At -j 512 a pull can hold more descriptors than the 1,024 many systems allow by default.
    resource = pytest.importorskip("resource")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard limit ({hard}) leaves no room to raise a soft one of 256")
    code = (
        "import resource, sys\n"
        "from ollama_pull import cli\n"
        "sys.argv = ['ollama-pull', '--version']\n"
        "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    lowered = f"ulimit -Sn 256 && exec {shlex.quote(sys.executable)} -c {shlex.quote(code)}"
    result = subprocess.run(["bash", "-c", lowered], capture_output=True, text=True, check=True)
    assert int(result.stdout.split()[-1]) == (hard if hard != resource.RLIM_INFINITY else 10240)


def test_help_lists_the_commands_exit_codes_and_examples() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for text in (
        "pull ",
        "list ",
        "verify ",
        "prune ",
        "rm ",
        "ollama-pull MODEL... is short for ollama-pull pull MODEL...",
        "ollama-pull library/list",
        "Exit codes: 0 ok, 1 failed, 2 usage, 3 not found",
        "143 terminated (SIGTERM)",
        "ollama-pull library/flux2-klein",
    ):
        assert text in result.output


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("pull", ["--models-dir", "--concurrency", "--stall-timeout", "--retries", "--dry-run", "--prune", "--json"]),
        ("list", ["--models-dir", "--json", "--quiet"]),
        ("verify", ["--all", "--file", "--models-dir", "--json", "--quiet"]),
        ("prune", ["--dry-run", "--models-dir", "--json", "--quiet"]),
        ("rm", ["--dry-run", "--models-dir", "--json", "--quiet"]),
    ],
)
def test_each_command_explains_its_own_options(command: str, options: list[str]) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    for option in options:
        assert option in result.output
    # The 0.1 mode flags are hidden aliases: they work, but help no longer offers them.
    assert "--list" not in result.output
    assert "--verify" not in result.output


def test_the_processes_help_says_which_pulls_the_helpers_take() -> None:
    from ollama_pull.processes import MAX_MEAN_BLOB, MIN_BLOBS

    result = runner.invoke(app, ["pull", "--help"])
    # Rich wraps the help in a panel: its borders and line breaks fall anywhere in a sentence.
    text = " ".join(result.output.replace("\u2502", " ").split())
    # A forked helper takes any pull of MIN_BLOBS missing blobs or more; only a spawned one minds their size.
    assert f"Processes that share a pull of {MIN_BLOBS} missing blobs or more, at most one per CPU" in text
    assert MAX_MEAN_BLOB == 1024 * 1024
    assert "Off Linux a helper is a new interpreter, started only for blobs under 1 MiB on average." in text


@pytest.mark.parametrize("args", [["-j", "0", "m"], ["--retries", "0", "m"], ["--stall-timeout", "0", "m"], []])
def test_bad_options_are_usage_errors(args: list[str]) -> None:
    assert runner.invoke(app, args).exit_code == ExitCode.USAGE


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidReference("x", "y"), ExitCode.USAGE),
        (ModelNotFound("m"), ExitCode.NOT_FOUND),
        (AuthenticationError("no"), ExitCode.AUTH),
        (IntegrityError(DIGEST, "mismatch", 6), ExitCode.INTEGRITY),
        (BlobError(DIGEST, "reset", 6), ExitCode.FAILED),
        (StorageError("full"), ExitCode.STORAGE),
        (InvalidManifest("m", "bad"), ExitCode.FAILED),
        (ClientTooOld("m"), ExitCode.FAILED),
        (RegistryError("x"), ExitCode.FAILED),
    ],
)
def test_exit_codes(error: Exception, code: ExitCode) -> None:
    assert exit_code_for(error) is code  # type: ignore[arg-type]


def test_completion_scripts_are_current() -> None:
    check = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate_completions.py"), "--check"], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
    for shell in ("bash", "zsh", "fish"):
        assert "_OLLAMA_PULL_COMPLETE" in (ROOT / "completions" / f"ollama-pull.{shell}").read_text()


def sample_events() -> list[object]:
    return [
        ManifestResolved("m:latest", DIGEST, 2, 300, 1, 100),
        BlobStarted("m:latest", DIGEST, "tensor/a.st", 200, 0),
        BlobProgress("m:latest", DIGEST, 50, 200),
        BlobRetry("m:latest", DIGEST, 1, "connection reset", 0.2),
        BlobProgress("m:latest", DIGEST, 200, 200),
        BlobFinished("m:latest", DIGEST, 200, 1.5),
        PullFinished("m:latest", DIGEST, "/models/manifests/x", 300, 250, 1, 1, 2.0),
    ]


def test_json_renderer_writes_one_object_per_event_without_chunk_progress() -> None:
    stream = io.StringIO()
    renderer = JsonRenderer(stream)
    for event in sample_events():
        renderer(event)  # type: ignore[arg-type]
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [record["event"] for record in records] == ["manifest", "blob_start", "retry", "blob_done", "done"]
    assert records[2] == {
        "event": "retry",
        "model": "m:latest",
        "digest": DIGEST,
        "attempt": 1,
        "reason": "connection reset",
        "delay": 0.2,
    }
    assert records[0]["present_bytes"] == 100


def test_plain_renderer_prints_greppable_lines_without_escape_codes() -> None:
    stream = io.StringIO()
    now = [0.0]
    renderer = PlainRenderer(stream, interval=5.0, clock=lambda: now[0])
    for index, event in enumerate(sample_events()):
        now[0] = index * 3.0
        renderer(event)  # type: ignore[arg-type]
    lines = stream.getvalue().splitlines()
    assert lines[0] == "pulling m:latest: 2 blobs, 300 B (1 already present)"
    # Progress at most every 5 s: the events come 3 s apart, so every other progress event prints.
    assert lines[1:4] == [
        "m:latest: 50% (150 B of 300 B)",
        "retrying tensor/a.st (attempt 1, in 0.2s): connection reset",
        "m:latest: 100% (300 B of 300 B)",
    ]
    assert lines[4].startswith("pulled m:latest: 300 B in 2.0s")
    assert "\x1b" not in stream.getvalue()


def test_rich_renderer_shows_overall_and_a_few_blob_bars() -> None:
    from rich.console import Console

    from ollama_pull.terminal import MAX_BLOB_BARS, RichRenderer

    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    renderer = RichRenderer(console)
    digests = [f"sha256:{n:064x}" for n in range(12)]
    renderer(ManifestResolved("m:latest", DIGEST, 13, 1300, 1, 100))
    for digest in digests:
        renderer(BlobStarted("m:latest", digest, f"tensor/{digest[-2:]}.st", 100, 0))
    progress = renderer._progress
    assert progress is not None

    def descriptions_drawn() -> list[str]:
        assert progress is not None
        table = next(iter(progress.get_renderables()))
        return [str(cell) for cell in table.columns[0]._cells]  # type: ignore[attr-defined]

    descriptions = descriptions_drawn()
    assert descriptions[0] == "m:latest"
    assert len([d for d in descriptions if d.startswith("  tensor/")]) == MAX_BLOB_BARS
    assert descriptions[-1] == "  +4 more"
    renderer(BlobProgress("m:latest", digests[0], 60, 100))
    renderer(BlobFinished("m:latest", digests[0], 100, 0.1))
    overall = progress.tasks[0]
    assert overall.completed == 200
    # A finished bar disappears, a waiting blob takes its place, and "+N more" stays last.
    descriptions = descriptions_drawn()
    assert "  tensor/00.st" not in descriptions
    assert "  tensor/08.st" in descriptions
    assert descriptions[-1] == "  +3 more"
    renderer(PullFinished("m:latest", DIGEST, "/x", 1300, 1200, 12, 1, 1.0))
    assert [task.description for task in progress.tasks] == ["[bold]m:latest[/bold]"]
    output = console.file.getvalue()  # type: ignore[attr-defined]
    # The summary comes after the last frame of the bars.
    assert "pulled m:latest" in output.rstrip().splitlines()[-1]


def test_the_console_script_leaves_without_the_interpreters_teardown() -> None:
    # Its output is flushed and its exit code kept; nothing registered to run at the interpreter's exit runs.
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        probe = (
            "import atexit, sys\n"
            "from ollama_pull.cli import entry\n"
            "atexit.register(lambda: print('torn down', file=sys.stderr))\n"
            # Waits in the stream's buffer (a pipe's) until something flushes it.
            "sys.stdout.write('before ')\n"
            f"sys.argv = ['ollama-pull', *{list(args)!r}]\n"
            "entry()\n"
        )
        environment = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
        return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=environment)

    version = run("--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout == f"before ollama-pull {__version__}\n"
    assert "torn down" not in version.stderr
    refused = run("a/b/c/d/e")
    assert refused.returncode == ExitCode.USAGE
    assert refused.stdout == "before "
    assert "invalid model reference" in refused.stderr
    assert "torn down" not in refused.stderr
    scripts = importlib.metadata.entry_points(group="console_scripts")
    assert scripts["ollama-pull"].value == "ollama_pull.cli:entry"


def test_profilers_still_see_the_end_of_a_command(tmp_path: Path) -> None:
    # cProfile writes its file at the interpreter's shutdown (python -m cProfile -m ollama_pull, as bench/PROFILE.md
    # runs it), and coverage its data: under a profiler or a tracer the command keeps that shutdown.
    written = tmp_path / "module.prof"
    subprocess.run(
        [sys.executable, "-m", "cProfile", "-o", str(written), "-m", "ollama_pull", "--version"],
        capture_output=True,
        check=True,
    )
    assert written.stat().st_size > 0
    for hook in ("sys.setprofile", "sys.settrace"):
        probe = (
            "import atexit, sys\n"
            "from ollama_pull.cli import entry\n"
            "atexit.register(lambda: print('torn down', file=sys.stderr))\n"
            f"{hook}(lambda *args: None)\n"
            "sys.argv = ['ollama-pull', '--version']\n"
            "entry()\n"
        )
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert done.stderr.strip() == "torn down"


def test_the_cli_freezes_what_it_loaded_and_collects_the_youngest_objects_less_often() -> None:
    probe = (
        "import gc, sys\n"
        "from ollama_pull.cli import main\n"
        "sys.argv = ['ollama-pull', '--version']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(gc.get_threshold()[0], gc.get_freeze_count() > 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[-1] == f"{YOUNG_COLLECTION_THRESHOLD} True"


def test_version_and_help_do_not_load_the_download_stack() -> None:
    # --version answers in a tenth of a second because httpx2, asyncio and cryptography are not imported for it.
    probe = (
        "import sys, ollama_pull.cli; "
        "print(sorted(m for m in ('httpx2', 'cryptography', 'ollama_pull.engine') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    import ollama_pull
    import ollama_pull.api  # a submodule import must not shadow the function of the same name

    assert ollama_pull.pull.__name__ == "pull"
    assert sorted(ollama_pull.__all__) == sorted([*ollama_pull._EXPORTS, "__version__"])


def test_the_cli_tells_sniffio_that_asyncio_runs_its_loop_and_undoes_it_after() -> None:
    # httpcore2's pool and anyio ask sniffio on every lock operation; told, it no longer sniffs for the current
    # task each time (5% of the event loop's time on 4,096 small blobs).
    import sniffio

    from ollama_pull.cli import _run_until_signalled

    seen: list[str | None] = []

    async def work() -> None:
        seen.append(sniffio.thread_local.name)

    assert _run_until_signalled(work()) is None
    assert seen == ["asyncio"]
    assert sniffio.thread_local.name is None


def test_a_signal_the_cli_was_started_with_ignored_stays_ignored() -> None:
    # What a shell does for a script's background jobs: a Ctrl-C meant for the script must leave them running.
    import asyncio

    from ollama_pull.cli import _run_until_signalled

    seen: list[object] = []

    async def work() -> None:
        seen.append(signal.getsignal(signal.SIGINT))
        os.kill(os.getpid(), signal.SIGINT)
        # A handler, had one been installed, would have cancelled this task by now.
        for _ in range(3):
            await asyncio.sleep(0)
        seen.append("finished")

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert _run_until_signalled(work()) is None
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert seen == [signal.SIG_IGN, "finished"]


@pytest.mark.parametrize("choice", ["", "asyncio", "uvloop"])
def test_the_cli_runs_on_uvloop_when_it_is_installed_unless_told_otherwise(
    choice: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    uvloop = pytest.importorskip("uvloop")
    from ollama_pull.cli import _run_until_signalled

    monkeypatch.setenv("OLLAMA_PULL_EVENT_LOOP", choice)
    seen: list[asyncio.AbstractEventLoop] = []

    async def work() -> None:
        seen.append(asyncio.get_running_loop())

    assert _run_until_signalled(work()) is None
    assert isinstance(seen[0], uvloop.Loop) is (choice != "asyncio")


@pytest.mark.parametrize(
    ("choice", "message"),
    [
        ("uvloop", "OLLAMA_PULL_EVENT_LOOP=uvloop, but uvloop is not installed: pip install 'ollama-pull[uvloop]'"),
        ("trio", "OLLAMA_PULL_EVENT_LOOP must be asyncio or uvloop, not 'trio'"),
    ],
)
def test_an_event_loop_the_cli_cannot_run_is_a_usage_error(
    choice: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As if uvloop were not installed (the extra is optional; Windows has none).
    monkeypatch.setitem(sys.modules, "uvloop", None)
    monkeypatch.setenv("OLLAMA_PULL_EVENT_LOOP", choice)
    result = runner.invoke(app, ["library/demo"])
    assert result.exit_code == ExitCode.USAGE
    [line] = result.output.strip().splitlines()
    assert message in line


def test_a_pull_loads_its_event_loop_before_it_forks_its_spares(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A module loaded after the fork is loaded twice, once in each process, and a spare's copy is its own memory.
    import typer

    from ollama_pull import cli, processes

    order: list[str] = []
    choose = cli._loop_factory

    def loop_factory() -> object:
        order.append("event loop chosen")
        return choose()

    def forked_helpers(count: int) -> NoReturn:
        order.append("spares forked")
        raise typer.Exit(0)

    monkeypatch.setattr(cli, "_loop_factory", loop_factory)
    monkeypatch.setattr(processes, "forked_helpers", forked_helpers)
    result = runner.invoke(app, ["library/demo", "--models-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert order == ["event loop chosen", "spares forked"]


def test_without_uvloop_the_cli_runs_on_asyncios_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from ollama_pull.cli import _run_until_signalled

    monkeypatch.setitem(sys.modules, "uvloop", None)
    seen: list[str] = []

    async def work() -> None:
        seen.append(type(asyncio.get_running_loop()).__module__)

    assert _run_until_signalled(work()) is None
    assert seen[0].startswith("asyncio.")
