"""The data set: each workload's sizes, and its random blobs and manifests laid out as a registry's static files."""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from common import GIB, KIB, MIB, log
from host import HOST

NAMESPACE = "bench"
TAG = "latest"
MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_MEDIA_TYPE = "application/vnd.docker.container.image.v1+json"
TENSOR_MEDIA_TYPE = "application/vnd.ollama.image.tensor"
MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
GENERATE_PIECE = 4 * MIB
TENSOR_SUFFIXES = (
    "attn_q.weight",
    "attn_k.weight",
    "attn_v.weight",
    "attn_output.weight",
    "ffn_gate.weight",
    "ffn_up.weight",
    "ffn_down.weight",
    "attn_norm.weight",
)


@dataclass(frozen=True)
class Profile:
    """Sizes of one benchmark flavour: the full run that RESULTS.md reports, or the quick smoke run."""

    name: str
    runs: int
    many_blobs: int
    many_min: int
    many_max: int
    big_size: int
    scaling_total: int
    scaling_counts: tuple[int, ...]
    tensor_blobs: int
    tensor_size: int
    # Start-up measurements are cheap and noisier than transfers, so they get more samples.
    short_runs: int
    resume_runs: int


FULL = Profile(
    name="full",
    runs=5,
    many_blobs=256,
    many_min=MIB // 2,
    many_max=7 * MIB // 2,
    big_size=GIB,
    scaling_total=256 * MIB,
    scaling_counts=(16, 256, 4096),
    tensor_blobs=4096,
    tensor_size=64 * KIB,
    short_runs=7,
    resume_runs=3,
)
QUICK = Profile(
    name="quick",
    runs=1,
    many_blobs=64,
    many_min=MIB // 2,
    many_max=7 * MIB // 2,
    big_size=128 * MIB,
    scaling_total=32 * MIB,
    scaling_counts=(16, 256, 1024),
    tensor_blobs=1024,
    tensor_size=16 * KIB,
    short_runs=3,
    resume_runs=1,
)


@dataclass(frozen=True)
class Blob:
    hex: str
    size: int
    media_type: str
    name: str | None = None

    @property
    def digest(self) -> str:
        return f"sha256:{self.hex}"


@dataclass(frozen=True)
class Model:
    name: str
    blobs: tuple[Blob, ...]  # the config first, then the layers
    manifest: bytes

    @property
    def total_bytes(self) -> int:
        return sum(blob.size for blob in self.blobs)

    def reference(self, port: int) -> str:
        return f"{HOST}:{port}/{NAMESPACE}/{self.name}:{TAG}"

    def blob_url(self, port: int, blob: Blob) -> str:
        return f"http://{HOST}:{port}/v2/{NAMESPACE}/{self.name}/blobs/{blob.digest}"

    def describe(self) -> str:
        return f"{len(self.blobs)} blobs, {self.total_bytes / MIB:.1f} MiB"


def repository(root: Path, model: str) -> Path:
    """Where a model's manifests and blobs lie in the tree at ``root``, as a registry's paths."""
    return root / "v2" / NAMESPACE / model


def served_files(root: Path, model: Model) -> list[Path]:
    """Every file nginx serves for ``model`` from the tree at ``root``: its manifest and its blobs."""
    path = repository(root, model.name)
    return [path / "manifests" / TAG, *(path / "blobs" / blob.digest for blob in model.blobs)]


