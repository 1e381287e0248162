"""Fault campaigns: many seeded kill -9s in a row, and a soak of a thousand blobs under random faults.

Each campaign prints its figures (past pytest's capture), so a plain ``pytest -q`` run shows what was survived.
The seeds are fixed: a failure replays with the same kill moments, blob sizes and fault draws.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from ollama_pull.drain import DRAIN_MIN
from tests.fault_registry import Fault, FaultRegistry, ModelFixture

from .conftest import assert_store_holds, cli_command, cli_env, reference, run_cli

pytestmark = pytest.mark.integration

KIB = 1024
SEED = 20261125
TENSOR = "application/vnd.ollama.image.tensor"
BLOB_NAME = re.compile(r"sha256-[0-9a-f]{64}")


def report(config: pytest.Config, line: str) -> None:
    """Print past pytest's output capture (as ``capsys.disabled()`` does), so a plain ``pytest -q`` shows it."""
    capture = config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        print(f"\n{line}", flush=True)


def scan_blobs(models: Path) -> tuple[int, list[str]]:
    """Hash every file in blobs/ named like a blob: how many there are, and the names whose bytes are wrong."""
    blobs = models / "blobs"
    if not blobs.exists():
        return 0, []
    named = [path for path in blobs.iterdir() if BLOB_NAME.fullmatch(path.name)]
    wrong = [p.name for p in named if hashlib.sha256(p.read_bytes()).hexdigest() != p.name.removeprefix("sha256-")]
    return len(named), wrong


def random_model(registry: FaultRegistry, name: str, *, blobs: int, low: int, high: int) -> ModelFixture:
    rng = random.Random(SEED)
    layers: list[tuple[str, bytes, str | None]] = [
        (TENSOR, rng.randbytes(rng.randint(low, high)), f"weights/part-{index:04d}.safetensors")
        for index in range(blobs)
    ]
    return registry.add_model(name, layers=layers)


# --- kill -9, again and again ------------------------------------------------------------------------------------

KILLS = 20
# Bytes per second, one drawn for each blob request: a blob of 64-256 KiB takes about a second, anywhere from
# 0.25 s to 4 s, so each round commits a few blobs and kills land before, during and just after commits. Faster
# paces would commit nearly everything in the first rounds and leave the later kills little to interrupt.
PACES = (64 * KIB, 128 * KIB, 256 * KIB)
# Two blobs always take this long, longer than the latest kill: no round can finish the model (and write the
# manifest) before its kill, however the other blobs fare, so every round is a kill.
ANCHOR_SECONDS = 1.5
LATEST_KILL = 0.9


