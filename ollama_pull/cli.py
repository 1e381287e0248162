"""The ``ollama-pull`` command: options, output mode, and the one place where errors become exit codes."""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
import traceback
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console

from . import __version__
from .errors import (
    AuthenticationError,
    CorruptModel,
    IntegrityError,
    InvalidReference,
    ModelNotFound,
    NotInStore,
    OllamaPullError,
    StorageError,
)
from .reference import ModelReference, parse_reference
from .units import format_size

if TYPE_CHECKING:
    from .housekeeping import LocalModel
    from .progress import JsonRenderer, PlainRenderer, RichRenderer


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
        (NotInStore, ExitCode.NOT_FOUND),
        (AuthenticationError, ExitCode.AUTH),
        (IntegrityError, ExitCode.INTEGRITY),
        (CorruptModel, ExitCode.INTEGRITY),
        (StorageError, ExitCode.STORAGE),
    ):
        if isinstance(error, kind):
            return code
    return ExitCode.FAILED


# "\b" keeps Click from re-wrapping the example block.
# "\b" keeps Click from re-wrapping the example blocks.
EPILOG = """\
\b
In a terminal:
  ollama-pull library/flux2-klein               pull into ~/.ollama/models (or $OLLAMA_MODELS)
  ollama-pull qwen3:8b gemma3 --models-dir DIR  several models into another store

\b
In scripts:
  ollama-pull --json qwen3:8b | jq -c .         one JSON event per line on stdout
  ollama-pull -q qwen3:8b || echo failed        errors only; the exit code says what went wrong

\b
In CI caching steps:
  ollama-pull --dry-run --json -f models.txt    manifest digests for a cache key, nothing written
  ollama-pull -f models.txt                     pull every model listed (one per line, # comments)
  ollama-pull --verify -f models.txt            re-hash restored models; exit 5 names a bad blob

Exit codes: 0 ok, 1 failed, 2 usage, 3 not found, 4 authentication, 5 integrity, 6 local storage, 130 interrupted.
Set OLLAMA_PULL_DEBUG=1 to see a traceback with an error.
"""

