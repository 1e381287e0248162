"""Models across an air gap: export from the store as an OCI image layout, import a layout into the store.

The layout is the OCI image layout (``oci-layout``, ``index.json``, ``blobs/sha256/<hex>``), as a tar stream or an
unpacked directory. ``index.json`` holds one descriptor per model, annotated ``org.opencontainers.image.ref.name``
with the model's full name (``host/namespace/model:tag``), so an import puts each model back under its own name,
and any OCI tool can read the bundle. Each blob is written once however many models share it.

An import trusts nothing in the bundle: every entry is checked before a byte is written (no member that leaves the
archive, no links, nothing but the layout's files, no manifest over :data:`MAX_MANIFEST_BYTES`), every blob is
hashed while it is read into its partial file, and a model's blobs get their names only once all of them are
verified, its manifest last and atomically, under the store lock as for a pull. One damaged blob installs nothing
of its model.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import json
import os
import re
import shutil
import tarfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from .errors import (
    CorruptModel,
    IncompleteModel,
    InvalidBundle,
    InvalidReference,
    StorageError,
    TamperedBlob,
)
from .events import (
    BlobFinished,
    BlobProgress,
    BlobStarted,
    EventCallback,
    ExportFinished,
    ExportPlanned,
    ImportFinished,
    ImportPlanned,
    ignore_event,
)
from .manifest import DIGEST_PATTERN, MAX_MANIFEST_BYTES, Layer, Manifest, parse_manifest
from .partial import BlobFile
from .reference import ModelReference, parse_reference
from .store import READ_SIZE, BlobClaim, Store, open_store, storage_errors
from .worker import Channel, run_blocking

LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
_LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'
_BLOB_ENTRY = re.compile(r"blobs/sha256/[0-9a-f]{64}")
_DIRECTORIES = frozenset({"", "blobs", "blobs/sha256"})
# Models have at most a few thousand blobs; a bundle with far more entries is an attack on our memory.
MAX_ENTRIES = 100_000
_TAR_BLOCK = tarfile.BLOCKSIZE
_TAR_RECORD = tarfile.RECORDSIZE

Layout = Literal["tar", "dir"]


@dataclass(frozen=True)
class BundleModel:
    """One model of a bundle: its full name and its validated manifest."""

    reference: ModelReference
    manifest: Manifest


@dataclass(frozen=True)
class ExportResult:
    output: Path
    layout: Layout
    models: tuple[ModelReference, ...]
    blobs: int
    total_bytes: int
    seconds: float
    dry_run: bool


@dataclass(frozen=True)
class ImportedModel:
    """A model an import installed (or, in a dry run, would install); ``manifest_path`` is None in a dry run."""

    reference: ModelReference
    manifest_digest: str
    manifest_path: Path | None
    installed_blobs: int
    installed_bytes: int
    present_blobs: int


@dataclass(frozen=True)
class ImportResult:
    models: tuple[ImportedModel, ...]
    dry_run: bool


def blob_entry(digest: str) -> str:
    """Where a blob lives in the layout: ``blobs/sha256/<hex>``."""
    if not DIGEST_PATTERN.fullmatch(digest):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return "blobs/sha256/" + digest.removeprefix("sha256:")


def layout_for(output: str | Path) -> Layout:
    """``FILE.tar`` is written as a tar stream; anything else is a directory."""
    return "tar" if Path(output).suffix == ".tar" else "dir"


# --- export -------------------------------------------------------------------------------------------------------


async def export_models(
    models: Sequence[str | ModelReference],
    output: str | Path,
    *,
    models_dir: str | Path | None = None,
    layout: Layout | None = None,
    on_event: EventCallback = ignore_event,
    dry_run: bool = False,
) -> ExportResult:
    """Write ``models`` from the store to ``output`` as an OCI image layout: a tar file, or a directory.

    Every model must be whole in the store (:class:`IncompleteModel` otherwise) before anything is written. A tar
    is written beside ``output`` and renamed over it when complete; a directory gets ``index.json`` last. Blobs are
    re-hashed as they are read: a damaged one is removed from the store and raises :class:`CorruptModel`.
    """
    started = time.monotonic()
    store = open_store(models_dir)
    output = Path(output)
    chosen = layout or layout_for(output)
    references = tuple(dict.fromkeys(_reference(model) for model in models))
    if not references:
        raise ValueError("export_models needs at least one model")
    planned = _export_plan(store, references)
    _check_output(output, chosen)
    blobs = _unique_blobs(planned)
    names = tuple(str(model.reference) for model in planned)
    # What progress counts: the blobs, each once; the manifests are a few KiB beside them.
    total = sum(layer.size for layer, _ in blobs)
    on_event(ExportPlanned(str(output), chosen, names, len(blobs), total, dry_run))
    if not dry_run:
        async with store.store_lock(exclusive=False):
            # A prune or rm may have run since: look again under the lock, which keeps them out until we are done.
            planned = _export_plan(store, references)
            await run_blocking(lambda channel: _write_layout(store, planned, output, chosen, channel), on_event)
    seconds = time.monotonic() - started
    if not dry_run:
        on_event(ExportFinished(str(output), chosen, names, len(blobs), total, seconds))
    return ExportResult(output, chosen, references, len(blobs), total, seconds, dry_run)


def _export_plan(store: Store, references: Sequence[ModelReference]) -> tuple[BundleModel, ...]:
    planned = []
    for reference in references:
        manifest = store.load_manifest(reference)
        missing = tuple(layer.digest for layer in manifest.blobs if not store.has_blob(layer))
        if missing:
            raise IncompleteModel(reference.name, missing)
        planned.append(BundleModel(reference, manifest))
    return tuple(planned)


def _unique_blobs(models: Sequence[BundleModel]) -> list[tuple[Layer, str]]:
    """Every blob of every model once, with the first model that names it."""
    seen: dict[str, tuple[Layer, str]] = {}
    for model in models:
        for layer in model.manifest.blobs:
            seen.setdefault(layer.digest, (layer, model.reference.short))
    return list(seen.values())


def _check_output(output: Path, layout: Layout) -> None:
    if layout == "tar":
        if output.is_dir():
            raise StorageError(f"cannot write the bundle {output}: it is a directory; name a FILE.tar")
        return
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise StorageError(
            f"cannot write the bundle into {output}: it exists and is not an empty directory; "
            "name a new directory or a FILE.tar"
        )


def index_document(models: Sequence[BundleModel]) -> bytes:
    """``index.json``: one descriptor per model, named with its full name."""
    descriptors = [
        {
            "mediaType": model.manifest.media_type,
            "digest": model.manifest.digest,
            "size": len(model.manifest.raw),
            "annotations": {REF_NAME_ANNOTATION: str(model.reference)},
        }
        for model in models
    ]
    document = {"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": descriptors}
    return json.dumps(document, indent=2).encode() + b"\n"


def _write_layout(store: Store, models: Sequence[BundleModel], output: Path, layout: Layout, channel: Channel) -> None:
    writer: _LayoutWriter = _TarWriter(output) if layout == "tar" else _DirWriter(output)
    try:
        writer.add(LAYOUT_FILE, len(_LAYOUT), [_LAYOUT])
        for model in models:
            writer.add(blob_entry(model.manifest.digest), len(model.manifest.raw), [model.manifest.raw])
        for layer, model_name in _unique_blobs(models):
            chunks = _progress(_checked_store_chunks(store, layer, model_name, channel), layer, model_name, channel)
            writer.add(blob_entry(layer.digest), layer.size, chunks)
        index = index_document(models)
        writer.add(INDEX_FILE, len(index), [index])
        writer.finish()
    finally:
        writer.close()


def _checked_store_chunks(store: Store, layer: Layer, model: str, channel: Channel) -> Iterator[bytes]:
    """A stored blob's bytes, re-hashed on the way: a blob that went bad in the store is not exported."""
    path = store.blob_path(layer.digest)
    digest = hashlib.sha256()
    length = 0
    with storage_errors(f"read {path}"), open(path, "rb") as handle:
        while chunk := handle.read(READ_SIZE):
            channel.check()
            digest.update(chunk)
            length += len(chunk)
            yield chunk
    if length != layer.size or "sha256:" + digest.hexdigest() != layer.digest:
        path.unlink(missing_ok=True)
        reason = f"{length} bytes, expected {layer.size}" if length != layer.size else "bytes do not match the digest"
        raise CorruptModel(model, {layer.digest: reason})


