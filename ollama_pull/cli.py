"""The ``ollama-pull`` command line: one command per job, and the one place where errors become exit codes.

``ollama-pull MODEL...`` is ``ollama-pull pull MODEL...``: a first argument that is not a command's name goes to
``pull``. Every command's output goes through one renderer (:mod:`ollama_pull.progress`), chosen once by
:class:`_Session`, which also holds the shared wiring: the event loop and its signals, and error reporting.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from typer.core import TyperGroup

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
from .events import Event, Failed
from .reference import ModelReference, parse_reference

if TYPE_CHECKING:
    import asyncio

    from .api import Puller
    from .engine import DownloadSettings
    from .manifest import Manifest
    from .progress import JsonRenderer, PlainRenderer, QuietRenderer
    from .terminal import RichRenderer


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
    TERMINATED = 143


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


# Click's UsageError, which typer raises for every usage error (a bad option, a missing argument) but does not
# export: typer.BadParameter is its public subclass.
_UsageError: type[Exception] = typer.BadParameter.__mro__[1]

# "\b" keeps Click from re-wrapping the example blocks.
EPILOG = """\
\b
In a terminal:
  ollama-pull library/flux2-klein               pull into ~/.ollama/models (or $OLLAMA_MODELS)
  ollama-pull list                              what the store holds
  ollama-pull rm qwen3:8b                       remove a model and the blobs only it used

\b
In scripts:
  ollama-pull --json qwen3:8b | jq -c .         one JSON event per line on stdout
  ollama-pull -q qwen3:8b || echo failed        errors only; the exit code says what went wrong

\b
In CI caching steps:
  ollama-pull pull --dry-run --json -f models.txt   manifest digests for a cache key, nothing written
  ollama-pull verify -f models.txt                  re-hash restored models; exit 5 names a bad blob
  ollama-pull -f models.txt                         pull what is missing

\b
Exit codes: 0 ok, 1 failed, 2 usage, 3 not found, 4 authentication, 5 integrity, 6 local storage,
130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
Set OLLAMA_PULL_DEBUG=1 to see a traceback with an error. With uvloop installed (pip install
'ollama-pull[uvloop]') pulls run on its event loop; OLLAMA_PULL_EVENT_LOOP=asyncio runs asyncio's own.
"""


class _DefaultToPull(TyperGroup):
    """A group whose default command is ``pull``, with usage errors as one line (and a JSON event)."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:  # type: ignore[override]
        if not args:
            typer.echo(ctx.get_help())
            raise typer.Exit(ExitCode.USAGE)
        return super().parse_args(ctx, _route(args, self.commands))

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        # Always standalone, whatever the caller asks: the exit codes are ours, and so is the usage error's form.
        argv = list(sys.argv[1:] if args is None else args)
        try:
            code = super().main(argv, prog_name, complete_var, False, windows_expand_args, **extra)
        except _UsageError as exc:
            context = getattr(exc, "ctx", None)
            where = context.command_path if context is not None else "ollama-pull"
            text = getattr(exc, "format_message", exc.__str__)()
            text = text[:1].lower() + text[1:].rstrip(".")
            message = f"{text} (see {where} --help)"
            _Session.usage_error(message, json_output="--json" in argv)
        sys.exit(code if isinstance(code, int) else 0)


def _route(args: list[str], commands: Mapping[str, Any]) -> list[str]:
    """The arguments with the command's name first: moved there from behind leading options (``ollama-pull --json
    list``, ``ollama-pull --insecure pull MODEL``), or ``pull`` when no command is named."""
    takes_value = {
        name: not (param.is_flag or param.count)
        for param in commands["pull"].params
        if getattr(param, "opts", None) and hasattr(param, "is_flag")
        for name in (*param.opts, *param.secondary_opts)
    }
    index = 0
    while index < len(args) and args[index].startswith("-") and args[index] not in ("-h", "--help", "--version"):
        index += 2 if takes_value.get(args[index], False) else 1
    if index < len(args) and args[index] in commands:
        return [args[index], *args[:index], *args[index + 1 :]]
    if index == 0 and args and args[0] in ("-h", "--help", "--version"):
        return args
    return ["pull", *args]


