"""The real CLI against the real CNCF distribution registry (Debian's docker-registry) on 127.0.0.1.

The fault-injecting registry is written to the same reading of the spec as the client; this one is not, so a pull
that works here works against the registry most private deployments run.
"""

from __future__ import annotations

import base64
import json
import random
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from .conftest import Run, cli_command, cli_env, run_cli
from .distribution import AccessRecord, DistributionRegistry, Layer, push_model

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("docker-registry") is None, reason=".ci/run installs docker-registry"),
]

TENSOR = "application/vnd.ollama.image.tensor"
USER = "tester"
PASSWORD = "correct-horse-7f3a"
# Variables the CLI reads credentials from: the developer's own must never reach a test's CLI.
CREDENTIAL_VARIABLES = ("OLLAMA_PULL_USERNAME", "OLLAMA_PULL_PASSWORD", "DOCKER_CONFIG")
CLI_AGENT = "ollama-pull/"


def synthetic_layers(seed: int = 1) -> list[Layer]:
    """Eight layers as Ollama lays out a safetensors model: tensors of mixed sizes, the model index, a license."""
    rng = random.Random(seed)
    sizes = [24 * 1024, 1536 * 1024, 96 * 1024, 300 * 1024, 40 * 1024 + 7, 700 * 1024]
    tensors = [
        Layer(TENSOR, rng.randbytes(size), f"{part}/model-{index:05}.safetensors")
        for index, (size, part) in enumerate(zip(sizes, ["text_encoder", "transformer", "vae"] * 2, strict=True), 1)
    ]
    index = json.dumps({"_class_name": "SyntheticPipeline", "seed": seed}).encode()
    return [
        *tensors,
        Layer("application/vnd.ollama.image.json", index, "model_index.json"),
        Layer("application/vnd.ollama.image.license", b"Synthetic test weights; no rights reserved.\n"),
    ]


CONFIG = json.dumps({"model_format": "safetensors", "architecture": "synthetic"}).encode()


def push_synthetic(
    registry: DistributionRegistry, tag: str = "v1", auth: tuple[str, str] | None = None
) -> tuple[bytes, dict[str, bytes]]:
    return push_model(registry.url, "library/synthetic", tag, layers=synthetic_layers(), config=CONFIG, auth=auth)


def assert_store_holds(
    models: Path, registry: DistributionRegistry, manifest: bytes, blobs: Mapping[str, bytes], tag: str = "v1"
) -> None:
    """Byte for byte: every blob, nothing else in blobs/, and the manifest exactly as pushed."""
    stored = models / "blobs"
    assert sorted(path.name for path in stored.iterdir()) == sorted(d.replace(":", "-") for d in blobs)
    for digest, data in blobs.items():
        assert (stored / digest.replace(":", "-")).read_bytes() == data, digest
    assert (models / "manifests" / registry.host / "library" / "synthetic" / tag).read_bytes() == manifest


def run_cli_with(models: Path, extra: Mapping[str, str], *args: str) -> Run:
    """run_cli with credential variables cleared, then ``extra`` set."""
    env = {key: value for key, value in cli_env(models).items() if key not in CREDENTIAL_VARIABLES} | dict(extra)
    done = subprocess.run(
        cli_command(*args), env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )
    return Run(done.returncode, done.stdout, done.stderr)


def cli_requests(registry: DistributionRegistry, at_least: int = 0) -> list[AccessRecord]:
    return registry.requests(user_agent=CLI_AGENT, at_least=at_least)


def assert_one_challenge_then_all_accepted(registry: DistributionRegistry) -> None:
    """The manifest request goes out anonymously and is challenged once; the remembered header serves the rest."""
    # The challenged manifest request, the manifest again, then the config and eight layers.
    [first, *rest] = cli_requests(registry, at_least=11)
    assert (first.status, first.path) == (401, "/v2/library/synthetic/manifests/v1")
    assert [r.status for r in rest] == [200] * 10
    assert rest[0].path == first.path


def basic_auth(password: str) -> str:
    return base64.b64encode(f"{USER}:{password}".encode()).decode()


def assert_no_secret_shown(run: Run, password: str = PASSWORD) -> None:
    for secret in (password, basic_auth(password)):
        assert secret not in run.stdout
        assert secret not in run.stderr


@pytest.fixture
def registry() -> Iterator[DistributionRegistry]:
    with DistributionRegistry() as server:
        yield server


@pytest.fixture
def private_registry() -> Iterator[DistributionRegistry]:
    with DistributionRegistry(users={USER: PASSWORD}) as server:
        yield server


