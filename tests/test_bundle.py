"""Export and import of OCI image layouts: round trips, what a bundle may not contain, and damaged bytes."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import subprocess
import tarfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from ollama_pull.bundle import REF_NAME_ANNOTATION, export_models, import_bundle, open_bundle
from ollama_pull.errors import CorruptModel, IncompleteModel, InvalidBundle, StorageError, TamperedBlob
from ollama_pull.events import (
    BlobFinished,
    BlobProgress,
    Event,
    EventCallback,
    ExportFinished,
    ExportPlanned,
    ImportFinished,
    ImportPlanned,
)
from ollama_pull.manifest import MAX_MANIFEST_BYTES
from ollama_pull.reference import parse_reference
from ollama_pull.store import Store

from .fakes import Model, make_model
from .fault_registry import build_manifest

pytestmark = pytest.mark.anyio

FIRST = parse_reference("registry.test/ns/first:v1")
SECOND = parse_reference("hf.co/someone/second-GGUF:Q4_K_M")


def stocked(root: Path, *models: tuple[str, Model]) -> Store:
    """A store holding each model, as a pull leaves it."""
    store = Store(root)
    store.prepare()
    for name, model in models:
        for digest, data in model.blobs.items():
            store.blob_path(digest).write_bytes(data)
        store.write_manifest(parse_reference(name), model.manifest.raw)
    return store


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (lock files aside) with its bytes."""
    if not root.exists():
        return {}
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and ".ollama-pull" not in path.parts
    }