app = typer.Typer(
    cls=_DefaultToPull,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=EPILOG,
    add_completion=True,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ollama-pull {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """Pull models from an Ollama registry into the local Ollama model store, verified blob by blob.

    \b
    ollama-pull MODEL... is short for ollama-pull pull MODEL...
    A model named like a command is reached with its namespace: ollama-pull library/list
    """


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


Models = Annotated[
    list[str] | None,
    typer.Argument(
        metavar="MODEL...",
        show_default=False,
        help="Model references: [host[:port]/][namespace/]model[:tag], e.g. library/flux2-klein or qwen3:8b; "
        "http://host:port/... for a registry over plain HTTP.",
    ),
]
ModelFile = Annotated[
    str | None,
    typer.Option(
        "--file", "-f", metavar="FILE", help="Read model references from FILE, one per line, # comments; - is stdin."
    ),
]
ModelsDir = Annotated[
    Path | None,
    typer.Option(
        "--models-dir",
        metavar="DIR",
        show_default=False,
        file_okay=False,
        help="The Ollama models directory. Default: $OLLAMA_MODELS, else ~/.ollama/models.",
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Write one JSON record per line to stdout instead of text.")]
Insecure = Annotated[bool, typer.Option("--insecure", help="Use plain http:// to the registry (for a local registry).")]
CaCert = Annotated[
    Path | None,
    typer.Option(
        "--ca-cert",
        metavar="FILE",
        exists=True,
        dir_okay=False,
        help="Also trust the CA certificates in this PEM file (a corporate CA), on top of the system's "
        "store; SSL_CERT_FILE replaces that store instead. A CA installed in the system's store needs neither.",
    ),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors (list: the names alone).")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Say what would be done; change nothing.")]


@app.command()
def pull(
    models: Models = None,
    file: ModelFile = None,
    models_dir: ModelsDir = None,
    insecure: Insecure = False,
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
    processes: Annotated[
        int,
        typer.Option(
            "--processes",
            min=1,
            max=64,
            help="Processes that share a pull of 16 missing blobs or more, at most one per CPU; 1 keeps every "
            "pull in one. Off Linux a helper is a new interpreter, started only for blobs under 1 MiB on average.",
        ),
    ] = 2,
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
    ca_cert: CaCert = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Resolve every manifest and print what would be downloaded (and pruned); write nothing."
        ),
    ] = False,
    prune: Annotated[
        bool,
        typer.Option("--prune", help="After pulling, remove blobs that no manifest in the store references any more."),
    ] = False,
    json_output: Json = False,
    quiet: Quiet = False,
    old_list: Annotated[bool, typer.Option("--list", hidden=True)] = False,
    old_verify: Annotated[bool, typer.Option("--verify", hidden=True)] = False,
) -> None:
    """Download models into the store. The default command.

    Every blob is verified against its digest before it gets its name, and the manifest, which makes the model
    visible to Ollama, is written last.
    """
    session = _Session(models_dir, json_output=json_output, quiet=quiet, dry_run=dry_run)
    if old_list or old_verify:
        _old_mode(session, "list" if old_list else "verify", models, file, dry_run or prune)
    if prune and not models and not file:
        session.deprecated("--prune without models", "ollama-pull prune")
        session.finish(_prune(session, dry_run=dry_run))
    settings = _settings(concurrency, retries, stall_timeout, max_rate, processes)
    references = session.references(models, file)
    puller = session.puller(settings, references, insecure=insecure, mirror=mirror, ca_cert=ca_cert)
    from .processes import forked_helpers, helpers_for

    # The event loop's module is loaded before the fork, so that a spare shares it instead of loading its own
    # copy once it has a job (9 ms of the 20-70 ms by which its first request followed its parent's): 256 blobs
    # of 0.5-3.5 MiB x0.95-0.98, peaking 1-3 MiB lower (bench/PROFILE.md).
    _loop_factory()
    # Forked here, before the event loop and any thread: ready the moment a plan wants them.
    with forked_helpers(0 if dry_run else helpers_for(settings)):
        session.finish(_pull(session, references, puller, prune=prune))


@app.command("list")
def list_(models_dir: ModelsDir = None, json_output: Json = False, quiet: Quiet = False) -> None:
    """List the models in the store.

    Name, size, blobs, the manifest's digest, and blobs missing if any. No network.
    """
    from .housekeeping import list_models

    session = _Session(models_dir, json_output=json_output, quiet=quiet, data=True)
    for model in list_models(session.models_dir):
        session.emit(model)
    session.finish()


@app.command()
def verify(
    models: Models = None,
    file: ModelFile = None,
    every: Annotated[bool, typer.Option("--all", help="Verify every model in the store.")] = False,
    models_dir: ModelsDir = None,
    json_output: Json = False,
    quiet: Quiet = False,
) -> None:
    """Re-hash models in the store against their manifests.

    No network. Bad blobs are removed, so that the next pull fetches them again; exit 5 names them.
    """
    session = _Session(models_dir, json_output=json_output, quiet=quiet, data=True)
    if every and (models or file):
        session.usage("verify --all takes no models: name models, or use --all alone")
    if every:
        from .store import open_store

        references = list(open_store(session.models_dir).manifests())
    else:
        references = session.references(models, file, what="verify MODEL..., -f FILE or --all")
    session.finish(_verify(session, references))


@app.command()
def prune(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List the blobs that would be removed; remove none.")
    ] = False,
    models_dir: ModelsDir = None,
    json_output: Json = False,
    quiet: Quiet = False,
) -> None:
    """Remove blobs that no model in the store uses.

    Waits for pulls running in other processes, so it never removes a blob a running pull has just finished.
    """
    session = _Session(models_dir, json_output=json_output, quiet=quiet, dry_run=dry_run, data=True)
    session.finish(_prune(session, dry_run=dry_run))


