"""Image manifests: parsed, validated, and kept byte for byte."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from .errors import InvalidManifest

MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
TENSOR_MEDIA_TYPE = "application/vnd.ollama.image.tensor"
# Real manifests are a few KiB even for models of hundreds of tensors; anything near this is hostile.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024

DIGEST_PATTERN = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class Layer:
    """One blob of a model, as the manifest describes it."""

    media_type: str
    digest: str
    size: int
    name: str | None = None

    @property
    def label(self) -> str:
        """What to call this blob in front of a person: the file name if the manifest has one."""
        if self.name:
            return self.name
        kind = self.media_type.removeprefix("application/vnd.ollama.image.")
        if kind == self.media_type:
            kind = "config" if "container.image" in kind else kind.rsplit("/", 1)[-1]
        return f"{kind} {self.digest[7:19]}"


@dataclass(frozen=True)
class Manifest:
    """A validated manifest and the exact bytes the registry sent, which are what gets written to the store."""

    raw: bytes
    config: Layer
    layers: tuple[Layer, ...]

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.raw).hexdigest()

    @property
    def media_type(self) -> str:
        """The manifest's own ``mediaType`` (what a registry wants as Content-Type), Docker's v2 by default."""
        value = json.loads(self.raw).get("mediaType")
        return value if isinstance(value, str) else MANIFEST_MEDIA_TYPE

    @property
    def blobs(self) -> tuple[Layer, ...]:
        """Every blob to fetch, config first, each digest once (a manifest may list one blob twice)."""
        seen: dict[str, Layer] = {}
        for layer in (self.config, *self.layers):
            seen.setdefault(layer.digest, layer)
        return tuple(seen.values())

    @property
    def total_size(self) -> int:
        return sum(layer.size for layer in self.blobs)


def parse_manifest(raw: bytes, *, model: str) -> Manifest:
    """Validate ``raw`` whatever Content-Type it came with; raise :class:`InvalidManifest` when unusable."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise InvalidManifest(model, f"it is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidManifest(model, "it is not JSON") from exc
    if not isinstance(document, dict):
        raise InvalidManifest(model, "it is not a JSON object")
    version = document.get("schemaVersion")
    if version != 2 or isinstance(version, bool):
        raise InvalidManifest(model, f"schemaVersion is {version!r}, expected 2")
    layers = document.get("layers")
    if not isinstance(layers, list):
        raise InvalidManifest(model, "'layers' is missing or not a list")
    return Manifest(
        raw=raw,
        config=_layer(document.get("config"), "config", model),
        layers=tuple(_layer(item, f"layers[{index}]", model) for index, item in enumerate(layers)),
    )


def _layer(item: Any, where: str, model: str) -> Layer:
    if not isinstance(item, dict):
        raise InvalidManifest(model, f"{where} is missing or not an object")
    media_type, digest, size, name = (item.get(key) for key in ("mediaType", "digest", "size", "name"))
    if not isinstance(media_type, str):
        raise InvalidManifest(model, f"{where}.mediaType is missing or not a string")
    if not isinstance(digest, str) or not DIGEST_PATTERN.fullmatch(digest):
        raise InvalidManifest(model, f"{where}.digest {digest!r} is not sha256:<64 lowercase hex>")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidManifest(model, f"{where}.size {size!r} is not a non-negative integer")
    if name is not None and not isinstance(name, str):
        raise InvalidManifest(model, f"{where}.name is not a string")
    return Layer(media_type=media_type, digest=digest, size=size, name=name)
