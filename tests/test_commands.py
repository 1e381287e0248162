"""The commands in-process: which options each takes, how they combine, and the one output contract."""

from __future__ import annotations

import json
import re
import typing
from dataclasses import fields
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ollama_pull.cli import ExitCode, app
from ollama_pull.events import Event
from ollama_pull.progress import JSON_SILENT_KINDS
from ollama_pull.store import default_models_dir

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


# Every combination here is refused before any network or store access: one line, exit 2.
USAGE_ERRORS = [
    # Each command takes only the options that mean something to it.
    (["list", "library/demo"], "unexpected extra argument"),
    (["list", "--dry-run"], "no such option: --dry-run"),
    (["list", "--insecure"], "no such option: --insecure"),
    (["verify", "--mirror", "http://mirror:5000", "demo"], "no such option: --mirror"),
    (["verify", "-j", "4", "demo"], "no such option: -j"),
    (["verify", "--dry-run", "demo"], "no such option: --dry-run"),
    (["prune", "demo"], "unexpected extra argument"),
    (["prune", "--insecure"], "no such option: --insecure"),
    (["rm", "--mirror", "http://mirror:5000", "demo"], "no such option: --mirror"),
    (["rm", "-f", "models.txt"], "no such option: -f"),
    # What is missing, or contradicts itself.
    (["pull"], "no model given"),
    (["verify"], "no model given: pass verify MODEL..., -f FILE or --all"),
    (["verify", "--all", "demo"], "verify --all takes no models"),
    (["rm"], "no model given: pass rm MODEL..."),
    (["pull", "-j", "0", "demo"], "invalid value for '--concurrency' / '-j'"),
    (["pull", "--max-rate", "fast", "demo"], "invalid value for '--max-rate'"),
    (["pull", "--mirror", "ftp://mirror", "demo"], "is not an http:// or https:// URL"),
    (["pull", "x:y:z"], "it has two tags (':y' and ':z')"),
    (["--models-dir", "/nonexistent/parent/models", "list"], "/nonexistent/parent does not exist"),
    # The 0.1 mode flags, still accepted for a release, refuse what made no sense with them.
    (["--list", "demo"], "list takes no models"),
    (["--list", "--dry-run"], "--list takes no --dry-run or --prune"),
    (["--verify", "--dry-run", "demo"], "--verify takes no --dry-run or --prune"),
    (["--verify", "--prune", "demo"], "--verify takes no --dry-run or --prune"),
]


@pytest.mark.parametrize(("args", "message"), USAGE_ERRORS)
def test_a_combination_that_makes_no_sense_is_a_one_line_usage_error(args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == ExitCode.USAGE, result.output
    lines = [line for line in result.output.splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ")
    # Click words "no such option" in two ways across the versions CI runs: "no such option: -j" and "no such
    # option '-j'".
    assert message in lines[0].replace("option '", "option: ").replace("' (see", " (see")
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["list"],
        ["--json", "list"],
        ["--models-dir", "{models}", "list", "-q"],
        ["verify", "--all"],
        ["prune", "--dry-run"],
        ["prune", "--json", "--dry-run"],
    ],
)
def test_combinations_that_make_sense_run(args: list[str], isolated_environment: Path) -> None:
    result = runner.invoke(app, [arg.format(models=isolated_environment) for arg in args])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "args",
    [
        ["--json", "list", "library/demo"],  # refused by the option parser
        ["--json", "verify"],  # refused by the command
        ["verify", "--json", "--all", "demo"],
        ["--json", "pull", "x:y:z"],
    ],
)
def test_a_usage_error_under_json_is_also_an_error_record(args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == ExitCode.USAGE
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(records) == 1
    assert records[0]["event"] == "error"
    assert records[0]["model"] is None
    assert records[0]["exit_code"] == 2
    assert records[0]["message"]


def test_common_options_may_come_before_the_command(isolated_environment: Path) -> None:
    result = runner.invoke(app, ["--json", "--models-dir", str(isolated_environment), "list"])
    assert result.exit_code == 0
    assert result.stdout == ""


def test_a_bad_line_in_a_model_file_is_named_by_file_and_line(tmp_path: Path) -> None:
    listing = tmp_path / "models.txt"
    listing.write_text("# models for CI\nqwen3:8b\n\nlocalhost:5000/demo  # a host without a namespace\n")
    result = runner.invoke(app, ["pull", "--dry-run", "-f", str(listing)])
    assert result.exit_code == ExitCode.USAGE
    assert result.output.strip().splitlines() == [
        f"error: {listing}:4: invalid model reference 'localhost:5000/demo': 'localhost:5000' is a registry host "
        "without a namespace; write localhost:5000/<namespace>/demo (on Ollama's registry, library/demo)"
    ]


@pytest.mark.parametrize(
    "value", ["/data/models", " /data/models\n", '"/data/models"', "'/data/models'", ' "/data/models" ']
)
def test_ollama_models_is_read_as_ollama_reads_it(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("OLLAMA_MODELS", value)
    assert default_models_dir() == Path("/data/models")


def test_old_mode_flags_still_work_with_one_deprecation_line(isolated_environment: Path) -> None:
    result = runner.invoke(app, ["--list"])
    assert result.exit_code == 0
    assert result.output == "warning: --list is deprecated and goes away in the next release: use ollama-pull list\n"


def _readme_events() -> dict[str, set[str]]:
    """The JSON events table of README.md: event name -> its fields."""
    text = (ROOT / "README.md").read_text()
    table = text.split("### JSON events", 1)[1].split("\n\n", 3)[2]
    events = {}
    for row in table.splitlines()[2:]:
        name, names, _when = (cell.strip() for cell in row.strip("|").split("|"))
        events[name.strip("`")] = set(re.findall(r"`([a-z_]+)`", names))
    return events


def test_the_readme_documents_every_json_event_and_field() -> None:
    documented = _readme_events()
    emitted = {
        kind.kind: {field.name for field in fields(kind)}
        for kind in typing.get_args(Event)
        if kind.kind not in JSON_SILENT_KINDS
    }
    assert documented == emitted