@app.command()
def rm(
    models: Models = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be removed; remove nothing.")] = False,
    models_dir: ModelsDir = None,
    json_output: Json = False,
    quiet: Quiet = False,
) -> None:
    """Remove models from the store.

    Each model's manifest goes, then the blobs no other model in the store uses, as ollama rm does.
    """
    session = _Session(models_dir, json_output=json_output, quiet=quiet, dry_run=dry_run, data=True)
    references = session.references(models, None, what="rm MODEL...")
    session.finish(_remove(session, references, dry_run=dry_run))


@app.command()
def export(
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            metavar="FILE.tar|DIR",
            help="Where to write the bundle: a tar file (a name ending in .tar), else a directory.",
        ),
    ],
    models: Models = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be written; write nothing.")] = False,
    models_dir: ModelsDir = None,
    json_output: Json = False,
    quiet: Quiet = False,
) -> None:
    """Write models from the store into a bundle.

    The bundle is an OCI image layout, to carry to a machine behind an air gap: each blob once, however many
    models share it. A model with blobs missing is refused before anything is written. No network.
    """
    from .bundle import export_models

    session = _Session(models_dir, json_output=json_output, quiet=quiet, dry_run=dry_run)
    references = session.references(models, None, what="export MODEL... -o FILE.tar|DIR")
    work = export_models(references, output, models_dir=session.models_dir, on_event=session.emit, dry_run=dry_run)
    session.finish(_attempt(session, work))