class Tree:
    """Random blobs and their manifests, laid out as the static files nginx serves."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.models: dict[str, Model] = {}

    def repository(self, model: str) -> Path:
        return repository(self.root, model)

    def _blob_dir(self, model: str) -> Path:
        path = self.repository(model) / "blobs"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _write_blob(self, model: str, size: int, fill: Callable[[int], bytes]) -> str:
        directory = self._blob_dir(model)
        temporary = directory / ".generating"
        digest = hashlib.sha256()
        with open(temporary, "wb") as handle:
            left = size
            while left:
                piece = fill(min(GENERATE_PIECE, left))
                digest.update(piece)
                handle.write(piece)
                left -= len(piece)
        hex_digest = digest.hexdigest()
        # The colon is fine in a Linux file name, and it lets nginx map the URL straight to the file.
        temporary.rename(directory / f"sha256:{hex_digest}")
        return hex_digest

    def add_model(self, name: str, layers: Sequence[tuple[int, str, str | None]]) -> Model:
        config_bytes = json.dumps({"model_format": "gguf", "model_family": "bench", "workload": name}).encode()
        config_hex = self._write_blob(name, len(config_bytes), lambda _size: config_bytes)
        blobs = [Blob(config_hex, len(config_bytes), CONFIG_MEDIA_TYPE)]
        for size, media_type, layer_name in layers:
            # os.urandom: incompressible and fast (well over 500 MB/s here), and no two blobs share a digest.
            blobs.append(Blob(self._write_blob(name, size, os.urandom), size, media_type, layer_name))
        return self._finish(name, tuple(blobs))

    def alias(self, name: str, source: Model) -> Model:
        """A second repository with the very same blobs (hard links), for the rate-limited location."""
        directory = self._blob_dir(name)
        for blob in source.blobs:
            target = directory / f"sha256:{blob.hex}"
            if not target.exists():
                os.link(self._blob_dir(source.name) / f"sha256:{blob.hex}", target)
        return self._finish(name, source.blobs)

    def _finish(self, name: str, blobs: tuple[Blob, ...]) -> Model:
        def entry(blob: Blob) -> dict[str, object]:
            item: dict[str, object] = {"mediaType": blob.media_type, "digest": blob.digest, "size": blob.size}
            if blob.name is not None:
                item["name"] = blob.name
            return item

        document = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": entry(blobs[0]),
            "layers": [entry(blob) for blob in blobs[1:]],
        }
        manifest = json.dumps(document, separators=(",", ":")).encode()
        manifests = self.repository(name) / "manifests"
        manifests.mkdir(parents=True, exist_ok=True)
        (manifests / TAG).write_bytes(manifest)
        model = Model(name, blobs, manifest)
        self.models[name] = model
        return model


def tensor_layers(count: int, sizes: Sequence[int]) -> list[tuple[int, str, str | None]]:
    names = [
        f"blk.{index // len(TENSOR_SUFFIXES)}.{TENSOR_SUFFIXES[index % len(TENSOR_SUFFIXES)]}" for index in range(count)
    ]
    return [(size, TENSOR_MEDIA_TYPE, name) for size, name in zip(sizes, names, strict=True)]


def build_tree(tree: Tree, profile: Profile, workloads: set[str]) -> None:
    started = time.perf_counter()
    if workloads & {"many", "many-limited", "rerun"}:
        # A fixed seed: the sizes (so the total bytes) are the same from one invocation to the next.
        rng = random.Random(20240601)
        sizes = [rng.randint(profile.many_min, profile.many_max) for _ in range(profile.many_blobs)]
        many = tree.add_model("many", tensor_layers(profile.many_blobs, sizes))
        tree.alias("many-limited", many)
    if "tensors" in workloads:
        sizes = [profile.tensor_size] * profile.tensor_blobs
        tree.add_model("tensors", tensor_layers(profile.tensor_blobs, sizes))
    if workloads & {"big", "big-limited", "resume"}:
        big = tree.add_model("big", [(profile.big_size, MODEL_MEDIA_TYPE, None)])
        tree.alias("big-limited", big)
    if "scaling" in workloads:
        for count in profile.scaling_counts:
            size = profile.scaling_total // count
            tree.add_model(f"scaling-{count}", tensor_layers(count, [size] * count))
    # nginx's workers drop root privileges; the tree must be readable by them (mkdtemp makes 0700 directories).
    for directory, _subdirs, _files in os.walk(tree.root):
        os.chmod(directory, 0o755)
    # Flush the generated bytes now so that their write-back does not land in the first measured runs.
    os.sync()
    total = sum(model.total_bytes for name, model in tree.models.items() if not name.endswith("-limited"))
    log(f"generated {total / MIB:.0f} MiB of blobs in {time.perf_counter() - started:.1f} s under {tree.root}")
