"""--mirror: pulls through a CNCF registry in pull-through cache mode, and around a mirror that is down."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.fault_registry import FaultRegistry

from .conftest import assert_store_holds, reference, run_cli
from .distribution import DistributionRegistry, free_port

pytestmark = pytest.mark.integration

needs_registry = pytest.mark.skipif(
    shutil.which("docker-registry") is None, reason="docker-registry is not installed (.ci/run installs it)"
)


@needs_registry
def test_a_pull_through_cache_fills_then_serves_with_the_origin_stopped(models: Path, tmp_path: Path) -> None:
    origin = FaultRegistry().start()
    try:
        model = origin.add_synthetic_model("library/demo", blobs=5, blob_size=64 * 1024)
        ref = reference(origin, model)
        origin_host = origin.host
        with DistributionRegistry(remote_url=origin.url) as mirror:
            first = run_cli(models, "--insecure", "--mirror", mirror.url, ref)
            assert first.returncode == 0, first.stderr
            # The manifest is stored under the origin's name, exactly as a pull without the mirror would.
            assert_store_holds(models, origin, model)
            # Every blob came through the mirror, asked for once. (How often the cache itself fetches from the
            # origin is its own business: distribution 2.8 reads each blob twice while it fills.)
            mirror_blob_gets = [
                r.path.rsplit("/", 1)[-1]
                for r in mirror.requests("ollama-pull", at_least=7)
                if "/blobs/" in r.path and r.method == "GET"
            ]
            assert sorted(mirror_blob_gets) == sorted(model.blobs)
            assert not [r for r in origin.requests if r.headers.get("user-agent", "").startswith("ollama-pull")]

            origin.stop()
            second_store = tmp_path / "second"
            second = run_cli(second_store, "--insecure", "--mirror", mirror.url, ref)
            assert second.returncode == 0, second.stderr
            assert sorted(p.name for p in (second_store / "blobs").iterdir()) == sorted(
                d.replace(":", "-") for d in model.blobs
            )
            namespace, name = model.name.split("/")
            manifest = second_store / "manifests" / origin_host / namespace / name / model.tag
            assert manifest.read_bytes() == model.manifest
    finally:
        origin.stop()


def test_a_mirror_that_is_down_falls_back_to_the_origin(registry: FaultRegistry, models: Path) -> None:
    model = registry.add_synthetic_model("library/demo", blobs=5, blob_size=16 * 1024)
    dead = f"http://127.0.0.1:{free_port()}"
    run = run_cli(models, "--insecure", "--mirror", dead, "--json", reference(registry, model))
    assert run.returncode == 0, run.stderr
    assert_store_holds(models, registry, model)
    # A dead mirror costs no retries: every blob came straight from the origin on the first try.
    assert not [event for event in run.events if event["event"] == "retry"]


def test_a_mirror_without_the_model_falls_back_per_request(
    registry: FaultRegistry, models: Path, tmp_path: Path
) -> None:
    model = registry.add_synthetic_model("library/demo", blobs=3, blob_size=8 * 1024)
    with FaultRegistry() as empty_mirror:
        run = run_cli(models, "--insecure", "--mirror", empty_mirror.url, reference(registry, model))
        assert run.returncode == 0, run.stderr
        assert any("/manifests/" in r.path and r.status == 404 for r in empty_mirror.requests)
    assert_store_holds(models, registry, model)


def test_the_mirror_can_come_from_the_environment(registry: FaultRegistry, models: Path) -> None:
    import subprocess

    from .conftest import cli_command, cli_env

    model = registry.add_synthetic_model("library/demo", blobs=2, blob_size=4096)
    with FaultRegistry() as mirror:
        mirror.add_synthetic_model("library/demo", blobs=2, blob_size=4096)
        env = cli_env(models) | {"OLLAMA_PULL_MIRROR": mirror.url}
        done = subprocess.run(cli_command("--insecure", reference(registry, model)), env=env, capture_output=True)
        assert done.returncode == 0, done.stderr
        # Same seed, same bytes: the mirror answered everything and the origin saw nothing.
        assert mirror.requests
    assert registry.requests == []


def test_a_mirror_that_is_not_a_url_is_a_usage_error(models: Path) -> None:
    assert run_cli(models, "--mirror", "mirror.local:5000", "library/demo").returncode == 2