app = typer.Typer(
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _rate(value: str | None) -> str | None:
    from .ratelimit import parse_rate

    if value is not None:
        try:
            parse_rate(value)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
    return value


def _mirror(value: str | None) -> str | None:
    if value is not None and not value.startswith(("http://", "https://")):
        raise typer.BadParameter(f"{value!r} is not an http:// or https:// URL")
    return value


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ollama-pull {__version__}")
        raise typer.Exit()


@app.command(epilog=EPILOG)
def command(
    models: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="MODEL",
            show_default=False,
            help="Model references: [host[:port]/][namespace/]model[:tag], e.g. library/flux2-klein or qwen3:8b.",
        ),
    ] = None,
    file: Annotated[
        str | None,
        typer.Option(
            "--file",
            "-f",
            metavar="FILE",
            help="Read model references from FILE, one per line, # comments; - is stdin.",
        ),
    ] = None,
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
    max_rate: Annotated[
        str | None,
        typer.Option(
            "--max-rate",
            metavar="RATE",
            callback=_rate,
            help="One bandwidth limit for the whole pull, in bytes per second: 500k, 50M, 1.5G (binary multiples).",
        ),
    ] = None,
    mirror: Annotated[
        str | None,
        typer.Option(
            "--mirror",
            metavar="URL",
            envvar="OLLAMA_PULL_MIRROR",
            callback=_mirror,
            help="A registry mirror (e.g. a pull-through cache) to try before the model's own registry.",
        ),
    ] = None,
    ca_cert: Annotated[
        Path | None,
        typer.Option(
            "--ca-cert",
            metavar="FILE",
            exists=True,
            dir_okay=False,
            help="Also trust the CA certificates in this PEM file (a corporate CA), on top of the system's "
            "store; SSL_CERT_FILE replaces that store instead. A CA installed in the system's store needs neither.",
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Resolve every manifest and print what would be downloaded; write nothing."),
    ] = False,
    verify_only: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Check models already in the store: re-hash every blob against the manifest (no network). "
            "Bad blobs are removed so that the next pull fetches them again.",
        ),
    ] = False,
    list_models_only: Annotated[
        bool,
        typer.Option("--list", help="List the models in the store (name, size, blobs, digest) and exit; no network."),
    ] = False,
    prune_store: Annotated[
        bool,
        typer.Option(
            "--prune",
            help="After pulling (or alone), remove blobs that no manifest in the store references any more; "
            "it waits for pulls running in other processes.",
        ),
    ] = False,
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
    # The download stack loads here rather than at import, so that --version and --help answer at once.
    import asyncio

    import httpx2

    from .api import pull, resolve, verify
    from .engine import DownloadSettings
    from .events import Event
    from .housekeeping import list_models, prune
    from .network import make_client
    from .progress import JsonRenderer, PlainRenderer, RichRenderer
    from .ratelimit import parse_rate

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    if dry_run and verify_only:
        _usage(console, "--dry-run and --verify do not go together")
    if list_models_only:
        if models or file or dry_run or verify_only or prune_store:
            _usage(console, "--list takes no models and no other action")
        _print_models(list_models(models_dir), json_output=json_output)
        return
    references = _references(console, models or [], file, required=not prune_store)
    settings = DownloadSettings(
        concurrency=concurrency,
        attempts=retries,
        stall_timeout=stall_timeout,
        max_rate=parse_rate(max_rate) if max_rate else None,
    )
    json_renderer = JsonRenderer(sys.stdout) if json_output else None
    renderer: JsonRenderer | PlainRenderer | RichRenderer | None = json_renderer
    if renderer is None and not quiet and not dry_run and not verify_only:
        renderer = RichRenderer(console) if console.is_terminal else PlainRenderer(sys.stderr)

    def on_event(event: Event) -> None:
        if renderer is not None:
            renderer(event)

    def say(text: str, record: dict[str, object], *, stdout: bool = False) -> None:
        if json_renderer is not None:
            json_renderer.write(record)
        elif stdout:
            typer.echo(text)
        elif not quiet:
            console.print(text, markup=False)

    async def one(reference: ModelReference, client: httpx2.AsyncClient) -> None:
        if verify_only:
            manifest = await verify(reference, models_dir=models_dir)
            say(
                f"verified {reference.short}: {len(manifest.blobs)} blobs, {format_size(manifest.total_size)}, "
                "every one matches its digest",
                {
                    "event": "verified",
                    "model": reference.short,
                    "digest": manifest.digest,
                    "blobs": len(manifest.blobs),
                    "total_bytes": manifest.total_size,
                },
            )
        elif dry_run:
            plan = await resolve(
                reference, models_dir=models_dir, insecure=insecure, settings=settings, client=client, mirror=mirror
            )
            event = plan.event()
            say(
                f"{event.model}: {event.blobs} blobs, {format_size(event.total_bytes)}; "
                f"{event.present_blobs} already present, {len(plan.missing)} to download "
                f"({format_size(plan.missing_bytes)}); manifest {event.digest}",
                {"event": event.kind, **dataclasses.asdict(event)},
                stdout=True,
            )
        else:
            await pull(
                reference,
                models_dir=models_dir,
                insecure=insecure,
                settings=settings,
                on_event=on_event,
                client=client,
                mirror=mirror,
            )

    failures: list[ExitCode] = []

    def fail(error: OllamaPullError, model: str | None = None) -> None:
        code = exit_code_for(error)
        failures.append(code)
        _report(console, error, model=model)
        if json_renderer is not None:
            json_renderer.write({"event": "error", "model": model, "message": str(error), "exit_code": int(code)})

    async def run() -> None:
        # One client for every model: one connection pool, one token cache.
        try:
            client = make_client(insecure=insecure, concurrency=concurrency, ca_cert=ca_cert)
        except OllamaPullError as exc:
            fail(exc)
            return
        async with client:
            for reference in references:
                try:
                    await one(reference, client)
                except OllamaPullError as exc:
                    fail(exc, reference.short)
        if prune_store and not failures:
            try:
                pruned = await prune(models_dir)
            except OllamaPullError as exc:
                fail(exc)
                return
            say(
                f"pruned {len(pruned.removed)} unreferenced blobs, {format_size(pruned.freed_bytes)} freed",
                {
                    "event": "pruned",
                    "blobs": len(pruned.removed),
                    "freed_bytes": pruned.freed_bytes,
                    "digests": list(pruned.removed),
                },
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
        console.print("interrupted: nothing unverified was kept as a blob; run again to continue", style="yellow")
        raise typer.Exit(ExitCode.INTERRUPTED)
    if failures:
        raise typer.Exit(failures[0])


def _print_models(models: list[LocalModel], *, json_output: bool) -> None:
    from rich.table import Table

    out = Console(highlight=False, soft_wrap=True)
    if json_output:
        for model in models:
            record = {
                "event": "model",
                "model": model.reference.short,
                "digest": model.digest,
                "total_bytes": model.total_bytes,
                "blobs": model.blobs,
                "missing_blobs": model.missing_blobs,
                "manifest_path": str(model.manifest_path),
            }
            typer.echo(json.dumps(record, separators=(",", ":")))
        return
    rows = [
        (
            model.reference.short,
            format_size(model.total_bytes) if model.digest else "-",
            str(model.blobs),
            (model.digest or "")[7:19] or "invalid manifest",
            f"{model.missing_blobs} blobs missing" if model.missing_blobs else "",
        )
        for model in models
    ]
    if out.is_terminal:
        table = Table("MODEL", "SIZE", "BLOBS", "DIGEST", "", box=None, header_style="bold")
        for row in rows:
            table.add_row(*row)
        out.print(table)
    else:
        for row in rows:
            typer.echo("\t".join(row).rstrip())


def _references(console: Console, models: list[str], file: str | None, *, required: bool) -> list[ModelReference]:
    """The references from the arguments, then the file; any invalid one is a usage error before any download."""
    texts = list(models)
    if file is not None:
        try:
            content = sys.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            _usage(console, f"cannot read the model list {file}: {getattr(exc, 'strerror', None) or exc}")
        texts += [line.split("#", 1)[0].strip() for line in content.splitlines()]
        texts = [text for text in texts if text]
    if not texts and required:
        _usage(console, "no model given: pass MODEL arguments or --file FILE (see --help)")
    references: list[ModelReference] = []
    for text in texts:
        try:
            reference = parse_reference(text)
        except InvalidReference as exc:
            _report(console, exc)
            raise typer.Exit(ExitCode.USAGE) from None
        if reference not in references:
            references.append(reference)
    return references


def _usage(console: Console, message: str) -> NoReturn:
    console.print(f"error: {message}", style="bold red", markup=False)
    raise typer.Exit(ExitCode.USAGE)


def _report(console: Console, error: OllamaPullError, *, model: str | None = None) -> None:
    if os.environ.get("OLLAMA_PULL_DEBUG", "").strip() not in ("", "0"):
        console.print("".join(traceback.format_exception(error)), markup=False, style="dim")
    prefix = f"error: {model}: " if model and model not in str(error) else "error: "
    console.print(prefix + str(error), style="bold red", markup=False)


def main() -> None:
    # What is loaded by now lives as long as the process: frozen, the cyclic collector stops walking it again
    # and again while a pull allocates (it was 3% of the CPU of a pull of many small blobs).
    gc.freeze()
    app(prog_name="ollama-pull")