def _progress(chunks: Iterable[bytes], layer: Layer, model: str, channel: Channel) -> Iterator[bytes]:
    """Pass ``chunks`` through, reporting them as one blob's progress."""
    started = time.monotonic()
    channel.emit(BlobStarted(model, layer.digest, layer.label, layer.size, 0))
    done = 0
    for chunk in chunks:
        yield chunk
        done += len(chunk)
        channel.emit(BlobProgress(model, layer.digest, done, layer.size))
    channel.emit(BlobFinished(model, layer.digest, layer.size, time.monotonic() - started))


class _LayoutWriter(abc.ABC):
    """Where an export's files go: ``add`` each one, ``finish`` when all are in, ``close`` always."""

    @abc.abstractmethod
    def add(self, name: str, size: int, chunks: Iterable[bytes]) -> None: ...

    @abc.abstractmethod
    def finish(self) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...


class _TarWriter(_LayoutWriter):
    """A tar stream written straight from our own reads (so that each is hashed and reported on the way), into a
    temp file that becomes ``output`` only once complete. Members are owned by root and dated 0: the same models
    always make the same bundle."""

    def __init__(self, output: Path) -> None:
        self.output = output
        self.temp = output.with_name(f".{output.name}.{os.getpid()}.partial")
        self._done = False
        with storage_errors(f"write {output}"):
            output.parent.mkdir(parents=True, exist_ok=True)
            self._file: BinaryIO = open(self.temp, "wb")  # noqa: SIM115 - closed in close()
        self._length = 0
        for directory in ("blobs/", "blobs/sha256/"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            self._write(info.tobuf(tarfile.PAX_FORMAT))

    def _write(self, data: bytes) -> None:
        with storage_errors(f"write {self.output}"):
            self._file.write(data)
        self._length += len(data)

    def add(self, name: str, size: int, chunks: Iterable[bytes]) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode = size, 0o644
        self._write(info.tobuf(tarfile.PAX_FORMAT))
        written = 0
        for chunk in chunks:
            self._write(chunk)
            written += len(chunk)
        if written != size:
            raise StorageError(f"cannot write {self.output}: {name} changed size while it was read")
        self._write(b"\0" * (-size % _TAR_BLOCK))

    def finish(self) -> None:
        # Two zero blocks end the archive; tar readers expect the file padded to a whole record.
        end = self._length + 2 * _TAR_BLOCK
        self._write(b"\0" * (end - self._length + (-end % _TAR_RECORD)))
        with storage_errors(f"write {self.output}"):
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self.temp, self.output)
        self._done = True

    def close(self) -> None:
        self._file.close()
        if not self._done:
            self.temp.unlink(missing_ok=True)


