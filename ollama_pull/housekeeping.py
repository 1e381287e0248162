"""Store housekeeping, as Ollama users expect it: list what is there, remove blobs nothing uses any more."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidManifest, StorageError
from .reference import ModelReference
from .store import Store, default_models_dir


@dataclass(frozen=True)
class LocalModel:
    """A model in the store; ``digest`` is None when its manifest cannot be read as one."""

    reference: ModelReference
    manifest_path: Path
    digest: str | None
    total_bytes: int
    blobs: int
    missing_blobs: int


@dataclass(frozen=True)
class PruneResult:
    removed: tuple[str, ...]
    freed_bytes: int


def list_models(models_dir: Path | None = None) -> list[LocalModel]:
    store = Store(models_dir or default_models_dir())
    models = []
    for reference in store.manifests():
        path = store.manifest_path(reference)
        try:
            manifest = store.load_manifest(reference)
        except (InvalidManifest, StorageError):
            models.append(LocalModel(reference, path, None, 0, 0, 0))
            continue
        missing = sum(not store.has_blob(layer) for layer in manifest.blobs)
        models.append(LocalModel(reference, path, manifest.digest, manifest.total_size, len(manifest.blobs), missing))
    return models


async def prune(models_dir: Path | None = None) -> PruneResult:
    """Remove every blob that no manifest in the store references, waiting for running pulls to finish first."""
    store = Store(models_dir or default_models_dir())
    async with store.store_lock(exclusive=True):
        referenced: set[str] = set()
        for reference in store.manifests():
            try:
                manifest = store.load_manifest(reference)
            except (InvalidManifest, StorageError) as exc:
                # Pruning blind could remove what that model needs: refuse rather than guess.
                raise StorageError(
                    f"refusing to prune: {store.manifest_path(reference)} cannot be read as a manifest ({exc}), "
                    "so the blobs it needs are unknown; remove it or pull the model again"
                ) from exc
            referenced.update(layer.digest for layer in manifest.blobs)
        removed: list[str] = []
        freed = 0
        for digest, path in store.blob_files():
            if digest in referenced:
                continue
            size = path.stat().st_size
            path.unlink(missing_ok=True)
            removed.append(digest)
            freed += size
    return PruneResult(tuple(removed), freed)