@app.command("import")
def import_(
    bundle: Annotated[Path, typer.Argument(metavar="BUNDLE", help="A bundle from export: a tar file or a directory.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be installed; write nothing.")] = False,
    models_dir: ModelsDir = None,
    json_output: Json = False,
    quiet: Quiet = False,
) -> None:
    """Install the models of a bundle into the store.

    The bundle is what export writes: an OCI image layout, as a tar or a directory.
    Every blob is hashed as it is read and named only when it matches; one damaged byte installs nothing of that
    model (exit 5). No network.
    """
    from .bundle import import_bundle

    session = _Session(models_dir, json_output=json_output, quiet=quiet, dry_run=dry_run)
    work = import_bundle(bundle, models_dir=session.models_dir, on_event=session.emit, dry_run=dry_run)
    session.finish(_attempt(session, work))


@app.command("push")
def push_(
    source: Annotated[str, typer.Argument(metavar="SOURCE", help="A model in the store, or a bundle (tar or DIR).")],
    destination: Annotated[
        str, typer.Argument(metavar="DEST_REF", help="Where to push: host[:port]/namespace/model[:tag].")
    ],
    model: Annotated[
        str | None, typer.Option("--model", metavar="MODEL", help="The model to push from a bundle of several.")
    ] = None,
    insecure: Insecure = False,
    ca_cert: CaCert = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Ask the registry what it has and say what would be sent; send nothing.")
    ] = False,
    models_dir: ModelsDir = None,
    json_output: Json = False,
    quiet: Quiet = False,
) -> None:
    """Copy a model into a registry.

    From the store (SOURCE is a model's name) or from a bundle (SOURCE is a tar or a directory).
    Blobs the registry has are skipped, blobs in another of its repositories are mounted, the manifest goes last.
    Credentials are those of pulls (OLLAMA_PULL_USERNAME/PASSWORD, docker login).
    """
    from .push import push

    session = _Session(models_dir, json_output=json_output, quiet=quiet, dry_run=dry_run)
    work = push(
        source,
        destination,
        model=model,
        models_dir=session.models_dir,
        insecure=insecure,
        ca_cert=ca_cert,
        on_event=session.emit,
        dry_run=dry_run,
    )
    session.finish(_attempt(session, work, destination))


