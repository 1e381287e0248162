"""--max-rate: one limit across every stream, measured on a real pull."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fault_registry import FaultRegistry

from .conftest import assert_store_holds, reference, run_cli

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


def test_max_rate_holds_across_all_streams_within_15_percent(registry: FaultRegistry, models: Path) -> None:
    model = registry.add_synthetic_model("library/demo", blobs=16, blob_size=256 * 1024)
    run = run_cli(models, "--insecure", "--json", "-j", "16", "--max-rate", "2M", reference(registry, model))
    assert run.returncode == 0, run.stderr
    assert_store_holds(models, registry, model)
    done = run.events[-1]
    measured = done["downloaded_bytes"] / done["seconds"]
    assert measured == pytest.approx(2 * MIB, rel=0.15)
