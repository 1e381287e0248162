"""A store on a small tmpfs: a disk that is full from the start, one that fills mid-pull, one that is read-only."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fault_registry import Fault, FaultRegistry

from .conftest import (
    assert_nothing_unverified,
    assert_store_holds,
    partial_files,
    reference,
    run_cli,
    start_cli,
    wait_for,
)

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


def mount_tmpfs(path: Path, options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.decode().strip()}")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB filesystem of its own."""
    mount = tmp_path / "disk"
    mount_tmpfs(mount, f"size={4 * MIB}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def test_a_disk_too_small_from_the_start_is_exit_6_before_any_download(
    registry: FaultRegistry, models: Path, small_disk: Path
) -> None:
    model = registry.add_synthetic_model("library/big", blobs=5, blob_size=1 * MIB)
    store = small_disk / "models"
    run = run_cli(models, "--insecure", "--models-dir", str(store), reference(registry, model))
    assert run.returncode == 6
    assert "not enough free space" in run.stderr
    assert "needed" in run.stderr
    assert "free" in run.stderr
    assert [r for r in registry.requests if "/blobs/" in r.path] == []


def test_a_disk_that_fills_mid_pull_is_exit_6_and_a_rerun_after_freeing_space_succeeds(
    registry: FaultRegistry, models: Path, small_disk: Path
) -> None:
    model = registry.add_synthetic_model("library/demo", blobs=6, blob_size=400 * 1024)
    registry.inject("blobs", Fault("slow", rate=1 * MIB, times=7))
    store = small_disk / "models"
    process = start_cli(
        models, "--insecure", "-j", "2", "--models-dir", str(store), reference(registry, model), capture=True
    )
    wait_for(lambda: bool(partial_files(store)), process=process)
    # Something else on the machine takes the space the pull was counting on.
    filler = small_disk / "filler"
    with open(filler, "wb") as handle:
        while free_bytes(small_disk) > 64 * 1024:
            try:
                handle.write(b"\0" * min(256 * 1024, free_bytes(small_disk) - 32 * 1024))
                handle.flush()
            except OSError:
                break
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 6, stderr
    assert "disk is full" in stderr
    assert "Traceback" not in stderr
    assert not (store / "manifests").exists()
    assert_nothing_unverified(store, model)

    filler.unlink()
    registry.reset_log()
    run = run_cli(models, "--insecure", "--models-dir", str(store), reference(registry, model))
    assert run.returncode == 0, run.stderr
    assert_store_holds(store, registry, model)


def test_a_read_only_store_is_exit_6(registry: FaultRegistry, models: Path, tmp_path: Path) -> None:
    model = registry.add_synthetic_model("library/demo", blobs=1, blob_size=1024)
    mount = tmp_path / "readonly"
    mount_tmpfs(mount, "ro,size=1m")
    try:
        run = run_cli(models, "--insecure", "--models-dir", str(mount / "models"), reference(registry, model))
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
    assert run.returncode == 6
    assert "read-only" in run.stderr
    assert "Traceback" not in run.stderr
