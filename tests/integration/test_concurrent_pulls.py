"""Two processes pulling into one store at once: both succeed, and each blob crosses the network once."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fault_registry import Fault, FaultRegistry

from .conftest import assert_store_holds, reference, start_cli

pytestmark = pytest.mark.integration


def test_two_processes_pull_the_same_model_into_one_store(registry: FaultRegistry, models: Path) -> None:
    model = registry.add_synthetic_model("library/demo", blobs=12, blob_size=128 * 1024)
    # Slow enough that the two pulls overlap for most of their blobs.
    registry.inject("blobs", Fault("slow", rate=512 * 1024, times=13))
    processes = [
        start_cli(models, "--insecure", "-j", "4", "--json", reference(registry, model), capture=True) for _ in range(2)
    ]
    outcomes = [process.communicate(timeout=60) for process in processes]
    for process, (_, stderr) in zip(processes, outcomes, strict=True):
        assert process.returncode == 0, stderr
    assert_store_holds(models, registry, model)
    for digest in model.blobs:
        assert len(registry.blob_requests(digest)) == 1, digest
    # Lock files live outside blobs/ (checked by assert_store_holds) and partial files are all gone.
    assert (models / ".ollama-pull" / "locks").is_dir()
