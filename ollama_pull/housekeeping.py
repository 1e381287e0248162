"""Store housekeeping, as Ollama users expect it: list what is there, remove a model, remove blobs nothing uses.

Each function answers with the event that ``--json`` prints for it (see :mod:`ollama_pull.events`). Removing
anything takes the store lock alone, so it waits for pulls running in other processes and never removes a blob
that one of them has finished but not yet named in a manifest. With ``dry_run`` nothing is removed, nor even
locked: the answer says what would go.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from .errors import InvalidManifest, StorageError
from .events import LocalModel, Pruned, Removed
from .manifest import Manifest
from .reference import ModelReference
from .store import Store, open_store, storage_errors


def list_models(models_dir: str | Path | None = None) -> list[LocalModel]:
    store = open_store(models_dir)
    models = []
    for reference in store.manifests():
        path = str(store.manifest_path(reference))
        try:
            manifest = store.load_manifest(reference)
        except (InvalidManifest, StorageError):
            models.append(LocalModel(reference.short, None, 0, 0, 0, path))
            continue
        missing = sum(not store.has_blob(layer) for layer in manifest.blobs)
        models.append(
            LocalModel(reference.short, manifest.digest, manifest.total_size, len(manifest.blobs), missing, path)
        )
    return models


async def prune(
    models_dir: str | Path | None = None,
    *,
    dry_run: bool = False,
    pending: Mapping[ModelReference, Manifest] | None = None,
) -> Pruned:
    """Remove every blob that no manifest in the store references.

    ``pending`` holds manifests about to replace (or join) those in the store, for a dry run of a pull followed by
    a prune: what a tag's new manifest no longer uses would go, what it uses would stay.
    """
    store = open_store(models_dir)
    async with _removing(store, dry_run):
        manifests = _readable_manifests(store, "prune")
        manifests.update(pending or {})
        referenced = _digests(manifests.values())
        unused = [(digest, path) for digest, path in store.blob_files() if digest not in referenced]
        freed = _remove_blobs(store, unused, dry_run=dry_run)
    return Pruned(len(unused), freed, tuple(digest for digest, _ in unused), dry_run)


async def remove(
    references: Sequence[ModelReference], models_dir: str | Path | None = None, *, dry_run: bool = False
) -> list[Removed]:
    """Remove each model's manifest, then its blobs that no other model in the store uses, as ``ollama rm`` does.

    Every name is checked first: one that is not in the store raises :class:`NotInStore` with nothing removed.
    """
    store = open_store(models_dir)
    for reference in references:
        store.load_manifest(reference)
    removed = []
    async with _removing(store, dry_run):
        manifests = _readable_manifests(store, "remove models", allow=set(references))
        for reference in references:
            manifest = manifests.pop(reference, None)
            others = _digests(manifests.values())
            blobs = [] if manifest is None else [layer.digest for layer in manifest.blobs]
            unused = [(digest, store.blob_path(digest)) for digest in dict.fromkeys(blobs) if digest not in others]
            unused = [(digest, path) for digest, path in unused if path.exists()]
            path = store.manifest_path(reference)
            if not dry_run:
                with storage_errors(f"remove the manifest {path}"):
                    path.unlink(missing_ok=True)
            freed = _remove_blobs(store, unused, dry_run=dry_run)
            digest = manifest.digest if manifest is not None else None
            removed.append(
                Removed(
                    reference.short,
                    digest,
                    str(path),
                    len(unused),
                    freed,
                    tuple(digest for digest, _ in unused),
                    dry_run,
                )
            )
    return removed


def _removing(store: Store, dry_run: bool) -> contextlib.AbstractAsyncContextManager[None]:
    """The store lock, alone, for a removal; none for a dry run, which must not so much as create the lock file."""
    return contextlib.nullcontext() if dry_run else store.store_lock(exclusive=True)


def _readable_manifests(
    store: Store, action: str, *, allow: set[ModelReference] | None = None
) -> dict[ModelReference, Manifest]:
    """Every manifest in the store. One that cannot be read stops the removal (it could need any blob), unless it
    is one of ``allow``, the models being removed."""
    manifests = {}
    for reference in store.manifests():
        try:
            manifests[reference] = store.load_manifest(reference)
        except (InvalidManifest, StorageError) as exc:
            if allow is not None and reference in allow:
                continue
            raise StorageError(
                f"refusing to {action}: {store.manifest_path(reference)} cannot be read as a manifest ({exc}), "
                "so the blobs it needs are unknown; remove it or pull the model again"
            ) from exc
    return manifests


def _digests(manifests: Iterable[Manifest]) -> set[str]:
    return {layer.digest for manifest in manifests for layer in manifest.blobs}


def _remove_blobs(store: Store, blobs: list[tuple[str, Path]], *, dry_run: bool) -> int:
    freed = 0
    for _digest, path in blobs:
        with storage_errors(f"remove the blob {path}"):
            freed += path.stat().st_size
            if not dry_run:
                path.unlink(missing_ok=True)
    return freed
