"""The ``ollama-pull`` command: options, output mode, and the one place where errors become exit codes."""

from __future__ import annotations

import asyncio
import os
import sys
import traceback
from enum import IntEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from . import __version__
from .engine import DownloadSettings
from .errors import (
    AuthenticationError,
    IntegrityError,
    InvalidReference,
    ModelNotFound,
    OllamaPullError,
    StorageError,
)
from .events import EventCallback
from .progress import JsonRenderer, PlainRenderer, RichRenderer
from .pull import pull
from .reference import ModelReference, parse_reference
from .registry import make_client


class ExitCode(IntEnum):
    """The command's exit codes: a public interface, documented in --help and the README."""

    OK = 0
    FAILED = 1
    USAGE = 2
    NOT_FOUND = 3
    AUTH = 4
    INTEGRITY = 5
    STORAGE = 6
    INTERRUPTED = 130


def exit_code_for(error: OllamaPullError) -> ExitCode:
    for kind, code in (
        (InvalidReference, ExitCode.USAGE),
        (ModelNotFound, ExitCode.NOT_FOUND),
        (AuthenticationError, ExitCode.AUTH),
        (IntegrityError, ExitCode.INTEGRITY),
        (StorageError, ExitCode.STORAGE),
    ):
        if isinstance(error, kind):
            return code
    return ExitCode.FAILED


# "\b" keeps Click from re-wrapping the example block.
EPILOG = """\
\b
Examples:
  ollama-pull library/flux2-klein                 pull into ~/.ollama/models (or $OLLAMA_MODELS)
  ollama-pull --json qwen3:8b | jq -c .           one JSON event per line, for scripts
  ollama-pull --models-dir ./cache/models -q a b  several models, quiet, into a CI cache directory

Exit codes: 0 ok, 1 failed, 2 usage, 3 not found, 4 authentication, 5 integrity, 6 local storage, 130 interrupted.
Set OLLAMA_PULL_DEBUG=1 to see a traceback with an error.
"""

app = typer.Typer(
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ollama-pull {__version__}")
        raise typer.Exit()


@app.command(epilog=EPILOG)
def command(
    models: Annotated[
        list[str],
        typer.Argument(
            metavar="MODEL",
            show_default=False,
            help="Model references: [host[:port]/][namespace/]model[:tag], e.g. library/flux2-klein or qwen3:8b.",
        ),
    ],
    models_dir: Annotated[
        Path | None,
        typer.Option(
            "--models-dir",
            show_default=False,
            file_okay=False,
            help="The Ollama models directory. Default: $OLLAMA_MODELS, else ~/.ollama/models.",
        ),
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Use plain http:// to the registry and skip TLS verification.")
    ] = False,
    concurrency: Annotated[
        int, typer.Option("--concurrency", "-j", min=1, max=1024, help="Blobs downloaded at once.")
    ] = 64,
    stall_timeout: Annotated[
        float,
        typer.Option("--stall-timeout", min=0.1, help="Seconds without data before an attempt is aborted and retried."),
    ] = 10.0,
    retries: Annotated[
        int, typer.Option("--retries", min=1, max=100, help="Attempts per blob before the pull fails.")
    ] = 6,
    json_output: Annotated[
        bool, typer.Option("--json", help="Write one JSON event per line to stdout instead of progress.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")] = False,
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """Pull models from an Ollama registry into the local Ollama model store, verified blob by blob."""
    errors = Console(stderr=True, highlight=False, soft_wrap=True)
    references: list[ModelReference] = []
    for text in models:
        try:
            references.append(parse_reference(text))
        except InvalidReference as exc:
            _report(errors, exc)
            raise typer.Exit(ExitCode.USAGE) from None
    settings = DownloadSettings(concurrency=concurrency, attempts=retries, stall_timeout=stall_timeout)
    json_renderer = JsonRenderer(sys.stdout) if json_output else None
    renderer: JsonRenderer | PlainRenderer | RichRenderer | None = json_renderer
    if renderer is None and not quiet:
        renderer = RichRenderer(errors) if errors.is_terminal else PlainRenderer(sys.stderr)
    on_event: EventCallback = renderer if renderer is not None else _ignore

    failures: list[ExitCode] = []

    async def run() -> None:
        async with make_client(insecure=insecure, concurrency=concurrency) as client:
            for reference in references:
                try:
                    await pull(
                        reference,
                        models_dir=models_dir,
                        insecure=insecure,
                        settings=settings,
                        on_event=on_event,
                        client=client,
                    )
                except OllamaPullError as exc:
                    code = exit_code_for(exc)
                    failures.append(code)
                    _report(errors, exc, model=reference.short)
                    if json_renderer is not None:
                        json_renderer.write(
                            {"event": "error", "model": reference.short, "message": str(exc), "exit_code": int(code)}
                        )

    interrupted = False
    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if renderer is not None:
            renderer.close()
    if interrupted:
        errors.print("interrupted: nothing unverified was kept as a blob; run again to continue", style="yellow")
        raise typer.Exit(ExitCode.INTERRUPTED)
    if failures:
        raise typer.Exit(failures[0])


def _ignore(_event: object) -> None:
    """No renderer in --quiet mode."""


def _report(console: Console, error: OllamaPullError, *, model: str | None = None) -> None:
    if os.environ.get("OLLAMA_PULL_DEBUG", "").strip() not in ("", "0"):
        console.print("".join(traceback.format_exception(error)), markup=False, style="dim")
    prefix = f"error: {model}: " if model and model not in str(error) else "error: "
    console.print(prefix + str(error), style="bold red", markup=False)


def main() -> None:
    app(prog_name="ollama-pull")
