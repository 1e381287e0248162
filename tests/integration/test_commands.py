"""The commands as a user runs them: rm, verify --all, dry runs that change nothing, pipes, signals, messages."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ollama_pull import pull
from ollama_pull.errors import RegistryError
from tests.fault_registry import TENSOR_MEDIA_TYPE, Fault, FaultRegistry, ModelFixture

from .conftest import (
    assert_nothing_unverified,
    assert_store_holds,
    bytes_landed,
    cli_command,
    cli_env,
    reference,
    run_cli,
    start_cli,
    wait_for,
)
from .test_tls import https_registry  # noqa: F401 - a fixture

pytestmark = pytest.mark.integration


def tree_digest(root: Path) -> str:
    """Every name, kind, mode, size, modification time and byte under ``root``: equal means untouched."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        digest.update(f"{path.relative_to(root)}|{info.st_mode}|{info.st_size}|{info.st_mtime_ns}\n".encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def two_models_sharing_a_blob(registry: FaultRegistry) -> tuple[ModelFixture, ModelFixture, str]:
    shared = os.urandom(3000)
    one = registry.add_model(
        "library/one", layers=[(TENSOR_MEDIA_TYPE, shared, "a.st"), (TENSOR_MEDIA_TYPE, os.urandom(2000), "b.st")]
    )
    two = registry.add_model(
        "library/two", layers=[(TENSOR_MEDIA_TYPE, shared, "a.st"), (TENSOR_MEDIA_TYPE, os.urandom(1000), "c.st")]
    )
    return one, two, one.layer_digests[0]


def blob_file(models: Path, digest: str) -> Path:
    return models / "blobs" / digest.replace(":", "-")


def test_rm_removes_the_manifest_then_only_the_blobs_no_other_model_uses(registry: FaultRegistry, models: Path) -> None:
    one, two, shared = two_models_sharing_a_blob(registry)
    assert run_cli(models, "--insecure", "-q", reference(registry, one), reference(registry, two)).returncode == 0
    run = run_cli(models, "rm", "--json", reference(registry, one))
    assert run.returncode == 0, run.stderr
    [removed] = run.events
    only_one = {one.config_digest, one.layer_digests[1]} - {two.config_digest}
    assert removed["event"] == "removed"
    assert removed["model"] == reference(registry, one)
    assert removed["digest"] == one.manifest_digest
    assert set(removed["digests"]) == only_one
    assert removed["freed_bytes"] == sum(len(one.blobs[d]) for d in only_one)
    assert removed["dry_run"] is False
    # What is left is exactly the other model, the shared blob with it.
    assert_store_holds(models, registry, two)
    assert blob_file(models, shared).exists()


def test_rm_of_a_model_not_in_the_store_removes_nothing(registry: FaultRegistry, models: Path) -> None:
    one, two, _ = two_models_sharing_a_blob(registry)
    assert run_cli(models, "--insecure", "-q", reference(registry, one), reference(registry, two)).returncode == 0
    before = tree_digest(models)
    run = run_cli(models, "rm", reference(registry, one), f"{registry.host}/library/absent")
    assert run.returncode == 3
    assert run.stderr.count("\n") == 1
    assert "absent:latest is not in the store" in run.stderr
    assert tree_digest(models) == before


def test_verify_all_checks_every_model_and_names_a_bad_blob(registry: FaultRegistry, models: Path) -> None:
    one, two, _ = two_models_sharing_a_blob(registry)
    assert run_cli(models, "--insecure", "-q", reference(registry, one), reference(registry, two)).returncode == 0
    good = run_cli(models, "verify", "--all", "--json")
    assert good.returncode == 0, good.stderr
    assert sorted(event["model"] for event in good.events) == sorted(
        [reference(registry, one), reference(registry, two)]
    )
    assert {event["event"] for event in good.events} == {"verified"}
    bad = two.layer_digests[1]
    blob_file(models, bad).write_bytes(b"x" * len(two.blobs[bad]))
    run = run_cli(models, "verify", "--all")
    assert run.returncode == 5
    assert f"verified {reference(registry, one)}" in run.stdout
    assert bad in run.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["pull", "--dry-run", "{two}"],
        ["pull", "--dry-run", "--prune", "{one}"],
        ["prune", "--dry-run"],
        ["rm", "--dry-run", "{one}"],
        ["--json", "rm", "--dry-run", "{one}"],
    ],
)
def test_a_dry_run_leaves_the_store_byte_for_byte_as_it_was(
    registry: FaultRegistry, models: Path, command: list[str]
) -> None:
    one, two, _ = two_models_sharing_a_blob(registry)
    assert run_cli(models, "--insecure", "-q", reference(registry, one)).returncode == 0
    # A store with a bit of everything: a stray blob, a partial download, and a tag that moved on the registry.
    blob_file(models, "sha256:" + "e" * 64).write_bytes(b"left over")
    partial = blob_file(models, two.layer_digests[1])
    partial.with_name(partial.name + "-partial").write_bytes(two.blobs[two.layer_digests[1]][:100])
    registry.add_model("library/one", layers=[(TENSOR_MEDIA_TYPE, os.urandom(500), "new.st")])
    before = tree_digest(models)
    names = {"one": reference(registry, one), "two": reference(registry, two)}
    args = [arg.format(**names) for arg in command]
    if "pull" in args:
        args.insert(args.index("pull") + 1, "--insecure")
    run = run_cli(models, *args)
    assert run.returncode == 0, run.stderr
    assert tree_digest(models) == before
    assert run.stdout.strip(), "a dry run says what it would do"