class _Session:
    """What every command shares: the models directory, the renderer, the failures so far, the event loop."""

    def __init__(
        self,
        models_dir: Path | None,
        *,
        json_output: bool,
        quiet: bool,
        dry_run: bool = False,
        data: bool = False,
    ) -> None:
        self.dry_run = dry_run
        self.failures: list[ExitCode] = []
        self.renderer = _renderer(json_output=json_output, quiet=quiet, dry_run=dry_run, data=data)
        self.models_dir = models_dir
        if models_dir is not None and not models_dir.expanduser().absolute().parent.exists():
            parent = models_dir.expanduser().absolute().parent
            self.usage(f"--models-dir {models_dir}: {parent} does not exist; create it first, or check the path")

    def emit(self, event: Event) -> None:
        self.renderer(event)

    def fail(self, error: OllamaPullError, model: str | None = None) -> None:
        if os.environ.get("OLLAMA_PULL_DEBUG", "").strip() not in ("", "0"):
            sys.stderr.write("".join(traceback.format_exception(error)))
        code = exit_code_for(error)
        self.failures.append(code)
        self.emit(Failed(model, str(error), int(code)))

    def usage(self, message: str) -> NoReturn:
        self.emit(Failed(None, message, int(ExitCode.USAGE)))
        self.renderer.close()
        raise typer.Exit(ExitCode.USAGE)

    @staticmethod
    def usage_error(message: str, *, json_output: bool) -> NoReturn:
        """A usage error found before any command ran (by Click): one line, and a JSON record under --json."""
        renderer = _renderer(json_output=json_output, quiet=False, dry_run=False, data=False)
        renderer(Failed(None, message, int(ExitCode.USAGE)))
        sys.exit(ExitCode.USAGE)

    def deprecated(self, old: str, new: str) -> None:
        sys.stderr.write(f"warning: {old} is deprecated and goes away in the next release: use {new}\n")

    def references(self, models: list[str] | None, file: str | None, *, what: str = "") -> list[ModelReference]:
        """The references from the arguments, then the file; any invalid one is a usage error before any work."""
        texts = [(text, "") for text in models or []]
        if file is not None:
            try:
                content = sys.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                self.usage(f"cannot read the model list {file}: {getattr(exc, 'strerror', None) or exc}")
            for number, line in enumerate(content.splitlines(), start=1):
                text = line.split("#", 1)[0].strip()
                if text:
                    texts.append((text, f"{file}:{number}: "))
        if not texts:
            self.usage(f"no model given: pass {what or 'MODEL arguments or --file FILE'} (see --help)")
        references: list[ModelReference] = []
        for text, where in texts:
            try:
                reference = parse_reference(text)
            except InvalidReference as exc:
                self.usage(f"{where}{exc}")
            if reference not in references:
                references.append(reference)
        return references

    def puller(
        self,
        settings: DownloadSettings,
        references: list[ModelReference],
        *,
        insecure: bool,
        mirror: str | None,
        ca_cert: Path | None,
    ) -> Puller:
        """The puller for ``references``, with what they need at once made before the spares are forked
        (:meth:`Puller.prepare`)."""
        from .api import Puller

        try:
            puller = Puller(
                models_dir=self.models_dir, insecure=insecure, settings=settings, mirror=mirror, ca_cert=ca_cert
            )
            puller.prepare(references)
            return puller
        except OllamaPullError as exc:
            self.fail(exc)
            self.finish()

    def finish(self, work: Coroutine[Any, Any, None] | None = None) -> NoReturn:
        """Run ``work`` (stopping at Ctrl-C or SIGTERM), close the output, and exit with the first failure's code."""
        try:
            stopped_by = _run_until_signalled(work) if work is not None else None
        finally:
            self.renderer.close()
        if stopped_by is not None:
            from .terminal import Output

            Output(stderr=True, highlight=False).print(
                "interrupted: nothing unverified was kept; run again to continue", style="yellow", markup=False
            )
            raise typer.Exit(ExitCode.TERMINATED if stopped_by == signal.SIGTERM else ExitCode.INTERRUPTED)
        raise typer.Exit(self.failures[0] if self.failures else ExitCode.OK)


def _renderer(
    *, json_output: bool, quiet: bool, dry_run: bool, data: bool
) -> JsonRenderer | PlainRenderer | QuietRenderer | RichRenderer:
    """JSON, errors only, or text: Rich when the stream that carries the command's main output (stdout for data
    commands, stderr for a pull's progress) is a terminal, plain lines otherwise."""
    from .progress import JsonRenderer, PlainRenderer, QuietRenderer

    if json_output:
        return JsonRenderer(sys.stdout, sys.stderr, dry_run=dry_run)
    if quiet:
        return QuietRenderer(sys.stdout, sys.stderr)
    if (sys.stdout if data else sys.stderr).isatty():
        from .terminal import Output, RichRenderer

        return RichRenderer(
            Output(stderr=True, highlight=False, soft_wrap=True), Output(highlight=False), dry_run=dry_run
        )
    return PlainRenderer(sys.stderr, sys.stdout, dry_run=dry_run)


def _settings(
    concurrency: int, retries: int, stall_timeout: float, max_rate: str | None, processes: int
) -> DownloadSettings:
    from .engine import DownloadSettings
    from .ratelimit import parse_rate

    return DownloadSettings(
        concurrency=concurrency,
        attempts=retries,
        stall_timeout=stall_timeout,
        max_rate=parse_rate(max_rate) if max_rate else None,
        processes=processes,
    )


def _old_mode(session: _Session, command: str, models: list[str] | None, file: str | None, extra: bool) -> None:
    """``--list`` and ``--verify``, the modes of 0.1, kept for a release."""
    session.deprecated(f"--{command}", f"ollama-pull {command}")
    if extra:
        session.usage(f"--{command} takes no --dry-run or --prune")
    if command == "list":
        if models or file:
            session.usage("list takes no models")
        from .housekeeping import list_models

        for model in list_models(session.models_dir):
            session.emit(model)
        session.finish()
    session.finish(_verify(session, session.references(models, file)))