def test_a_model_pushed_to_distribution_is_pulled_byte_for_byte(registry: DistributionRegistry, models: Path) -> None:
    manifest, blobs = push_synthetic(registry)
    assert len(blobs) == 9
    reference = f"{registry.host}/library/synthetic:v1"
    run = run_cli(models, "--insecure", reference)
    assert run.returncode == 0, f"{run.stderr}\n--- registry log ---\n{registry.log()}"
    assert_store_holds(models, registry, manifest, blobs)
    pulled = cli_requests(registry, at_least=10)
    assert sorted(r.path.rsplit("/", 1)[-1] for r in pulled if "/blobs/" in r.path) == sorted(blobs)
    again = run_cli(models, "--insecure", "--json", reference)
    assert again.returncode == 0, again.stderr
    done = again.events[-1]
    assert done["event"] == "done"
    assert done["downloaded_blobs"] == 0
    assert again.events[0]["present_blobs"] == 9
    # Only the manifest is asked for again: blobs already in the store are not even checked with HEAD.
    assert [(r.method, r.path) for r in cli_requests(registry, at_least=len(pulled) + 1)[len(pulled) :]] == [
        ("GET", "/v2/library/synthetic/manifests/v1")
    ]
    assert_store_holds(models, registry, manifest, blobs)


@pytest.mark.parametrize("name", ["library/synthetic:v2", "library/absent:v1"], ids=["missing-tag", "missing-repo"])
def test_a_missing_model_is_exit_3(registry: DistributionRegistry, models: Path, name: str) -> None:
    push_synthetic(registry)
    run = run_cli(models, "--insecure", f"{registry.host}/{name}")
    assert run.returncode == 3, run.stderr
    assert run.stderr.strip().splitlines() == [
        f"error: model '{registry.host}/{name}' not found: check the name and tag, or the registry host"
    ]
    assert not (models / "manifests").exists()


OUTPUT_MODES = pytest.mark.parametrize("mode", [(), ("--json",)], ids=["plain", "json"])


@OUTPUT_MODES
def test_basic_auth_with_credentials_from_the_environment(
    private_registry: DistributionRegistry, models: Path, mode: tuple[str, ...]
) -> None:
    manifest, blobs = push_synthetic(private_registry, auth=(USER, PASSWORD))
    credentials = {"OLLAMA_PULL_USERNAME": USER, "OLLAMA_PULL_PASSWORD": PASSWORD}
    run = run_cli_with(models, credentials, "--insecure", *mode, f"{private_registry.host}/library/synthetic:v1")
    assert run.returncode == 0, f"{run.stderr}\n--- registry log ---\n{private_registry.log()}"
    assert_store_holds(models, private_registry, manifest, blobs)
    assert_one_challenge_then_all_accepted(private_registry)
    assert_no_secret_shown(run)


@OUTPUT_MODES
def test_basic_auth_with_credentials_from_a_docker_config(
    private_registry: DistributionRegistry, models: Path, tmp_path: Path, mode: tuple[str, ...]
) -> None:
    manifest, blobs = push_synthetic(private_registry, auth=(USER, PASSWORD))
    docker = tmp_path / "docker"
    docker.mkdir()
    auths = {private_registry.host: {"auth": basic_auth(PASSWORD)}}
    (docker / "config.json").write_text(json.dumps({"auths": auths}))
    run = run_cli_with(
        models, {"DOCKER_CONFIG": str(docker)}, "--insecure", *mode, f"{private_registry.host}/library/synthetic:v1"
    )
    assert run.returncode == 0, f"{run.stderr}\n--- registry log ---\n{private_registry.log()}"
    assert_store_holds(models, private_registry, manifest, blobs)
    assert_one_challenge_then_all_accepted(private_registry)
    assert_no_secret_shown(run)


@OUTPUT_MODES
@pytest.mark.parametrize("case", ["wrong-password", "no-credentials"])
def test_refused_basic_auth_is_exit_4_in_one_line(
    private_registry: DistributionRegistry, models: Path, tmp_path: Path, mode: tuple[str, ...], case: str
) -> None:
    push_synthetic(private_registry, auth=(USER, PASSWORD))
    # An empty docker config directory in both cases, so ~/.docker can supply nothing either.
    empty = tmp_path / "empty-docker"
    empty.mkdir()
    extra = {"DOCKER_CONFIG": str(empty)}
    wrong = PASSWORD + "-wrong"
    if case == "wrong-password":
        extra |= {"OLLAMA_PULL_USERNAME": USER, "OLLAMA_PULL_PASSWORD": wrong}
    run = run_cli_with(models, extra, "--insecure", *mode, f"{private_registry.host}/library/synthetic:v1")
    assert run.returncode == 4, f"{run.stderr}\n--- registry log ---\n{private_registry.log()}"
    assert_no_secret_shown(run)
    assert_no_secret_shown(run, wrong)
    assert "Traceback" not in run.stderr
    [line] = run.stderr.strip().splitlines()
    assert line.startswith("error: ")
    assert private_registry.host in line
    assert "HTTP 401" in line
    # Anonymous, then (with credentials) once more with them: a refused password is not tried again.
    expected = 2 if case == "wrong-password" else 1
    assert [(r.path, r.status) for r in cli_requests(private_registry, at_least=expected)] == [
        ("/v2/library/synthetic/manifests/v1", 401)
    ] * expected
    if mode:
        [error] = [event for event in run.events if event["event"] == "error"]
        assert error["exit_code"] == 4
        assert f"error: {error['message']}" == line
    assert not (models / "manifests").exists()