def test_pull_dry_run_prune_names_what_the_new_manifest_no_longer_uses(registry: FaultRegistry, models: Path) -> None:
    one, _two, _ = two_models_sharing_a_blob(registry)
    assert run_cli(models, "--insecure", "-q", reference(registry, one)).returncode == 0
    moved = registry.add_model("library/one", layers=[(TENSOR_MEDIA_TYPE, one.blobs[one.layer_digests[0]], "a.st")])
    run = run_cli(models, "--insecure", "--json", "pull", "--dry-run", "--prune", reference(registry, moved))
    assert run.returncode == 0, run.stderr
    manifest, pruned = run.events
    assert manifest["event"] == "manifest"
    assert manifest["digest"] == moved.manifest_digest
    assert pruned["event"] == "pruned"
    assert pruned["dry_run"] is True
    assert set(pruned["digests"]) == {one.layer_digests[1]}


def test_a_dry_run_in_a_fresh_store_creates_nothing(registry: FaultRegistry, models: Path) -> None:
    one, _, _ = two_models_sharing_a_blob(registry)
    for command in (["pull", "--insecure", "--dry-run", "--prune", reference(registry, one)], ["prune", "--dry-run"]):
        run = run_cli(models, *command)
        assert run.returncode == 0, run.stderr
    assert not models.exists()


def test_json_to_a_reader_that_goes_away_still_pulls_into_the_store(registry: FaultRegistry, models: Path) -> None:
    model = registry.add_synthetic_model("library/demo", blobs=12, blob_size=64 * 1024)
    registry.inject("blobs", Fault("slow", rate=256 * 1024, times=12))
    process = subprocess.Popen(
        cli_command("--insecure", "--json", "-j", "4", reference(registry, model)),
        env=cli_env(models),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    first = process.stdout.readline()  # `| head -1`
    assert '"event":"manifest"' in first
    process.stdout.close()
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "Broken pipe" not in stderr
    assert_store_holds(models, registry, model)


def test_plain_lines_on_a_closed_stderr_still_pull_into_the_store(registry: FaultRegistry, models: Path) -> None:
    model = registry.add_synthetic_model("library/demo", blobs=6, blob_size=64 * 1024)
    registry.inject("blobs", Fault("reset", times=2))  # retry lines to write
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            cli_command("--insecure", reference(registry, model)),
            env=cli_env(models),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=write,
            timeout=60,
        )
    finally:
        os.close(write)
    assert done.returncode == 0
    assert_store_holds(models, registry, model)


def test_two_ctrl_c_in_quick_succession_give_one_line_and_no_asyncio_noise(
    registry: FaultRegistry, models: Path
) -> None:
    model = registry.add_synthetic_model("library/demo", blobs=8, blob_size=512 * 1024)
    registry.inject("blobs", Fault("slow", rate=64 * 1024, times=8))
    process = start_cli(models, "--insecure", reference(registry, model), capture=True)
    try:
        wait_for(lambda: bytes_landed(models), process=process)
        process.send_signal(signal.SIGINT)
        time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=10)
    finally:
        process.kill()
    assert process.returncode == 130
    assert stderr.count("interrupted") == 1, stderr
    for noise in ("Traceback", "Task was destroyed", "never retrieved", "KeyboardInterrupt"):
        assert noise not in stderr
    assert not (models / "manifests").exists()
    assert_nothing_unverified(models, model)