class _DirWriter(_LayoutWriter):
    """An unpacked layout: each file through a temp file and a rename, ``index.json`` last (the caller adds it
    last), so a directory with an index is complete; an interrupted export removes what it wrote."""

    def __init__(self, output: Path) -> None:
        self.output = output
        self._existed = output.exists()
        self._done = False
        with storage_errors(f"create {output}"):
            (output / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)

    def add(self, name: str, size: int, chunks: Iterable[bytes]) -> None:
        path = self.output / name
        temp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        with storage_errors(f"write {path}"):
            try:
                with open(temp, "wb") as handle:
                    written = 0
                    for chunk in chunks:
                        handle.write(chunk)
                        written += len(chunk)
                    if written != size:
                        raise StorageError(f"cannot write {path}: {name} changed size while it was read")
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(temp, path)
            finally:
                temp.unlink(missing_ok=True)

    def finish(self) -> None:
        self._done = True

    def close(self) -> None:
        if self._done:
            return
        if self._existed:
            for name in ("blobs", LAYOUT_FILE, INDEX_FILE):
                path = self.output / name
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        else:
            shutil.rmtree(self.output, ignore_errors=True)


# --- reading a bundle ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """A regular file of the bundle: ``size`` bytes at ``offset`` in ``path`` (the tar, or the file itself)."""

    path: Path
    offset: int
    size: int


