"""The real CLI, in a subprocess, against the fault-injecting registry on 127.0.0.1; the store checked byte for byte."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.fault_registry import Fault, FaultRegistry, ModelFixture

from .conftest import (
    assert_nothing_unverified,
    assert_store_holds,
    bytes_landed,
    interrupted_large_pull,
    interrupted_once_bytes_land,
    partial_files,
    reference,
    run_cli,
    start_cli,
    wait_for,
)
from .test_hostile_servers import report

pytestmark = pytest.mark.integration

FAST = ("--insecure", "--stall-timeout", "0.5")


def tensor_model(
    registry: FaultRegistry, *, blobs: int = 6, size: int = 64 * 1024, name: str = "library/demo"
) -> ModelFixture:
    return registry.add_synthetic_model(name, blobs=blobs, blob_size=size)


def test_end_to_end_pull_in_plain_mode(registry: FaultRegistry, models: Path) -> None:
    model = tensor_model(registry)
    run = run_cli(models, *FAST, reference(registry, model))
    assert run.returncode == 0, run.stderr
    assert_store_holds(models, registry, model)
    assert "\x1b" not in run.stderr
    assert run.stderr.splitlines()[0].startswith(f"pulling {registry.host}/library/demo:latest: 7 blobs")
    assert run.stderr.splitlines()[-1].startswith(f"pulled {registry.host}/library/demo:latest")
    manifest_requests = [r for r in registry.requests if "/manifests/" in r.path]
    assert manifest_requests[0].headers["accept"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert manifest_requests[0].headers["user-agent"].startswith("ollama-pull/")
    blob_requests = [r for r in registry.requests if "/blobs/" in r.path]
    assert len(blob_requests) == 7
    assert all(r.headers.get("accept-encoding") == "identity" for r in blob_requests)


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        # Each row: a fault on one blob's first request, and what the retry event must say about it.
        (Fault("stall_before"), "stalled"),
        (Fault("stall_during", at=0.5), "stalled"),
        (Fault("truncate", at=0.3), "connection closed early"),
        (Fault("reset", at=0.3), "connection"),
        (Fault("corrupt", at=0.7), "digest mismatch"),
        (Fault("status", status=503, retry_after="1"), "HTTP 503"),
        (Fault("status", status=429, retry_after="0"), "HTTP 429"),
        (Fault("gzip"), "Content-Encoding: gzip"),
    ],
)
def test_each_fault_is_survived_and_reported(registry: FaultRegistry, models: Path, fault: Fault, reason: str) -> None:
    model = tensor_model(registry)
    target = model.layer_digests[2]
    registry.inject(target, fault)
    run = run_cli(models, *FAST, "--json", reference(registry, model))
    assert run.returncode == 0, run.stderr
    assert_store_holds(models, registry, model)
    [retry] = [event for event in run.events if event["event"] == "retry"]
    assert retry["digest"] == target
    assert reason in retry["reason"]
    assert len(registry.blob_requests(target)) == 2


def test_slow_trickle_still_completes(registry: FaultRegistry, models: Path) -> None:
    model = tensor_model(registry, blobs=2)
    registry.inject(model.layer_digests[0], Fault("slow", rate=256 * 1024))
    run = run_cli(models, "--insecure", reference(registry, model))
    assert run.returncode == 0, run.stderr
    assert_store_holds(models, registry, model)


def test_json_events_of_a_pull_with_a_retry(registry: FaultRegistry, models: Path) -> None:
    model = tensor_model(registry, blobs=3)
    registry.inject(model.layer_digests[1], Fault("reset", at=0.5))
    run = run_cli(models, *FAST, "--json", reference(registry, model))
    assert run.returncode == 0, run.stderr
    events = run.events
    kinds = [event["event"] for event in events]
    assert kinds[0] == "manifest"
    assert kinds[-1] == "done"
    assert kinds.count("blob_start") == 4
    assert kinds.count("blob_done") == 4
    assert kinds.count("retry") == 1
    manifest, done = events[0], events[-1]
    assert manifest["digest"] == model.manifest_digest
    assert manifest["blobs"] == 4
    assert manifest["total_bytes"] == sum(len(data) for data in model.blobs.values())
    assert done["downloaded_blobs"] == 4
    assert done["present_blobs"] == 0
    assert done["manifest_path"].endswith(f"manifests/{registry.host}/library/demo/latest")
    retry = events[kinds.index("retry")]
    assert set(retry) == {"event", "model", "digest", "attempt", "reason", "delay"}
    # The retried blob finishes after its retry.
    finished = [event["digest"] for event in events if event["event"] == "blob_done"]
    assert model.layer_digests[1] in finished
    assert kinds.index("retry") < len(kinds) - 1 - finished[::-1].index(model.layer_digests[1])


def test_a_rerun_skips_what_is_present(registry: FaultRegistry, models: Path) -> None:
    model = tensor_model(registry)
    assert run_cli(models, "--insecure", reference(registry, model)).returncode == 0
    registry.reset_log()
    run = run_cli(models, "--insecure", "--json", reference(registry, model))
    assert run.returncode == 0, run.stderr
    assert [r for r in registry.requests if "/blobs/" in r.path] == []
    assert run.events[0]["present_blobs"] == 7
    assert run.events[-1]["downloaded_blobs"] == 0
    assert_store_holds(models, registry, model)
    plain = run_cli(models, "--insecure", reference(registry, model))
    assert plain.stderr.splitlines()[-1] == f"{reference(registry, model)} is already up to date: 380.0 KiB, 7 blobs"


def test_token_auth_with_expiring_tokens_never_shows_a_token(models: Path) -> None:
    # A token lasts five requests, more than the four downloads at once, so a fresh token cannot be used up
    # by its siblings before the request that asked for it is retried (real registries expire by time).
    with FaultRegistry(require_auth=True, token_uses=5) as registry:
        model = tensor_model(registry, blobs=8)
        run = run_cli(models, *FAST, "--json", "-j", "4", reference(registry, model))
        assert run.returncode == 0, run.stderr
        assert_store_holds(models, registry, model)
        tokens = registry.tokens_issued
        refused = [r for r in registry.requests if r.status == 401 and "authorization" in r.headers]
        # Ten requests at five uses a token: the first token plus refreshes, each merged across the downloads
        # that met the same expiry.
        assert 2 <= len(tokens) <= 3
        assert len(refused) >= len(tokens) - 1
        for token in tokens:
            assert token not in run.stdout
            assert token not in run.stderr


def test_blobs_redirected_to_a_cdn_get_no_registry_token(models: Path) -> None:
    with FaultRegistry(require_auth=True, redirect_blobs=True) as registry:
        model = tensor_model(registry)
        run = run_cli(models, *FAST, reference(registry, model))
        assert run.returncode == 0, run.stderr
        assert_store_holds(models, registry, model)
        assert len(registry.cdn_requests) == 7
        assert all("authorization" not in r.headers for r in registry.cdn_requests)
        assert any("authorization" in r.headers for r in registry.requests if "/blobs/" in r.path)


def test_model_not_found_is_exit_3(registry: FaultRegistry, models: Path) -> None:
    run = run_cli(models, "--insecure", f"{registry.host}/library/missing:v1")
    assert run.returncode == 3
    assert run.stderr.strip().splitlines() == [
        f"error: model '{registry.host}/library/missing:v1' not found: check the name and tag, or the registry host"
    ]
    assert not (models / "manifests").exists()


def test_a_refused_token_is_exit_4(models: Path) -> None:
    with FaultRegistry(require_auth=True) as registry:
        model = tensor_model(registry)
        registry.inject("token", Fault("status", status=403))
        run = run_cli(models, "--insecure", reference(registry, model))
    assert run.returncode == 4
    assert "refused access" in run.stderr
    assert "Traceback" not in run.stderr


def test_a_blob_that_is_always_corrupt_is_exit_5_and_named(registry: FaultRegistry, models: Path) -> None:
    model = tensor_model(registry)
    bad = model.layer_digests[3]
    registry.inject(bad, Fault("corrupt", times=10))
    run = run_cli(models, *FAST, "--retries", "3", reference(registry, model))
    assert run.returncode == 5
    assert bad in run.stderr
    assert "digest mismatch" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (models / "manifests").exists()
    assert not (models / "blobs" / bad.replace(":", "-")).exists()
    assert_nothing_unverified(models, model)
    assert len(registry.blob_requests(bad)) == 3


def test_a_blob_that_always_fails_is_exit_1(registry: FaultRegistry, models: Path) -> None:
    model = tensor_model(registry)
    bad = model.layer_digests[0]
    registry.inject(bad, Fault("status", status=500, times=10))
    run = run_cli(models, *FAST, "--retries", "2", reference(registry, model))
    assert run.returncode == 1
    assert f"blob {bad} failed after 2 attempts: HTTP 500" in run.stderr
    assert not (models / "manifests").exists()
    assert_nothing_unverified(models, model)


@pytest.mark.parametrize(
    "digest",
    ["sha256:../../../../etc/passwd", "sha256:" + "0" * 63 + "/", "../sha256:" + "0" * 64, "md5:" + "0" * 32],
)
def test_a_manifest_digest_cannot_escape_the_store(registry: FaultRegistry, models: Path, digest: str) -> None:
    body = (
        '{"schemaVersion":2,"config":{"mediaType":"application/vnd.docker.container.image.v1+json",'
        f'"digest":"{digest}","size":3}},"layers":[]}}'
    ).encode()
    registry.set_manifest("library/evil", "latest", body)
    run = run_cli(models, "--insecure", f"{registry.host}/library/evil")
    assert run.returncode == 1
    assert "invalid manifest" in run.stderr
    assert not models.exists() or not any(models.rglob("*"))
    assert not (models.parent / "etc").exists()


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_stops_at_once_and_the_rerun_completes(
    registry: FaultRegistry, models: Path, signum: signal.Signals, code: int
) -> None:
    model = tensor_model(registry, blobs=4, size=512 * 1024)
    registry.inject("blobs", Fault("slow", rate=64 * 1024, times=4))
    returncode, stderr, stopped = interrupted_once_bytes_land(models, signum, "--insecure", reference(registry, model))
    assert returncode == code
    assert stopped < 1.0
    assert "Traceback" not in stderr
    assert "interrupted" in stderr
    assert not (models / "manifests").exists()
    assert_nothing_unverified(models, model)
    run = run_cli(models, "--insecure", reference(registry, model))
    assert run.returncode == 0, run.stderr
    assert_store_holds(models, registry, model)


def test_kill_9_then_a_rerun_completes(registry: FaultRegistry, models: Path) -> None:
    model = tensor_model(registry, blobs=6, size=256 * 1024)
    registry.inject("blobs", Fault("slow", rate=128 * 1024, times=6))
    process = start_cli(models, "--insecure", reference(registry, model))
    try:
        wait_for(lambda: bytes_landed(models), process=process)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert partial_files(models)
    assert_nothing_unverified(models, model)
    run = run_cli(models, "--insecure", reference(registry, model))
    assert run.returncode == 0, run.stderr
    # blobs/ ends with finished blobs only: the re-run continued from or removed every partial file.
    assert_store_holds(models, registry, model)


def test_a_large_blob_resumes_across_runs(registry: FaultRegistry, models: Path) -> None:
    model, big, kept = interrupted_large_pull(registry, models)
    registry.reset_log()
    run = run_cli(models, "--insecure", reference(registry, model))
    assert run.returncode == 0, run.stderr
    assert_store_holds(models, registry, model)
    [resumed] = registry.blob_requests(big)
    assert resumed.range == f"bytes={kept}-"
    assert resumed.bytes_sent == len(model.blobs[big]) - kept


@pytest.mark.parametrize("kind", ["truncate", "stall_during"])
def test_an_attempt_cut_short_continues_where_it_stopped(
    request: pytest.FixtureRequest, registry: FaultRegistry, models: Path, kind: str
) -> None:
    # 3 MiB, far below the 64 MiB that partial files need to be kept across runs: within a run every blob resumes.
    size = 3 * 1024 * 1024
    model = registry.add_model("library/demo", layers=[("application/vnd.ollama.image.tensor", os.urandom(size), None)])
    blob = model.layer_digests[0]
    registry.inject(blob, Fault(kind, at=0.5))
    run = run_cli(models, *FAST, "--json", reference(registry, model))
    assert run.returncode == 0, run.stderr
    assert_store_holds(models, registry, model)
    first, second = registry.blob_requests(blob)
    assert (first.range, first.fault, first.bytes_sent) == (None, kind, size // 2)
    # One ranged request for exactly the bytes the first one did not deliver: nothing crossed the network twice.
    assert (second.range, second.status, second.bytes_sent) == (f"bytes={size // 2}-", 206, size - size // 2)
    refetched = first.bytes_sent + second.bytes_sent - size
    assert refetched == 0
    [retry] = [event for event in run.events if event["event"] == "retry"]
    report(
        request.config, f"{kind} once on a 3 MiB blob: 2 requests, {refetched} bytes fetched twice ({retry['reason']})"
    )


def test_two_models_in_one_call(registry: FaultRegistry, models: Path) -> None:
    first = tensor_model(registry, name="library/one")
    second = registry.add_synthetic_model("team/two", tag="v2", blobs=3, blob_size=4096, seed=7)
    run = run_cli(models, "--insecure", reference(registry, first), reference(registry, second))
    assert run.returncode == 0, run.stderr
    assert_store_holds(models, registry, first, second)