def test_twenty_kill_9s_in_a_row_never_leave_a_wrong_blob(
    registry: FaultRegistry, models: Path, request: pytest.FixtureRequest
) -> None:
    model = random_model(registry, "library/many", blobs=40, low=64 * KIB, high=256 * KIB)
    registry.inject_random(rate=1.0, kinds=[Fault("slow", rate=pace) for pace in PACES], seed=SEED)
    anchors = model.layer_digests[:2]
    for digest in anchors:
        pace = int(len(model.blobs[digest]) / ANCHOR_SECONDS)
        # Far more than the campaign's requests for one blob; cleared before the final run.
        registry.inject(digest, Fault("slow", rate=pace, times=1000))
    moments = random.Random(SEED)
    kills = verified = 0
    corruptions: list[str] = []
    in_place: list[int] = []
    started = time.monotonic()
    for round_number in range(1, KILLS + 1):
        delay = moments.uniform(0.05, LATEST_KILL)
        registry.reset_log()
        # Each round starts from whatever the previous kill left: finished blobs, partial files, lock files.
        # Quiet, because nobody reads the stderr pipe until the kill and a full pipe would block the pull.
        process = subprocess.Popen(
            cli_command("-q", "--insecure", reference(registry, model)),
            env=cli_env(models),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            # The clock starts when the manifest request arrives, not at the fork: interpreter start-up varies
            # too much on a busy machine, and a kill during imports tests nothing.
            deadline = time.monotonic() + 20
            while not any("/manifests/" in r.path for r in registry.requests) and process.poll() is None:
                assert time.monotonic() < deadline, "the CLI never asked for the manifest"
                time.sleep(0.002)
            time.sleep(delay)
        finally:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
                kills += 1
            _, stderr = process.communicate(timeout=10)
        assert process.returncode == -signal.SIGKILL, f"round {round_number} ended by itself: {stderr}"
        assert not (models / "manifests").exists()
        count, wrong = scan_blobs(models)
        verified += count
        corruptions += wrong
        in_place.append(count)
    campaign = time.monotonic() - started

    registry.clear_faults()
    run = run_cli(models, "--insecure", reference(registry, model))
    assert run.returncode == 0, run.stderr
    assert_store_holds(models, registry, model)
    report(
        request.config,
        f"kill -9 campaign: {kills + 1} pulls, {kills} kills in {campaign:.1f}s, {verified} blobs verified after "
        f"kills, {len(corruptions)} corruptions found; blobs in place after each kill: {in_place}; "
        f"the re-run completed all {len(model.blobs)}",
    )
    assert corruptions == []
    # The campaign exercised something: blobs were committed between kills, and never all of them.
    assert 0 < in_place[-1] < len(model.blobs)


# --- soak -------------------------------------------------------------------------------------------------------

SOAK_KINDS: list[str | Fault] = [
    "stall_before",
    "stall_during",
    "reset",
    "truncate",
    "corrupt",
    Fault("status", status=503),
]
SOAK_LABELS = {kind: kind for kind in SOAK_KINDS if isinstance(kind, str)} | {"status": "status 503"}


def test_a_thousand_blobs_survive_random_faults(
    registry: FaultRegistry, models: Path, request: pytest.FixtureRequest
) -> None:
    model = random_model(registry, "library/soak", blobs=1000, low=1 * KIB, high=8 * KIB)
    # Stalls outlast the client's detection (0.3 s, checked once a second), so the client, not the server, ends
    # them: that is the path under test.
    registry.inject_random(rate=0.03, kinds=SOAK_KINDS, seed=SEED, stall_seconds=3.0)
    started = time.monotonic()
    run = run_cli(models, "--insecure", "--stall-timeout", "0.3", "--json", reference(registry, model), timeout=120)
    elapsed = time.monotonic() - started
    assert run.returncode == 0, run.stderr
    assert_store_holds(models, registry, model)

    applied = registry.faults_applied
    survived = sum(applied.values())
    retries = Counter(event["digest"] for event in run.events if event["event"] == "retry")
    gets = [r for r in registry.requests if r.method == "GET" and "/blobs/" in r.path]
    faulted = Counter(r.path.rsplit("/", 1)[-1] for r in gets if r.fault is not None)
    # Every faulted request cost its blob an attempt (the client may retry more, e.g. on a stall of its own).
    assert all(retries[digest] >= count for digest, count in faulted.items())
    # A blob's last request is the one that delivered it: no fault was left unanswered by a retry.
    last: dict[str, str | None] = {r.path.rsplit("/", 1)[-1]: r.fault for r in gets}
    assert len(last) == len(model.blobs)
    assert all(fault is None for fault in last.values())
    assert survived >= 15
    shown = ", ".join(f"{label} {applied.get(kind, 0)}" for kind, label in SOAK_LABELS.items())
    report(
        request.config,
        f"soak: {len(model.blobs)} blobs, {len(gets)} blob requests in {elapsed:.1f}s, "
        f"{survived} faults survived ({shown}), {sum(retries.values())} retries",
    )


def test_drained_bodies_survive_random_faults(registry: FaultRegistry, models: Path) -> None:
    # Bodies long enough for the shared receiving thread (ollama_pull.drain), many at once, a quarter of their
    # requests faulted: stalls the client ends, resets, cuts, wrong bytes, 503s.
    model = random_model(registry, "library/drained", blobs=60, low=DRAIN_MIN, high=3 * DRAIN_MIN)
    registry.inject_random(rate=0.25, kinds=SOAK_KINDS, seed=SEED, stall_seconds=3.0)
    run = run_cli(models, "--insecure", "--stall-timeout", "0.3", "--json", reference(registry, model), timeout=120)
    assert run.returncode == 0, run.stderr
    assert_store_holds(models, registry, model)
    applied = registry.faults_applied
    assert sum(applied.values()) >= 8
    assert {"stall_during", "truncate", "corrupt"} <= set(applied)