class Bundle:
    """An OCI image layout (tar or directory) opened for reading; :func:`open_bundle` has checked every entry."""

    def __init__(self, path: Path, entries: dict[str, _Entry], *, unpacked: bool) -> None:
        self.path = path
        self.label = str(path)
        self._entries = entries
        self._unpacked = unpacked
        self.models = self._read_models()

    def has_blob(self, layer: Layer) -> bool:
        entry = self._entries.get(blob_entry(layer.digest))
        return entry is not None and entry.size == layer.size

    def chunks(self, digest: str, start: int = 0, length: int | None = None) -> Iterator[bytes]:
        """A blob's bytes as stored in the bundle (``length`` of them from ``start``, or all), :data:`READ_SIZE`
        at a time; the caller checks them."""
        yield from self._chunks(blob_entry(digest), start, length)

    def select(self, name: str | None) -> BundleModel:
        """The model named ``name`` (as a user types it), or the only one when ``name`` is None."""
        if name is None:
            if len(self.models) != 1:
                names = ", ".join(model.reference.name for model in self.models)
                raise InvalidBundle(self.label, f"it holds {len(self.models)} models ({names}): name the one to use")
            return self.models[0]
        wanted = _reference(name)
        for model in self.models:
            # By name: a scheme the user wrote (http://...) says how to reach a registry, not which model.
            if str(model.reference) == str(wanted):
                return model
        raise InvalidBundle(self.label, f"it does not hold {wanted.name}")

    def _chunks(self, name: str, start: int = 0, length: int | None = None) -> Iterator[bytes]:
        entry = self._entries[name]
        wanted = entry.size - start if length is None else length
        try:
            yield from read_range(entry.path, entry.offset + start, wanted, nofollow=self._unpacked)
        except EOFError as exc:
            raise InvalidBundle(self.label, f"{name} is cut short ({exc}): the bundle is truncated") from exc

    def _document(self, name: str) -> Any:
        entry = self._entries.get(name)
        if entry is None:
            raise InvalidBundle(self.label, f"it has no {name}")
        if entry.size > MAX_MANIFEST_BYTES:
            raise InvalidBundle(self.label, f"{name} is larger than {MAX_MANIFEST_BYTES} bytes")
        try:
            return json.loads(b"".join(self._chunks(name)))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidBundle(self.label, f"{name} is not JSON") from exc

    def _read_models(self) -> tuple[BundleModel, ...]:
        layout = self._document(LAYOUT_FILE)
        if not isinstance(layout, dict) or not isinstance(layout.get("imageLayoutVersion"), str):
            raise InvalidBundle(self.label, f"{LAYOUT_FILE} has no imageLayoutVersion")
        index = self._document(INDEX_FILE)
        descriptors = index.get("manifests") if isinstance(index, dict) else None
        if not isinstance(descriptors, list) or not descriptors:
            raise InvalidBundle(self.label, f"{INDEX_FILE} lists no manifests")
        models: dict[ModelReference, BundleModel] = {}
        for position, descriptor in enumerate(descriptors):
            model = self._read_model(f"{INDEX_FILE} manifests[{position}]", descriptor)
            if model.reference in models:
                raise InvalidBundle(self.label, f"{INDEX_FILE} names {model.reference} twice")
            models[model.reference] = model
        return tuple(models.values())

    def _read_model(self, where: str, descriptor: Any) -> BundleModel:
        if not isinstance(descriptor, dict):
            raise InvalidBundle(self.label, f"{where} is not an object")
        annotations = descriptor.get("annotations")
        name = annotations.get(REF_NAME_ANNOTATION) if isinstance(annotations, dict) else None
        if not isinstance(name, str):
            raise InvalidBundle(self.label, f"{where} has no {REF_NAME_ANNOTATION} annotation")
        try:
            reference = parse_reference(name)
        except InvalidReference as exc:
            raise InvalidBundle(self.label, f"{where} is named {name!r}, which is not a model name") from exc
        if str(reference) != name:
            raise InvalidBundle(self.label, f"{where} is named {name!r}, not a full host/namespace/model:tag name")
        digest, size = descriptor.get("digest"), descriptor.get("size")
        if not isinstance(digest, str) or not DIGEST_PATTERN.fullmatch(digest):
            raise InvalidBundle(self.label, f"{where} has no sha256 digest")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidBundle(self.label, f"{where} has no size")
        if size > MAX_MANIFEST_BYTES:
            raise InvalidBundle(self.label, f"the manifest of {name} is larger than {MAX_MANIFEST_BYTES} bytes")
        entry = self._entries.get(blob_entry(digest))
        if entry is None:
            raise InvalidBundle(self.label, f"the manifest of {name} ({digest}) is missing")
        if entry.size != size:
            raise TamperedBlob(self.label, reference.name, digest, f"{entry.size} bytes, its descriptor says {size}")
        raw = b"".join(self._chunks(blob_entry(digest)))
        if "sha256:" + hashlib.sha256(raw).hexdigest() != digest:
            raise TamperedBlob(self.label, reference.name, digest, "the manifest's bytes do not match its digest")
        manifest = parse_manifest(raw, model=reference.name)
        for layer in manifest.blobs:
            entry = self._entries.get(blob_entry(layer.digest))
            if entry is None:
                raise InvalidBundle(self.label, f"blob {layer.digest} of {reference.name} is missing")
            if entry.size != layer.size:
                raise TamperedBlob(
                    self.label, reference.name, layer.digest, f"{entry.size} bytes, the manifest says {layer.size}"
                )
        return BundleModel(reference, manifest)


