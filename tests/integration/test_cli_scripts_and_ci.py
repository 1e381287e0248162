"""What scripts and CI caching steps rely on: quiet mode, several models, model lists, dry runs, verify, space."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ollama_pull.cli import app
from tests.fault_registry import Fault, FaultRegistry

from .conftest import assert_store_holds, reference, run_cli

pytestmark = pytest.mark.integration

TENSOR = "application/vnd.ollama.image.tensor"


def test_quiet_prints_nothing_on_success_and_only_the_error_on_failure(registry: FaultRegistry, models: Path) -> None:
    model = registry.add_synthetic_model("library/demo", blobs=3, blob_size=4096)
    registry.inject(model.layer_digests[0], Fault("reset", at=0.5))
    ok = run_cli(models, "-q", "--insecure", "--stall-timeout", "0.5", reference(registry, model))
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "", "")
    failed = run_cli(models, "-q", "--insecure", f"{registry.host}/library/missing")
    assert failed.returncode == 3
    assert failed.stdout == ""
    assert len(failed.stderr.strip().splitlines()) == 1


def test_several_models_share_one_download_of_a_common_blob(registry: FaultRegistry, models: Path) -> None:
    shared = b"shared tokenizer" * 1000
    first = registry.add_model("library/one", layers=[(TENSOR, shared, "tok"), (TENSOR, b"one" * 500, "w")])
    second = registry.add_model("library/two", layers=[(TENSOR, shared, "tok"), (TENSOR, b"two" * 500, "w")])
    run = run_cli(models, "--insecure", reference(registry, first), reference(registry, second))
    assert run.returncode == 0, run.stderr
    assert_store_holds(models, registry, first, second)
    shared_digest = first.layer_digests[0]
    assert len(registry.blob_requests(shared_digest)) == 1
    # The two models' configs are the same default bytes too: fetched once as well.
    assert len(registry.blob_requests(first.config_digest)) == 1


def test_one_failing_model_does_not_stop_the_others(registry: FaultRegistry, models: Path) -> None:
    good = registry.add_synthetic_model("library/good", blobs=2, blob_size=2048)
    run = run_cli(models, "--insecure", "--json", f"{registry.host}/library/absent", reference(registry, good))
    assert run.returncode == 3
    assert_store_holds(models, registry, good)
    kinds = [(event["event"], event["model"]) for event in run.events if event["event"] in ("error", "done")]
    assert kinds == [
        ("error", f"{registry.host}/library/absent:latest"),
        ("done", f"{registry.host}/library/good:latest"),
    ]


def test_models_from_a_file_with_comments(registry: FaultRegistry, models: Path, tmp_path: Path) -> None:
    one = registry.add_synthetic_model("library/one", blobs=2, blob_size=2048, seed=1)
    two = registry.add_synthetic_model("team/two", tag="v2", blobs=2, blob_size=2048, seed=2)
    listing = tmp_path / "models.txt"
    listing.write_text(
        f"# models this CI job needs\n{reference(registry, one)}\n\n  {reference(registry, two)}  # pinned\n"
        f"{reference(registry, one)}\n"
    )
    run = run_cli(models, "--insecure", "--json", "-f", str(listing))
    assert run.returncode == 0, run.stderr
    assert_store_holds(models, registry, one, two)
    # A reference listed twice is pulled once.
    assert [event["model"] for event in run.events if event["event"] == "done"] == [
        f"{registry.host}/library/one:latest",
        f"{registry.host}/team/two:v2",
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [("library/ok\nbad model\n", "invalid model reference 'bad model'"), ("# nothing\n\n", "no model given")],
)
def test_a_bad_model_list_is_a_usage_error_before_any_download(
    registry: FaultRegistry, models: Path, tmp_path: Path, content: str, message: str
) -> None:
    listing = tmp_path / "models.txt"
    listing.write_text(content)
    run = run_cli(models, "--insecure", "-f", str(listing))
    assert run.returncode == 2
    assert message in run.stderr
    assert registry.requests == []


def test_dry_run_prints_the_plan_and_writes_nothing(registry: FaultRegistry, models: Path) -> None:
    model = registry.add_synthetic_model("library/demo", blobs=4, blob_size=4096)
    run = run_cli(models, "--insecure", "--dry-run", reference(registry, model))
    assert run.returncode == 0, run.stderr
    total = sum(len(data) for data in model.blobs.values())
    assert run.stdout.strip() == (
        f"{registry.host}/library/demo:latest: 5 blobs, {total / 1024:.1f} KiB; 0 already present, 5 to download "
        f"({total / 1024:.1f} KiB); manifest {model.manifest_digest}"
    )
    assert not models.exists()
    assert [r for r in registry.requests if "/blobs/" in r.path] == []


def test_dry_run_json_gives_a_cache_key_and_counts_what_is_present(registry: FaultRegistry, models: Path) -> None:
    model = registry.add_synthetic_model("library/demo", blobs=4, blob_size=4096)
    assert run_cli(models, "--insecure", "-q", reference(registry, model)).returncode == 0
    run = run_cli(models, "--insecure", "--dry-run", "--json", reference(registry, model))
    assert run.returncode == 0, run.stderr
    [event] = run.events
    assert event["event"] == "manifest"
    assert event["digest"] == model.manifest_digest
    assert event["present_blobs"] == event["blobs"] == 5


def test_verify_passes_then_names_a_corrupt_blob_which_a_pull_repairs(registry: FaultRegistry, models: Path) -> None:
    model = registry.add_synthetic_model("library/demo", blobs=4, blob_size=4096)
    ref = reference(registry, model)
    assert run_cli(models, "--insecure", "-q", ref).returncode == 0
    registry.reset_log()

    good = run_cli(models, "--verify", "--json", ref)
    assert good.returncode == 0, good.stderr
    assert good.events[0]["event"] == "verified"
    assert good.events[0]["digest"] == model.manifest_digest
    assert registry.requests == []  # verify needs no network

    bad = model.layer_digests[2]
    path = models / "blobs" / bad.replace(":", "-")
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))
    corrupt = run_cli(models, "--verify", ref)
    assert corrupt.returncode == 5
    assert f"blob {bad}: bytes do not match the digest" in corrupt.stderr
    assert not path.exists()

    assert run_cli(models, "--insecure", "-q", ref).returncode == 0
    assert len(registry.blob_requests(bad)) == 1
    assert run_cli(models, "--verify", ref).returncode == 0
    assert_store_holds(models, registry, model)


def test_verify_of_a_model_not_in_the_store_is_exit_3(models: Path) -> None:
    run = run_cli(models, "--verify", "127.0.0.1:1/library/nothing")
    assert run.returncode == 3
    assert "is not in the store" in run.stderr


def test_an_unwritable_store_is_exit_6(registry: FaultRegistry, models: Path, tmp_path: Path) -> None:
    model = registry.add_synthetic_model("library/demo", blobs=1, blob_size=1024)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    run = run_cli(models, "--insecure", "--models-dir", str(blocker / "models"), reference(registry, model))
    assert run.returncode == 6
    assert "cannot create the models directory" in run.stderr
    assert "Traceback" not in run.stderr


def test_not_enough_free_space_stops_before_downloading(
    registry: FaultRegistry, models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = registry.add_synthetic_model("library/demo", blobs=3, blob_size=300 * 1024)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage(10**9, 10**9 - 500 * 1024, 500 * 1024))
    result = CliRunner().invoke(app, ["--insecure", reference(registry, model)])
    assert result.exit_code == 6
    assert "not enough free space" in result.output
    assert "needed, 500.0 KiB free" in result.output
    assert [r for r in registry.requests if "/blobs/" in r.path] == []
    assert not (models / "manifests").exists()
