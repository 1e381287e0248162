"""Behaviours of Ollama's own registry: a 412 for models that need a newer client, signed token requests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fault_registry import Fault, FaultRegistry

from .conftest import assert_store_holds, cli_env, reference, run_cli

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


def ollama_key(home: Path) -> str:
    """Write ~/.ollama/id_ed25519 as Ollama creates it; return the public key line."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    directory = home / ".ollama"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "id_ed25519").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def test_signed_token_requests_reach_a_private_model(models: Path, tmp_path: Path) -> None:
    home = Path(cli_env(models)["HOME"])
    public = ollama_key(home)
    with FaultRegistry(require_auth=True, signing_keys=[public]) as registry:
        model = registry.add_synthetic_model("private/model", blobs=3, blob_size=4096)
        run = run_cli(models, "--insecure", "--json", reference(registry, model))
        assert run.returncode == 0, run.stderr
        assert_store_holds(models, registry, model)
        assert registry.signed_requests_verified >= 1
        token_requests = [r for r in registry.requests if r.path.startswith("/token")]
        assert all("nonce=" in r.path and "ts=" in r.path for r in token_requests)
        assert all(r.status == 200 for r in token_requests)
        signature = token_requests[0].headers["authorization"]
        for text in (signature, *registry.tokens_issued):
            assert text not in run.stdout
            assert text not in run.stderr


@pytest.mark.parametrize("key", ["none", "another"])
def test_without_the_right_key_a_private_model_is_exit_4(models: Path, key: str) -> None:
    home = Path(cli_env(models)["HOME"])
    expected = ollama_key(home / "elsewhere")
    if key == "another":
        ollama_key(home)
    with FaultRegistry(require_auth=True, signing_keys=[expected]) as registry:
        model = registry.add_synthetic_model("private/model", blobs=1, blob_size=1024)
        run = run_cli(models, "--insecure", reference(registry, model))
    assert run.returncode == 4
    assert "refused access" in run.stderr
    assert "Traceback" not in run.stderr
    assert registry.signed_requests_verified == 0