def listing(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


@pytest.fixture
def two_models() -> tuple[Model, Model]:
    # Same config blob in both: a bundle holds it once.
    return make_model(3000, 70_000, seed=1), make_model(5000, seed=2)


@pytest.mark.parametrize("output_name", ["models.tar", "models-dir"])
async def test_export_then_import_restores_the_store_byte_for_byte(
    tmp_path: Path, two_models: tuple[Model, Model], output_name: str
) -> None:
    first, second = two_models
    source = stocked(tmp_path / "source", (str(FIRST), first), (str(SECOND), second))
    output = tmp_path / output_name
    events: list[Event] = []
    result = await export_models(
        ["registry.test/ns/first:v1", SECOND], output, models_dir=source.root, on_event=events.append
    )
    shared = set(first.blobs) & set(second.blobs)
    assert len(shared) == 1
    unique = set(first.blobs) | set(second.blobs)
    assert result.blobs == len(unique)
    assert result.total_bytes == sum(len(data) for data in (first.blobs | second.blobs).values())
    assert isinstance(events[0], ExportPlanned)
    assert events[0].models == (str(FIRST), str(SECOND))
    assert isinstance(events[-1], ExportFinished)
    assert sorted(e.digest for e in events if isinstance(e, BlobFinished)) == sorted(unique)

    imported: list[Event] = []
    target = tmp_path / "target"
    done = await import_bundle(output, models_dir=target, on_event=imported.append)
    assert [model.reference for model in done.models] == [FIRST, SECOND]
    assert snapshot(target) == snapshot(source.root)
    assert [type(e) for e in imported if not isinstance(e, BlobFinished) and e.kind.startswith("import")] == [
        ImportPlanned,
        ImportFinished,
        ImportPlanned,
        ImportFinished,
    ]
    # The shared blob was installed with the first model and was already present for the second.
    second_plan = [e for e in imported if isinstance(e, ImportPlanned)][1]
    assert second_plan.present_blobs == 1


async def test_the_tar_is_an_oci_image_layout_that_tar_readers_accept(
    tmp_path: Path, two_models: tuple[Model, Model]
) -> None:
    first, second = two_models
    source = stocked(tmp_path / "source", (str(FIRST), first), (str(SECOND), second))
    output = tmp_path / "models.tar"
    await export_models([FIRST, SECOND], output, models_dir=source.root)
    with tarfile.open(output) as archive:
        names = archive.getnames()
        index = json.load(archive.extractfile("index.json"))  # type: ignore[arg-type]
        layout = json.load(archive.extractfile("oci-layout"))  # type: ignore[arg-type]
        blobs = {
            "sha256:" + member.name.rsplit("/", 1)[1]: archive.extractfile(member).read()  # type: ignore[union-attr]
            for member in archive.getmembers()
            if member.isfile() and member.name.startswith("blobs/sha256/")
        }
    assert layout == {"imageLayoutVersion": "1.0.0"}
    assert len(names) == len(set(names))
    assert [d["annotations"][REF_NAME_ANNOTATION] for d in index["manifests"]] == [str(FIRST), str(SECOND)]
    assert [d["digest"] for d in index["manifests"]] == [first.manifest.digest, second.manifest.digest]
    assert blobs == first.blobs | second.blobs | {
        first.manifest.digest: first.manifest.raw,
        second.manifest.digest: second.manifest.raw,
    }
    # The same models make the same bundle, byte for byte.
    again = tmp_path / "again.tar"
    await export_models([FIRST, SECOND], again, models_dir=source.root)
    assert again.read_bytes() == output.read_bytes()


async def test_a_model_missing_blobs_is_refused_before_anything_is_written(
    tmp_path: Path, two_models: tuple[Model, Model]
) -> None:
    first, second = two_models
    source = stocked(tmp_path / "source", (str(FIRST), first), (str(SECOND), second))
    gone = second.layers[-1].digest
    source.blob_path(gone).unlink()
    output = tmp_path / "models.tar"
    with pytest.raises(IncompleteModel, match=f"lacks 1 blob.*{gone}.*nothing was written: pull"):
        await export_models([FIRST, SECOND], output, models_dir=source.root)
    assert listing(tmp_path) == ["source"]


async def test_a_blob_that_went_bad_in_the_store_is_not_exported(
    tmp_path: Path, two_models: tuple[Model, Model]
) -> None:
    first, _ = two_models
    source = stocked(tmp_path / "source", (str(FIRST), first))
    bad = first.layers[1]
    data = bytearray(first.blobs[bad.digest])
    data[10] ^= 1
    source.blob_path(bad.digest).write_bytes(bytes(data))
    with pytest.raises(CorruptModel, match="do not match"):
        await export_models([FIRST], tmp_path / "models.tar", models_dir=source.root)
    assert not (tmp_path / "models.tar").exists()
    assert listing(tmp_path) == ["source"]
    assert not source.blob_path(bad.digest).exists()


async def test_export_dry_run_writes_nothing(tmp_path: Path, two_models: tuple[Model, Model]) -> None:
    first, _ = two_models
    source = stocked(tmp_path / "source", (str(FIRST), first))
    before = snapshot(tmp_path)
    events: list[Event] = []
    result = await export_models(
        [FIRST], tmp_path / "models.tar", models_dir=source.root, on_event=events.append, dry_run=True
    )
    assert result.dry_run
    assert snapshot(tmp_path) == before
    assert [type(e) for e in events] == [ExportPlanned]


async def test_export_refuses_a_non_empty_directory(tmp_path: Path, two_models: tuple[Model, Model]) -> None:
    source = stocked(tmp_path / "source", (str(FIRST), two_models[0]))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("mine")
    with pytest.raises(StorageError, match="not an empty directory"):
        await export_models([FIRST], tmp_path / "out", models_dir=source.root)
    assert snapshot(tmp_path / "out") == {"keep": b"mine"}


async def exported(tmp_path: Path, model: Model, name: str = "models.tar") -> Path:
    source = stocked(tmp_path / "source", (str(FIRST), model))
    output = tmp_path / name
    await export_models([FIRST], output, models_dir=source.root)
    return output


@pytest.mark.parametrize("layout", ["models.tar", "models-dir"])
async def test_one_tampered_byte_installs_nothing_of_the_model(
    tmp_path: Path, two_models: tuple[Model, Model], layout: str
) -> None:
    model = two_models[0]
    output = await exported(tmp_path, model, layout)
    victim = model.layers[2]
    data = model.blobs[victim.digest]
    if layout.endswith(".tar"):
        raw = bytearray(output.read_bytes())
        at = raw.find(data)
        raw[at + 1234] ^= 0x40
        output.write_bytes(bytes(raw))
    else:
        path = output / "blobs" / "sha256" / victim.digest.removeprefix("sha256:")
        changed = bytearray(data)
        changed[1234] ^= 0x40
        path.write_bytes(bytes(changed))
    target = tmp_path / "target"
    with pytest.raises(TamperedBlob, match=f"blob {victim.digest} of .* is damaged .*nothing of .* was installed"):
        await import_bundle(output, models_dir=target)
    assert not (target / "manifests").exists()
    assert listing(target / "blobs") == []


async def test_a_layout_tarred_by_gnu_tar_imports(tmp_path: Path, two_models: tuple[Model, Model]) -> None:
    """``tar -cf bundle.tar -C DIR .``: members start with ``./``, and the directory itself is one."""
    layout = await exported(tmp_path, two_models[0], "models-dir")
    bundle = tmp_path / "by-gnu-tar.tar"
    await asyncio.to_thread(subprocess.run, ["tar", "-cf", str(bundle), "-C", str(layout), "."], check=True)
    result = await import_bundle(bundle, models_dir=tmp_path / "target")
    assert [model.reference for model in result.models] == [FIRST]
    assert snapshot(tmp_path / "target") == snapshot(tmp_path / "source")


async def test_import_dry_run_lists_the_models_and_writes_nothing(
    tmp_path: Path, two_models: tuple[Model, Model]
) -> None:
    output = await exported(tmp_path, two_models[0])
    events: list[Event] = []
    result = await import_bundle(output, models_dir=tmp_path / "target", on_event=events.append, dry_run=True)
    assert [(m.reference, m.installed_blobs, m.manifest_path) for m in result.models] == [(FIRST, 3, None)]
    assert [type(e) for e in events] == [ImportPlanned]
    assert not (tmp_path / "target").exists()


async def test_importing_what_the_store_holds_copies_no_blob(tmp_path: Path, two_models: tuple[Model, Model]) -> None:
    output = await exported(tmp_path, two_models[0])
    result = await import_bundle(output, models_dir=tmp_path / "source")
    assert [(m.installed_blobs, m.present_blobs) for m in result.models] == [(0, 3)]


# --- hand-made bundles: what an import must refuse before it writes anything ------------------------------------

LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'


def add(archive: tarfile.TarFile, name: str, data: bytes = b"", **fields: object) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in fields.items():
        setattr(info, key, value)
    archive.addfile(info, io.BytesIO(data) if data else None)


def valid_members(archive: tarfile.TarFile, model: Model) -> None:
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "digest": model.manifest.digest,
                "size": len(model.manifest.raw),
                "annotations": {REF_NAME_ANNOTATION: str(FIRST)},
            }
        ],
    }
    add(archive, "oci-layout", LAYOUT)
    add(archive, "index.json", json.dumps(index).encode())
    add(archive, "blobs/sha256/" + model.manifest.digest[7:], model.manifest.raw)
    for digest, data in model.blobs.items():
        add(archive, "blobs/sha256/" + digest[7:], data)