async def _pull(session: _Session, references: list[ModelReference], puller: Puller, *, prune: bool) -> None:
    """Pull (or, on a dry run, resolve) each model in turn with one puller, then prune if asked and all went well."""
    resolved: dict[ModelReference, Manifest] = {}
    async with puller:
        for reference in references:
            try:
                if session.dry_run:
                    plan = await puller.resolve(reference, on_event=session.emit)
                    session.emit(plan.event())
                    resolved[reference] = plan.manifest
                else:
                    await puller.pull(reference, on_event=session.emit)
            except OllamaPullError as exc:
                session.fail(exc, reference.short)
    if prune and not session.failures:
        await _prune(session, dry_run=session.dry_run, pending=resolved)


async def _verify(session: _Session, references: list[ModelReference]) -> None:
    from .api import verify
    from .events import Verified

    for reference in references:
        try:
            manifest = await verify(reference, models_dir=session.models_dir)
        except OllamaPullError as exc:
            session.fail(exc, reference.short)
        else:
            session.emit(Verified(reference.short, manifest.digest, len(manifest.blobs), manifest.total_size))


async def _prune(session: _Session, *, dry_run: bool, pending: dict[ModelReference, Manifest] | None = None) -> None:
    from .housekeeping import prune

    try:
        session.emit(await prune(session.models_dir, dry_run=dry_run, pending=pending))
    except OllamaPullError as exc:
        session.fail(exc)


async def _remove(session: _Session, references: list[ModelReference], *, dry_run: bool) -> None:
    from .housekeeping import remove

    try:
        for removed in await remove(references, session.models_dir, dry_run=dry_run):
            session.emit(removed)
    except OllamaPullError as exc:
        session.fail(exc)


async def _attempt(session: _Session, work: Awaitable[object], model: str | None = None) -> None:
    """One library call whose events go to the renderer, and whose error goes to the exit code."""
    try:
        await work
    except OllamaPullError as exc:
        session.fail(exc, model)


def _run_until_signalled(main: Coroutine[Any, Any, None]) -> signal.Signals | None:
    """Run ``main`` to the end, or until Ctrl-C or SIGTERM (what CI sends to cancel a job): the first of either
    cancels it, so every ``finally`` below cleans up, and is returned.

    Our own handlers, not the loop's: once a signal came, both are ignored until the process exits, so a second
    one during the cleanup changes nothing, where asyncio's handler would raise KeyboardInterrupt in the middle of
    it. Without a signal the previous handlers come back.
    """
    import asyncio

    import sniffio

    received: list[signal.Signals] = []
    running: list[tuple[asyncio.AbstractEventLoop, asyncio.Task[Any]]] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signal.Signals(signum))
        # Ignored, not just handled: the interpreter puts back the default action of handled signals as it exits,
        # and a second Ctrl-C in those moments would kill the process with its cleanup done but no exit code.
        for other in previous:
            signal.signal(other, signal.SIG_IGN)
        for loop, task in running:
            loop.call_soon_threadsafe(task.cancel)

    async def guarded() -> None:
        task = asyncio.current_task()
        assert task is not None
        running.append((asyncio.get_running_loop(), task))
        if not received:
            await main
        else:
            main.close()

    try:
        loop_factory = _loop_factory()
    except BaseException:
        main.close()
        raise
    # A signal we were started with ignored stays ignored: a shell starts a script's background jobs with SIGINT
    # ignored, so that a Ctrl-C meant for the script leaves them running.
    previous = {
        signum: handler
        for signum in (signal.SIGINT, signal.SIGTERM)
        if (handler := signal.getsignal(signum)) != signal.SIG_IGN
    }
    for signum in previous:
        signal.signal(signum, on_signal)
    # The loop is ours, so we tell sniffio which library runs it, as its API asks of whoever runs a loop.
    # httpcore2's pool (which httpx2 uses for a pull through a proxy) and anyio ask sniffio on every lock
    # operation, and left to sniff it looks up the current task each time: 5% of the event loop's time on 4,096
    # small blobs, before direct connections had a pool of our own.
    library = sniffio.thread_local.name
    sniffio.thread_local.name = "asyncio"
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(guarded())
    except asyncio.CancelledError:
        pass
    finally:
        sniffio.thread_local.name = library
        if not received:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    return received[0] if received else None


