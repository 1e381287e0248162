"""The README's worked example for air-gapped machines, command by command, as a user runs it: export from a
store, import into another, push to the CNCF distribution registry, pull from there; --json, --dry-run and exit
codes as for a pull."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import run_cli
from .distribution import DistributionRegistry
from .test_air_gap import ORIGINAL, assert_pulled_byte_for_byte, original_store
from .test_commands import tree_digest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("docker-registry") is None, reason=".ci/run installs docker-registry"),
]


@pytest.fixture
def registry() -> Iterator[DistributionRegistry]:
    with DistributionRegistry() as server:
        yield server


def test_export_import_push_and_pull_on_the_command_line(tmp_path: Path, registry: DistributionRegistry) -> None:
    connected, behind, runner = tmp_path / "connected", tmp_path / "behind", tmp_path / "runner"
    manifest, blobs = original_store(connected)
    bundle = tmp_path / "models.tar"
    name = ORIGINAL.short

    dry = run_cli(connected, "export", name, "-o", str(bundle), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith(f"would export 1 model to {bundle} (tar): {len(blobs)} blobs")
    assert not bundle.exists()
    exported = run_cli(connected, "--json", "export", name, "-o", str(bundle))
    assert exported.returncode == 0, exported.stderr
    kinds = [event["event"] for event in exported.events]
    assert kinds[0] == "export_plan"
    assert kinds[-1] == "export_done"
    assert kinds.count("blob_done") == len(blobs)

    behind.mkdir()
    before = tree_digest(behind)
    listed = run_cli(behind, "import", "--dry-run", str(bundle))
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.startswith(f"would import {name}: {len(blobs)} blobs")
    assert tree_digest(behind) == before
    imported = run_cli(behind, "import", str(bundle))
    assert imported.returncode == 0, imported.stderr
    assert imported.stderr.splitlines()[-1].startswith(f"imported {name}: ")
    assert_pulled_byte_for_byte(behind, str(ORIGINAL), manifest, blobs)

    destination = f"{registry.host}/library/synthetic:v1"
    pushed = run_cli(behind, "--json", "push", "--insecure", name, destination)
    assert pushed.returncode == 0, pushed.stderr
    done = pushed.events[-1]
    assert done["event"] == "push_done"
    assert (done["uploaded_blobs"], done["present_blobs"]) == (len(blobs), 0)
    again = run_cli(behind, "push", "--insecure", name, destination)
    assert again.returncode == 0, again.stderr
    assert f"0 blobs uploaded, {len(blobs)} already there" in again.stderr.splitlines()[-1]

    pulled = run_cli(runner, "--insecure", destination)
    assert pulled.returncode == 0, pulled.stderr
    assert_pulled_byte_for_byte(runner, destination, manifest, blobs)


def test_a_tampered_bundle_is_exit_5_and_installs_nothing(tmp_path: Path) -> None:
    connected, behind = tmp_path / "connected", tmp_path / "behind"
    _, blobs = original_store(connected)
    bundle = tmp_path / "layout"
    assert run_cli(connected, "-q", "export", ORIGINAL.short, "-o", str(bundle)).returncode == 0
    victim = bundle / "blobs" / "sha256" / max(blobs, key=lambda d: len(blobs[d])).split(":", 1)[1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    run = run_cli(behind, "--json", "import", str(bundle))
    assert run.returncode == 5
    assert run.events[-1]["event"] == "error"
    assert run.events[-1]["exit_code"] == 5
    assert not (behind / "manifests").exists()
    assert (
        not any(path.name.startswith("sha256-") for path in (behind / "blobs").glob("*"))
        if (behind / "blobs").exists()
        else True
    )


def test_export_of_a_model_not_in_the_store_is_exit_3_and_writes_nothing(tmp_path: Path) -> None:
    run = run_cli(tmp_path / "models", "export", "qwen3:8b", "-o", str(tmp_path / "models.tar"))
    assert run.returncode == 3
    assert run.stderr.count("\n") == 1
    assert not (tmp_path / "models.tar").exists()