def hostile_tar(path: Path, extra: Callable[[tarfile.TarFile], None], model: Model) -> Path:
    with tarfile.open(path, "w") as archive:
        valid_members(archive, model)
        extra(archive)
    return path


HOSTILE: dict[str, tuple[Callable[[tarfile.TarFile], None], str]] = {
    "parent": (lambda a: add(a, "../escape", b"x"), "points outside the bundle"),
    "nested-parent": (lambda a: add(a, "blobs/../../escape", b"x"), "points outside the bundle"),
    "absolute": (lambda a: add(a, "/etc/cron.d/evil", b"x"), "points outside the bundle"),
    "symlink": (
        lambda a: add(a, "blobs/sha256/" + "a" * 64, type=tarfile.SYMTYPE, linkname="/etc/passwd"),
        "is a link",
    ),
    "hardlink": (
        lambda a: add(a, "blobs/sha256/" + "b" * 64, type=tarfile.LNKTYPE, linkname="oci-layout"),
        "is a link",
    ),
    "fifo": (lambda a: add(a, "blobs/sha256/" + "c" * 64, type=tarfile.FIFOTYPE), "not a regular file"),
    "device": (lambda a: add(a, "blobs/sha256/" + "d" * 64, type=tarfile.CHRTYPE), "not a regular file"),
    "unexpected-file": (lambda a: add(a, "install.sh", b"#!/bin/sh\n"), "unexpected file 'install.sh'"),
    "unexpected-digest": (lambda a: add(a, "blobs/sha512/" + "e" * 128, b"x"), "unexpected"),
    "unexpected-directory": (lambda a: add(a, "extra", type=tarfile.DIRTYPE), "unexpected directory 'extra'"),
    "duplicate": (lambda a: add(a, "./oci-layout", LAYOUT), "appears twice"),
}


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
async def test_hostile_members_are_refused_before_anything_is_written(tmp_path: Path, case: str) -> None:
    extra, message = HOSTILE[case]
    bundle = hostile_tar(tmp_path / "bundle.tar", extra, make_model(100, 200))
    with pytest.raises(InvalidBundle, match=message) as caught:
        await import_bundle(bundle, models_dir=tmp_path / "target")
    assert str(caught.value).endswith("nothing was installed: make it with `ollama-pull export MODEL... -o FILE.tar`")
    assert not (tmp_path / "target").exists()


