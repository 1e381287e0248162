"""--list and --prune on a real store, as Ollama users keep theirs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fault_registry import FaultRegistry

from .conftest import assert_store_holds, reference, run_cli

pytestmark = pytest.mark.integration

TENSOR = "application/vnd.ollama.image.tensor"


def test_prune_after_a_tag_update_keeps_every_blob_another_model_uses(registry: FaultRegistry, models: Path) -> None:
    shared = b"tokenizer shared by both models" * 300
    old_only = b"weights of the old version" * 400
    other = registry.add_model("library/other", layers=[(TENSOR, shared, "tok"), (TENSOR, b"other" * 300, "w")])
    old = registry.add_model("library/demo", layers=[(TENSOR, shared, "tok"), (TENSOR, old_only, "w")])
    assert run_cli(models, "--insecure", "-q", reference(registry, other), reference(registry, old)).returncode == 0

    # The tag moves to a new manifest: new weights, same tokenizer.
    new = registry.add_model("library/demo", layers=[(TENSOR, shared, "tok"), (TENSOR, b"new weights" * 500, "w")])
    run = run_cli(models, "--insecure", "--json", "--prune", reference(registry, new))
    assert run.returncode == 0, run.stderr
    pruned = run.events[-1]
    assert pruned["event"] == "pruned"
    assert pruned["digests"] == [old.layer_digests[1]]
    assert pruned["freed_bytes"] == len(old_only)
    # What is left is exactly the two current models: the shared blob and the shared config stay.
    assert_store_holds(models, registry, other, new)


def test_prune_alone_and_with_nothing_to_do(registry: FaultRegistry, models: Path) -> None:
    model = registry.add_synthetic_model("library/demo", blobs=2, blob_size=2048)
    assert run_cli(models, "--insecure", "-q", reference(registry, model)).returncode == 0
    stray = models / "blobs" / ("sha256-" + "e" * 64)
    stray.write_bytes(b"left over from a deleted model")
    first = run_cli(models, "prune")
    assert first.returncode == 0, first.stderr
    assert first.stdout == "pruned 1 blob no model uses, 30 B freed\n"
    assert not stray.exists()
    # The 0.1 spelling still works for a release, with one line that says what replaces it.
    again = run_cli(models, "--prune")
    assert again.returncode == 0, again.stderr
    assert again.stdout == "pruned 0 blobs no model uses, 0 B freed\n"
    assert again.stderr == (
        "warning: --prune without models is deprecated and goes away in the next release: use ollama-pull prune\n"
    )
    assert_store_holds(models, registry, model)


def test_prune_refuses_when_a_manifest_cannot_be_read(registry: FaultRegistry, models: Path) -> None:
    model = registry.add_synthetic_model("library/demo", blobs=2, blob_size=2048)
    assert run_cli(models, "--insecure", "-q", reference(registry, model)).returncode == 0
    broken = models / "manifests" / "registry.ollama.ai" / "library" / "broken" / "latest"
    broken.parent.mkdir(parents=True)
    broken.write_text("{not json")
    run = run_cli(models, "--prune")
    assert run.returncode == 6
    assert "refusing to prune" in run.stderr
    assert len(list((models / "blobs").iterdir())) == 3
    # Scripts see the refusal as an event too; it concerns no single model.
    [event] = run_cli(models, "--prune", "--json").events
    assert (event["event"], event["model"], event["exit_code"]) == ("error", None, 6)
    assert "refusing to prune" in event["message"]


def test_list_shows_models_sizes_and_missing_blobs(registry: FaultRegistry, models: Path) -> None:
    one = registry.add_synthetic_model("library/one", blobs=2, blob_size=4096, seed=1)
    two = registry.add_synthetic_model("team/two", tag="v2", blobs=3, blob_size=4096, seed=2)
    assert run_cli(models, "--insecure", "-q", reference(registry, one), reference(registry, two)).returncode == 0
    (models / "blobs" / two.layer_digests[0].replace(":", "-")).unlink()

    plain = run_cli(models, "--list")
    assert plain.returncode == 0, plain.stderr
    lines = plain.stdout.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [
        f"{registry.host}/library/one:latest",
        f"{registry.host}/team/two:v2",
    ]
    assert lines[1].endswith("1 blob missing")
    assert "\x1b" not in plain.stdout

    records = [json.loads(line) for line in run_cli(models, "--list", "--json").stdout.splitlines()]
    assert [record["digest"] for record in records] == [one.manifest_digest, two.manifest_digest]
    assert records[0]["total_bytes"] == sum(len(data) for data in one.blobs.values())
    assert [record["missing_blobs"] for record in records] == [0, 1]


def test_list_of_an_empty_store_and_a_misuse(models: Path) -> None:
    empty = run_cli(models, "--list")
    assert (empty.returncode, empty.stdout) == (0, "")
    assert run_cli(models, "--list", "library/demo").returncode == 2