def read_range(path: Path, offset: int, length: int, *, nofollow: bool = False) -> Iterator[bytes]:
    """``length`` bytes of a file from ``offset``, :data:`READ_SIZE` at a time; :class:`EOFError` when the file
    ends first. ``nofollow`` refuses a file that has become a link since it was checked."""
    with storage_errors(f"read {path}"):
        fd = os.open(path, os.O_RDONLY | (os.O_NOFOLLOW if nofollow else 0))
    with os.fdopen(fd, "rb") as handle:
        handle.seek(offset)
        remaining = length
        while remaining:
            with storage_errors(f"read {path}"):
                chunk = handle.read(min(READ_SIZE, remaining))
            if not chunk:
                raise EOFError(f"{remaining} of {length} bytes missing")
            remaining -= len(chunk)
            yield chunk


def open_bundle(path: str | Path) -> Bundle:
    """Open a bundle (a tar file or an unpacked directory) and check all of it that can be checked without
    reading the blobs; raise :class:`InvalidBundle` for anything unsafe or unexpected."""
    path = Path(path)
    label = str(path)
    if path.is_dir():
        return Bundle(path, _directory_entries(path, label), unpacked=True)
    if not path.is_file():
        raise InvalidBundle(label, "there is no such file or directory")
    return Bundle(path, _tar_entries(path, label), unpacked=False)