def test_a_blob_another_process_is_downloading_is_waited_for_and_said_so(registry: FaultRegistry, models: Path) -> None:
    model = registry.add_synthetic_model("library/demo", blobs=3, blob_size=4096)
    held = model.layer_digests[1]
    # Another process holds the blob's claim: its partial file, locked.
    partial = models / "blobs" / (held.replace(":", "-") + "-partial")
    partial.parent.mkdir(parents=True)
    fd = os.open(partial, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        process = start_cli(models, "--insecure", "--json", reference(registry, model), capture=True)
        wait_for(lambda: len(registry.requests) >= 3, process=process)  # the manifest and the two free blobs
    finally:
        os.close(fd)
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    waits = [line for line in stdout.splitlines() if '"event":"blob_wait"' in line]
    assert waits == [
        f'{{"event":"blob_wait","model":"{reference(registry, model)}","digest":"{held}",'
        '"label":"text_encoder/layer-001.safetensors"}'
    ]
    assert_store_holds(models, registry, model)


def test_https_to_a_plain_http_registry_suggests_insecure_at_once(registry: FaultRegistry, models: Path) -> None:
    model = registry.add_synthetic_model("library/demo", blobs=1, blob_size=100)
    started = time.monotonic()
    run = run_cli(models, reference(registry, model))
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1
    assert "the server does not speak TLS" in run.stderr
    assert run.stderr.rstrip().endswith("for a plain-HTTP registry pass --insecure")
    assert time.monotonic() - started < 10  # not retried: trying again cannot help


def test_an_http_scheme_in_the_reference_means_plain_http_and_is_not_stored(
    registry: FaultRegistry, models: Path
) -> None:
    model = registry.add_synthetic_model("library/demo", blobs=2, blob_size=100)
    run = run_cli(models, f"http://{reference(registry, model)}")
    assert run.returncode == 0, run.stderr
    assert_store_holds(models, registry, model)


def test_an_unreachable_registry_names_the_model_shows_the_retries_and_the_fix(models: Path) -> None:
    run = run_cli(models, "--retries", "2", "127.0.0.1:9/library/flux2-klein")
    assert run.returncode == 1
    retry, error = run.stderr.strip().splitlines()
    assert retry.startswith("retrying the manifest of 127.0.0.1:9/library/flux2-klein:latest (attempt 1, in ")
    assert "connection failed" in retry
    assert error.startswith("error: cannot fetch the manifest of 127.0.0.1:9/library/flux2-klein:latest")
    assert error.endswith("check the network connection, or set HTTPS_PROXY if you are behind a proxy")


def test_the_library_takes_str_paths_and_a_ca_cert(
    https_registry: tuple[FaultRegistry, Path],  # noqa: F811 - the fixture
    models: Path,
) -> None:
    registry, ca_path = https_registry
    model = registry.add_synthetic_model("library/demo", blobs=2, blob_size=4096)
    with pytest.raises(RegistryError, match=r"TLS certificate is not trusted .*: pass --ca-cert FILE"):
        asyncio.run(pull(reference(registry, model), models_dir=str(models)))
    result = asyncio.run(pull(reference(registry, model), models_dir=str(models), ca_cert=str(ca_path)))
    assert result.downloaded_blobs == 3
    assert_store_holds(models, registry, model)


@pytest.mark.parametrize("closed", [1, 2])
def test_a_pull_with_stdout_or_stderr_closed_from_the_start_completes(
    registry: FaultRegistry, models: Path, closed: int
) -> None:
    model = registry.add_synthetic_model("library/demo", blobs=4, blob_size=8192)
    done = subprocess.run(
        cli_command("--insecure", "--json", reference(registry, model)),
        env=cli_env(models),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        preexec_fn=lambda: os.close(closed),  # `>&-` or `2>&-`
        timeout=60,
    )
    assert done.returncode == 0
    assert_store_holds(models, registry, model)


def test_json_events_to_a_file_are_whole_lines_in_order(registry: FaultRegistry, models: Path, tmp_path: Path) -> None:
    model = registry.add_synthetic_model("library/demo", blobs=4, blob_size=8192)
    output = tmp_path / "events.jsonl"
    with output.open("w") as file:
        done = subprocess.run(
            cli_command("--insecure", "--json", reference(registry, model)),
            env=cli_env(models),
            stdin=subprocess.DEVNULL,
            stdout=file,
            stderr=subprocess.PIPE,
            timeout=60,
        )
    assert done.returncode == 0
    kinds = [json.loads(line)["event"] for line in output.read_text().splitlines()]
    assert kinds[0] == "manifest"
    assert kinds[-1] == "done"
    assert kinds.count("blob_done") == 5
