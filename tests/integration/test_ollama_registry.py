"""Behaviours of Ollama's own registry: a 412 for models that need a newer client, signed token requests."""

from __future__ import annotations

from pathlib import Path

import pytest

from ollama_pull.fault_registry import Fault, FaultRegistry

from .conftest import reference, run_cli

pytestmark = pytest.mark.integration


def test_a_412_says_plainly_that_the_model_needs_a_newer_client(registry: FaultRegistry, models: Path) -> None:
    model = registry.add_synthetic_model("library/future", blobs=1, blob_size=1024)
    registry.inject("manifest", Fault("status", status=412))
    run = run_cli(models, "--insecure", reference(registry, model))
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [
        f"error: the registry says '{registry.host}/library/future:latest' needs a newer client (HTTP 412): "
        "upgrade ollama-pull or Ollama"
    ]
    assert len([r for r in registry.requests if "/manifests/" in r.path]) == 1
    assert not models.exists()