def _tar_entries(path: Path, label: str) -> dict[str, _Entry]:
    try:
        with storage_errors(f"read {path}"), tarfile.open(path, "r:") as archive:
            members = []
            for member in archive:
                members.append(member)
                if len(members) > MAX_ENTRIES:
                    raise InvalidBundle(label, f"it has more than {MAX_ENTRIES} members")
    except tarfile.TarError as exc:
        raise InvalidBundle(label, f"it is not an uncompressed tar archive ({exc})") from exc
    entries: dict[str, _Entry] = {}
    for member in members:
        name = _entry_name(label, member.name)
        if member.issym() or member.islnk():
            raise InvalidBundle(label, f"the member {member.name!r} is a link")
        if member.isdir():
            _check_directory(label, name, member.name)
            continue
        if not member.isreg() or member.issparse():
            raise InvalidBundle(label, f"the member {member.name!r} is not a regular file")
        _check_file(label, name, member.name, entries)
        entries[name] = _Entry(path, member.offset_data, member.size)
    return entries


def _directory_entries(root: Path, label: str) -> dict[str, _Entry]:
    entries: dict[str, _Entry] = {}

    def walk(directory: Path, prefix: str) -> None:
        with storage_errors(f"read {directory}"):
            found = sorted(os.scandir(directory), key=lambda item: item.name)
        if len(entries) + len(found) > MAX_ENTRIES:
            raise InvalidBundle(label, f"it has more than {MAX_ENTRIES} files")
        for item in found:
            name = prefix + item.name
            if item.is_symlink():
                raise InvalidBundle(label, f"{name} is a link")
            if item.is_dir(follow_symlinks=False):
                _check_directory(label, name, name)
                walk(Path(item.path), name + "/")
            elif item.is_file(follow_symlinks=False):
                _check_file(label, name, name, entries)
                entries[name] = _Entry(Path(item.path), 0, item.stat(follow_symlinks=False).st_size)
            else:
                raise InvalidBundle(label, f"{name} is not a regular file")

    walk(root, "")
    return entries


def _entry_name(label: str, raw: str) -> str:
    parts = [part for part in raw.split("/") if part not in ("", ".")]
    if raw.startswith("/") or ".." in parts:
        raise InvalidBundle(label, f"the member {raw!r} points outside the bundle")
    return "/".join(parts)


def _check_directory(label: str, name: str, raw: str) -> None:
    if name not in _DIRECTORIES:
        raise InvalidBundle(label, f"unexpected directory {raw!r}: a bundle holds only oci-layout, index.json, blobs/")


def _check_file(label: str, name: str, raw: str, entries: dict[str, _Entry]) -> None:
    if name not in (LAYOUT_FILE, INDEX_FILE) and not _BLOB_ENTRY.fullmatch(name):
        raise InvalidBundle(
            label, f"unexpected file {raw!r}: a bundle holds only oci-layout, index.json and blobs/sha256/<hex>"
        )
    if name in entries:
        raise InvalidBundle(label, f"{raw!r} appears twice")


# --- import -------------------------------------------------------------------------------------------------------


async def import_bundle(
    source: str | Path,
    *,
    models_dir: str | Path | None = None,
    on_event: EventCallback = ignore_event,
    dry_run: bool = False,
) -> ImportResult:
    """Install every model of the bundle at ``source`` (a tar file or a directory) into the store.

    Raises :class:`InvalidBundle` (nothing installed) for a bundle that is unsafe or not a layout, and
    :class:`TamperedBlob` for a blob whose bytes are not its digest: nothing of that model is installed, and models
    before it in the bundle stay installed. With ``dry_run``, reports what would be installed and writes nothing.
    """
    bundle = open_bundle(source)
    store = open_store(models_dir)
    if dry_run:
        imported = []
        for model in bundle.models:
            plan = _import_plan(store, model)
            on_event(plan.event(dry_run=True))
            imported.append(plan.result(None))
        return ImportResult(tuple(imported), dry_run=True)
    needed = {layer.digest: layer.size for model in bundle.models for layer in _import_plan(store, model).missing}
    store.check_space(sum(needed.values()))
    store.prepare()
    installed = []
    async with store.store_lock(exclusive=False):
        for model in bundle.models:
            installed.append(await _install(bundle, store, model, on_event))
    return ImportResult(tuple(installed), dry_run=False)