async def test_a_bundle_of_too_many_members_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ollama_pull.bundle.MAX_ENTRIES", 5)
    bundle = hostile_tar(tmp_path / "bundle.tar", lambda _archive: None, make_model(1, 2, 3, 4, 5))
    with pytest.raises(InvalidBundle, match="more than 5 members"):
        await import_bundle(bundle, models_dir=tmp_path / "target")


async def test_an_oversized_index_is_refused_unread(tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "bundle.tar", "w") as archive:
        add(archive, "oci-layout", LAYOUT)
        add(archive, "index.json", b" " * (MAX_MANIFEST_BYTES + 1))
    with pytest.raises(InvalidBundle, match=f"index.json is larger than {MAX_MANIFEST_BYTES} bytes"):
        await import_bundle(tmp_path / "bundle.tar", models_dir=tmp_path / "target")
    assert not (tmp_path / "target").exists()


async def test_an_oversized_manifest_is_refused_unread(tmp_path: Path) -> None:
    model = make_model(100)
    big = b"{" + b" " * MAX_MANIFEST_BYTES + b"}"
    digest = "sha256:" + hashlib.sha256(big).hexdigest()
    index = {"manifests": [{"digest": digest, "size": len(big), "annotations": {REF_NAME_ANNOTATION: str(FIRST)}}]}
    with tarfile.open(tmp_path / "bundle.tar", "w") as archive:
        add(archive, "oci-layout", LAYOUT)
        add(archive, "index.json", json.dumps(index).encode())
        add(archive, "blobs/sha256/" + digest[7:], big)
        for blob, data in model.blobs.items():
            add(archive, "blobs/sha256/" + blob[7:], data)
    with pytest.raises(InvalidBundle, match=f"the manifest of {FIRST} is larger than {MAX_MANIFEST_BYTES} bytes"):
        await import_bundle(tmp_path / "bundle.tar", models_dir=tmp_path / "target")
    assert not (tmp_path / "target").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a tar at all" * 100, "not an uncompressed tar archive"),
        (None, "no such file or directory"),
    ],
)
async def test_what_is_not_a_bundle_is_refused(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "bundle.tar"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InvalidBundle, match=message):
        await import_bundle(path, models_dir=tmp_path / "target")


@pytest.mark.parametrize(
    ("name", "message"),
    [("qwen3:8b", "not a full host/namespace/model:tag name"), ("bad name", "not a model name"), (None, "no org.open")],
)
async def test_a_model_must_carry_its_full_name(tmp_path: Path, name: str | None, message: str) -> None:
    model = make_model(100)
    annotations = {REF_NAME_ANNOTATION: name} if name else {}
    index = {
        "manifests": [{"digest": model.manifest.digest, "size": len(model.manifest.raw), "annotations": annotations}]
    }
    with tarfile.open(tmp_path / "bundle.tar", "w") as archive:
        add(archive, "oci-layout", LAYOUT)
        add(archive, "index.json", json.dumps(index).encode())
        add(archive, "blobs/sha256/" + model.manifest.digest[7:], model.manifest.raw)
    with pytest.raises(InvalidBundle, match=message):
        open_bundle(tmp_path / "bundle.tar")


