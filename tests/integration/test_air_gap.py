"""Across an air gap, against the real CNCF distribution registry: export from a store, push the bundle to an
empty registry, pull it back into an empty store, and compare byte for byte; with Basic auth too; a second push
uploads nothing; a push within one registry mounts instead of uploading; a tampered bundle installs nothing."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from ollama_pull import pull
from ollama_pull.bundle import export_models, import_bundle
from ollama_pull.errors import AuthenticationError, ModelNotFound, TamperedBlob
from ollama_pull.push import PushSettings, push
from ollama_pull.reference import parse_reference
from ollama_pull.store import Store

from .distribution import DistributionRegistry, manifest_bytes, sha256_digest
from .test_distribution_registry import CONFIG, PASSWORD, USER, basic_auth, synthetic_layers

pytestmark = [
    pytest.mark.integration,
    pytest.mark.anyio,
    pytest.mark.skipif(shutil.which("docker-registry") is None, reason=".ci/run installs docker-registry"),
]

ORIGINAL = parse_reference("registry.ollama.ai/library/synthetic:v1")
AGENT = "ollama-pull/"
# The 1.5 MiB tensor goes up in 512 KiB PATCH chunks; the others in one PUT each.
SMALL_CHUNKS = PushSettings(chunked_min_size=1024 * 1024, chunk_size=512 * 1024)


@pytest.fixture
def registry() -> Iterator[DistributionRegistry]:
    with DistributionRegistry() as server:
        yield server


@pytest.fixture
def private_registry() -> Iterator[DistributionRegistry]:
    with DistributionRegistry(users={USER: PASSWORD}) as server:
        yield server


def original_store(root: Path) -> tuple[bytes, dict[str, bytes]]:
    """A store holding the synthetic model as a pull from registry.ollama.ai would leave it."""
    layers = synthetic_layers()
    manifest = manifest_bytes(CONFIG, layers)
    blobs = {sha256_digest(CONFIG): CONFIG} | {sha256_digest(layer.data): layer.data for layer in layers}
    store = Store(root)
    store.prepare()
    for digest, data in blobs.items():
        store.blob_path(digest).write_bytes(data)
    store.write_manifest(ORIGINAL, manifest)
    return manifest, blobs


def assert_pulled_byte_for_byte(models: Path, name: str, manifest: bytes, blobs: dict[str, bytes]) -> None:
    stored = models / "blobs"
    assert sorted(path.name for path in stored.iterdir()) == sorted(d.replace(":", "-") for d in blobs)
    for digest, data in blobs.items():
        assert (stored / digest.replace(":", "-")).read_bytes() == data, digest
    reference = parse_reference(name)
    assert Store(models).manifest_path(reference).read_bytes() == manifest


async def round_trip(tmp_path: Path, registry: DistributionRegistry) -> str:
    manifest, blobs = original_store(tmp_path / "original")
    bundle = tmp_path / "models.tar"
    await export_models([ORIGINAL], bundle, models_dir=tmp_path / "original")
    destination = f"{registry.host}/library/synthetic:v1"
    result = await push(bundle, destination, insecure=True, settings=SMALL_CHUNKS)
    assert (result.uploaded_blobs, result.present_blobs, result.mounted_blobs) == (len(blobs), 0, 0)
    assert result.manifest_uploaded
    await pull(destination, models_dir=tmp_path / "pulled", insecure=True)
    assert_pulled_byte_for_byte(tmp_path / "pulled", destination, manifest, blobs)
    methods = [(r.method, r.status) for r in registry.requests(AGENT) if "/blobs/uploads/" in r.path]
    assert ("PATCH", 202) in methods  # the big tensor went up in chunks
    return destination


async def test_export_push_pull_is_byte_for_byte(tmp_path: Path, registry: DistributionRegistry) -> None:
    destination = await round_trip(tmp_path, registry)
    # A second push of the same bundle asks, and sends nothing.
    before = len(registry.requests(AGENT))
    again = await push(tmp_path / "models.tar", destination, insecure=True, settings=SMALL_CHUNKS)
    assert (again.uploaded_blobs, again.present_blobs, again.manifest_uploaded) == (0, 9, False)
    second = registry.requests(AGENT, at_least=before + 10)[before:]
    assert {record.method for record in second} == {"HEAD"}
    assert len(second) == 10  # nine blobs and the manifest


@pytest.mark.parametrize("where", ["environment", "docker-config"])
async def test_the_same_with_basic_auth(
    tmp_path: Path, private_registry: DistributionRegistry, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    if where == "environment":
        monkeypatch.setenv("OLLAMA_PULL_USERNAME", USER)
        monkeypatch.setenv("OLLAMA_PULL_PASSWORD", PASSWORD)
    else:
        docker = tmp_path / "docker"
        docker.mkdir()
        auths = {private_registry.host: {"auth": basic_auth(PASSWORD)}}
        (docker / "config.json").write_text(json.dumps({"auths": auths}))
        monkeypatch.setenv("DOCKER_CONFIG", str(docker))
    await round_trip(tmp_path, private_registry)
    # Anonymous requests were challenged, and none was refused once the credentials went along.
    statuses = {record.status for record in private_registry.requests(AGENT)}
    assert 401 in statuses
    assert not statuses & {403, 500}


async def test_a_wrong_password_is_an_authentication_error(
    tmp_path: Path, private_registry: DistributionRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    original_store(tmp_path / "original")
    monkeypatch.setenv("OLLAMA_PULL_USERNAME", USER)
    monkeypatch.setenv("OLLAMA_PULL_PASSWORD", "wrong")
    with pytest.raises(AuthenticationError, match=r"HTTP 401.*the credentials were refused") as caught:
        await push(
            str(ORIGINAL),
            f"{private_registry.host}/library/synthetic:v1",
            models_dir=tmp_path / "original",
            insecure=True,
        )
    assert "wrong" not in str(caught.value)


async def test_a_dry_run_asks_and_sends_nothing(tmp_path: Path, registry: DistributionRegistry) -> None:
    original_store(tmp_path / "original")
    destination = f"{registry.host}/library/synthetic:v1"
    result = await push(str(ORIGINAL), destination, models_dir=tmp_path / "original", insecure=True, dry_run=True)
    assert (result.dry_run, result.uploaded_blobs, result.present_blobs) == (True, 0, 0)
    assert {record.method for record in registry.requests(AGENT, at_least=9)} == {"HEAD"}
    with pytest.raises(ModelNotFound):
        await pull(destination, models_dir=tmp_path / "pulled", insecure=True)


async def test_a_push_within_one_registry_mounts_every_blob(tmp_path: Path, registry: DistributionRegistry) -> None:
    manifest, blobs = original_store(tmp_path / "original")
    first = f"{registry.host}/library/synthetic:v1"
    await push(str(ORIGINAL), first, models_dir=tmp_path / "original", insecure=True)
    # Pulled from this registry, the model's own name is on it: its blobs can be mounted into another repository.
    await pull(first, models_dir=tmp_path / "pulled", insecure=True)
    before = len(registry.requests(AGENT))
    copy = f"{registry.host}/team/copy:v2"
    result = await push(first, copy, models_dir=tmp_path / "pulled", insecure=True)
    assert (result.mounted_blobs, result.uploaded_blobs, result.uploaded_bytes) == (len(blobs), 0, 0)
    uploads = [r for r in registry.requests(AGENT)[before:] if r.method in ("PUT", "PATCH") and "/blobs/" in r.path]
    assert uploads == []
    await pull(copy, models_dir=tmp_path / "copied", insecure=True)
    assert_pulled_byte_for_byte(tmp_path / "copied", copy, manifest, blobs)


async def test_a_tampered_bundle_installs_nothing(tmp_path: Path, registry: DistributionRegistry) -> None:
    destination = await round_trip(tmp_path, registry)
    bundle = tmp_path / "fresh.tar"
    await export_models([destination], bundle, models_dir=tmp_path / "pulled")
    raw = bytearray(bundle.read_bytes())
    tensor = synthetic_layers()[1].data
    raw[raw.find(tensor) + 4096] ^= 0x01
    bundle.write_bytes(bytes(raw))
    with pytest.raises(TamperedBlob, match=sha256_digest(tensor)):
        await import_bundle(bundle, models_dir=tmp_path / "air-gapped")
    assert not (tmp_path / "air-gapped" / "manifests").exists()
    assert list((tmp_path / "air-gapped" / "blobs").iterdir()) == []