@dataclass(frozen=True)
class _ImportPlan:
    model: BundleModel
    present: tuple[Layer, ...]
    missing: tuple[Layer, ...]

    def event(self, *, dry_run: bool) -> ImportPlanned:
        manifest = self.model.manifest
        return ImportPlanned(
            model=self.model.reference.short,
            digest=manifest.digest,
            blobs=len(manifest.blobs),
            total_bytes=manifest.total_size,
            present_blobs=len(self.present),
            present_bytes=sum(layer.size for layer in self.present),
            dry_run=dry_run,
        )

    def result(self, path: Path | None) -> ImportedModel:
        return ImportedModel(
            reference=self.model.reference,
            manifest_digest=self.model.manifest.digest,
            manifest_path=path,
            installed_blobs=len(self.missing),
            installed_bytes=sum(layer.size for layer in self.missing),
            present_blobs=len(self.present),
        )


def _import_plan(store: Store, model: BundleModel) -> _ImportPlan:
    present = tuple(layer for layer in model.manifest.blobs if store.has_blob(layer))
    missing = tuple(layer for layer in model.manifest.blobs if layer not in present)
    return _ImportPlan(model, present, missing)


async def _install(bundle: Bundle, store: Store, model: BundleModel, on_event: EventCallback) -> ImportedModel:
    started = time.monotonic()
    async with contextlib.AsyncExitStack() as claims:
        # The claims keep a pull of the same blob out of its partial file; taken in digest order, so that two
        # imports never wait for each other.
        files: dict[str, BlobClaim] = {}
        for layer in sorted(model.manifest.blobs, key=lambda layer: layer.digest):
            claim = await claims.enter_async_context(store.claim_blob(layer))
            if claim is not None:
                files[layer.digest] = claim
        plan = _import_plan(store, model)
        on_event(plan.event(dry_run=False))
        await run_blocking(lambda channel: _stage_and_commit(bundle, store, plan, files, channel), on_event)
        path = store.write_manifest(model.reference, model.manifest.raw)
    result = plan.result(path)
    on_event(
        ImportFinished(
            model=model.reference.short,
            digest=result.manifest_digest,
            manifest_path=str(path),
            installed_blobs=result.installed_blobs,
            installed_bytes=result.installed_bytes,
            present_blobs=result.present_blobs,
            seconds=time.monotonic() - started,
        )
    )
    return result


def _stage_and_commit(
    bundle: Bundle, store: Store, plan: _ImportPlan, files: dict[str, BlobClaim], channel: Channel
) -> None:
    """Copy each missing blob into its partial file (the one ``files[digest]`` claims), hashing it; only when
    every one is verified do they all get their names. One bad blob removes every partial file of the model."""
    name = plan.model.reference.short
    staged: list[BlobFile] = []
    committed = False
    try:
        for layer in plan.missing:
            blob = store.open_blob(layer, files[layer.digest], resume=False)
            staged.append(blob)
            for chunk in _progress(bundle.chunks(layer.digest), layer, name, channel):
                channel.check()
                blob.write_all([chunk])
            reason = blob.mismatch()
            if reason is not None:
                raise TamperedBlob(bundle.label, name, layer.digest, reason)
        for blob in staged:
            blob.commit()
        committed = True
    finally:
        if not committed:
            for blob in staged:
                blob.close(keep=False)


def _reference(reference: str | ModelReference) -> ModelReference:
    return reference if isinstance(reference, ModelReference) else parse_reference(reference)