async def test_a_link_in_an_unpacked_bundle_is_refused(tmp_path: Path, two_models: tuple[Model, Model]) -> None:
    output = await exported(tmp_path, two_models[0], "models-dir")
    victim = next(iter((output / "blobs" / "sha256").iterdir()))
    victim.unlink()
    victim.symlink_to("/etc/passwd")
    with pytest.raises(InvalidBundle, match="is a link"):
        await import_bundle(output, models_dir=tmp_path / "target")
    assert not (tmp_path / "target").exists()


async def test_a_truncated_tar_is_refused(tmp_path: Path, two_models: tuple[Model, Model]) -> None:
    output = await exported(tmp_path, two_models[0])
    raw = output.read_bytes()
    output.write_bytes(raw[: len(raw) // 2])
    with pytest.raises((InvalidBundle, TamperedBlob)):
        await import_bundle(output, models_dir=tmp_path / "target")
    assert not (tmp_path / "target" / "manifests").exists()


async def cancelled_at_first_progress(run: Callable[[EventCallback], Awaitable[object]]) -> None:
    """Start ``run``, cancel it at its first blob progress, and wait until it has stopped."""
    progressed = asyncio.Event()

    def watch(event: Event) -> None:
        if isinstance(event, BlobProgress):
            progressed.set()

    task = asyncio.create_task(run(watch))
    await asyncio.wait_for(progressed.wait(), 20)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


BIG = 48 * 1024 * 1024  # 48 reads: a stop between two of them is long before the end


async def test_a_cancelled_export_leaves_nothing_behind(tmp_path: Path) -> None:
    source = stocked(tmp_path / "source", (str(FIRST), make_model(BIG)))
    output = tmp_path / "models.tar"
    await cancelled_at_first_progress(
        lambda watch: export_models([FIRST], output, models_dir=source.root, on_event=watch)
    )
    assert listing(tmp_path) == ["source"]


async def test_a_cancelled_import_installs_nothing_and_leaves_no_partial_file(tmp_path: Path) -> None:
    output = await exported(tmp_path, make_model(BIG))
    target = tmp_path / "target"
    await cancelled_at_first_progress(lambda watch: import_bundle(output, models_dir=target, on_event=watch))
    assert not (target / "manifests").exists()
    assert listing(target / "blobs") == []


async def test_members_over_8_gib_are_read_from_their_pax_headers(tmp_path: Path) -> None:
    """A 70B GGUF is over 8 GiB, the most a plain ustar header can say; the export writes PAX headers (as here),
    and the import reads the size from them. The blob is a hole in a sparse file: only headers are read."""
    size = 9 * 1024**3
    digest = "sha256:" + "f" * 64
    config = b"{}"
    raw = build_manifest(config, [])
    manifest = json.loads(raw)
    manifest["layers"] = [{"mediaType": "application/vnd.ollama.image.model", "digest": digest, "size": size}]
    raw = json.dumps(manifest).encode()
    manifest_digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    index = {
        "manifests": [{"digest": manifest_digest, "size": len(raw), "annotations": {REF_NAME_ANNOTATION: str(FIRST)}}]
    }
    path = tmp_path / "big.tar"
    with path.open("wb") as handle:
        for name, data in [
            ("oci-layout", LAYOUT),
            ("index.json", json.dumps(index).encode()),
            ("blobs/sha256/" + manifest_digest[7:], raw),
            ("blobs/sha256/" + hashlib.sha256(config).hexdigest(), config),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            handle.write(info.tobuf(tarfile.PAX_FORMAT) + data + b"\0" * (-len(data) % 512))
        info = tarfile.TarInfo("blobs/sha256/" + digest[7:])
        info.size = size
        header = info.tobuf(tarfile.PAX_FORMAT)
        assert b"size=" in header  # the PAX record, since ustar cannot hold the size
        handle.write(header)
        handle.truncate(handle.tell() + size + 1024)
    result = await import_bundle(path, models_dir=tmp_path / "target", dry_run=True)
    assert [(m.reference, m.installed_bytes) for m in result.models] == [(FIRST, size + len(config))]