# Allocations between two collections of the youngest generation (Python's default: 700); see main().
YOUNG_COLLECTION_THRESHOLD = 20_000
LOOP_VARIABLE = "OLLAMA_PULL_EVENT_LOOP"


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (the ``uvloop`` extra), else asyncio's own (None); the
    environment's ``OLLAMA_PULL_EVENT_LOOP`` (``asyncio`` or ``uvloop``) decides instead when set. On 256 blobs of
    0.5-3.5 MiB uvloop's loop took 8-13% off the wall time (bench/PROFILE.md)."""
    choice = os.environ.get(LOOP_VARIABLE, "").strip().lower()
    if choice not in ("", "asyncio", "uvloop"):
        raise typer.BadParameter(f"{LOOP_VARIABLE} must be asyncio or uvloop, not {choice!r}")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise typer.BadParameter(
                f"{LOOP_VARIABLE}=uvloop, but uvloop is not installed: pip install 'ollama-pull[uvloop]'"
            ) from None
        return None
    return uvloop.new_event_loop


def _raise_open_files_limit() -> None:
    """Raise the soft limit on open files to the hard one, as Go's runtime does for every program. Each stream
    of a pull holds a connection and a partial file, and as many blobs again may wait for their syncs, each
    with its file: at -j 512 that is over the 1,024 descriptors many systems allow by default."""
    try:
        import resource
    except ImportError:  # Windows has no such limit
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Where the hard limit is unlimited (macOS), the soft one can be at most OPEN_MAX, 10,240.
    for wanted in (hard, 10240):
        if soft == resource.RLIM_INFINITY or (wanted != resource.RLIM_INFINITY and wanted <= soft):
            return
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            return


def main() -> None:
    import gc

    _raise_open_files_limit()

    # Started with stdout or stderr closed (`ollama-pull ... >&-`), Python has None there: what would go to it
    # goes nowhere instead, as it does once a reader goes away.
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w"))  # noqa: SIM115 - open for the life of the process

    # What is loaded by now lives as long as the process: frozen, the cyclic collector stops walking it again
    # and again while a pull allocates (it was 3% of the CPU of a pull of many small blobs). A pull allocates
    # and frees a few hundred objects per blob, nearly none of them in cycles: collecting the youngest
    # generation every 20,000 allocations instead of 700 took 4,096 blobs of 64 KiB x0.96 (14 alternated
    # runs), with no more memory; 100,000 was no faster.
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD)
    app(prog_name="ollama-pull")


def entry() -> NoReturn:
    """The console script and ``python -m ollama_pull``: :func:`main`, then out of the process at once.

    Every command has done its work, closed its files and synced what it must by the time :func:`main` exits, so
    only the standard streams are flushed here. The interpreter's own shutdown, which tears down every module and
    collects what a pull loaded after the freeze, took 24-40 ms at the end of a 1 s pull of 256 blobs, against
    3-5 ms for the process's own exit (bench/PROFILE.md). Under a profiler or a tracer (cProfile, coverage), which
    write what they saw at that shutdown, it runs as usual. :func:`main` exits as a Python function does, for
    callers that go on afterwards."""
    code: str | int | None = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    if sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(code)
    if isinstance(code, str):
        sys.stderr.write(f"{code}\n")
        code = 1
    for stream in (sys.stdout, sys.stderr):
        # A reader that went away, or a stream closed under us: the output goes nowhere, as it would at exit.
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code or 0)
