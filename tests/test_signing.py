"""Ollama's signed token requests, checked with the public key as registry.ollama.ai would."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
import respx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ollama_pull.auth import RegistryAuth
from ollama_pull.errors import AuthenticationError
from ollama_pull.network import make_client
from ollama_pull.registry import RegistryClient
from ollama_pull.retry import Backoff
from ollama_pull.signing import OllamaKey, signed_token_url

from .fakes import BASE, REF, make_model, no_sleep

pytestmark = pytest.mark.anyio

EMPTY = base64.b64encode(hashlib.sha256(b"").hexdigest().encode()).decode()


def write_key(directory: Path) -> tuple[Path, str]:
    """An OpenSSH ed25519 key pair as `ollama serve` creates it; returns the key path and the .pub line."""
    key = Ed25519PrivateKey.generate()
    path = directory / "id_ed25519"
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    (directory / "id_ed25519.pub").write_bytes(public + b"\n")
    return path, public.decode()


def verify(authorization: str, url: str, public_line: str) -> bool:
    """What a registry does: the header's key must be the user's, and the signature must cover the request."""
    public_field, _, signature = authorization.partition(":")
    if public_field != public_line.split()[1]:
        return False
    loaded = serialization.load_ssh_public_key(public_line.encode())
    assert isinstance(loaded, Ed25519PublicKey)
    try:
        loaded.verify(base64.b64decode(signature), f"GET,{url},{EMPTY}".encode())
    except Exception:  # noqa: BLE001 - cryptography signals a bad signature with InvalidSignature
        return False
    return True


def test_token_url_carries_ts_and_nonce_in_gos_order() -> None:
    url = signed_token_url(
        "https://registry.test/token", "ollama.com", ("repository:ns/model:pull",), now=1700000000.7, nonce="n+/="
    )
    assert url == (
        "https://registry.test/token?nonce=n%2B%2F%3D&scope=repository%3Ans%2Fmodel%3Apull&service=ollama.com"
        "&ts=1700000000"
    )
    nonce = dict(parse_qsl(urlsplit(signed_token_url("https://r/t", None, ())).query))["nonce"]
    assert len(base64.urlsafe_b64decode(nonce)) == 16


def test_the_key_signs_what_a_registry_verifies(tmp_path: Path) -> None:
    path, public = write_key(tmp_path)
    key = OllamaKey.load(path)
    assert key is not None
    assert key.public_key == public.split()[1]
    header = key.authorization("https://registry.test/token?ts=1")
    assert verify(header, "https://registry.test/token?ts=1", public)
    assert not verify(header, "https://registry.test/token?ts=2", public)
    assert OllamaKey.load(tmp_path / "absent") is None


def test_a_key_that_is_not_an_ed25519_openssh_key_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "id_ed25519").write_text("not a key")
    with pytest.raises(AuthenticationError, match="not an unencrypted OpenSSH private key"):
        OllamaKey.load(tmp_path / "id_ed25519")


def registry_with_key(router: respx.MockRouter, key_path: Path) -> RegistryClient:
    client = make_client()
    client.auth = RegistryAuth(lambda _host: None, key_path=key_path)
    return RegistryClient(client, attempts=1, backoff=Backoff(0, 0), sleep=no_sleep)


def challenged_manifest(router: respx.MockRouter, realm: str, raw: bytes) -> None:
    challenge = f'Bearer realm="{realm}",service="ollama.com",scope="repository:ns/model:pull"'

    def manifest(request: httpx.Request) -> httpx.Response:
        if request.headers.get("Authorization") == "Bearer signed-token":
            return httpx.Response(200, content=raw)
        return httpx.Response(401, headers={"WWW-Authenticate": challenge})

    router.get(f"{BASE}/manifests/tag").mock(side_effect=manifest)


async def test_a_challenge_from_the_registrys_own_host_is_signed(tmp_path: Path) -> None:
    path, public = write_key(tmp_path)
    model = make_model(10)
    with respx.mock(using="httpcore2") as router:
        challenged_manifest(router, "https://registry.test/token", model.manifest.raw)

        def token(request: httpx.Request) -> httpx.Response:
            if verify(request.headers.get("Authorization", ""), str(request.url), public):
                return httpx.Response(200, json={"token": "signed-token"})
            return httpx.Response(401)

        route = router.get("https://registry.test/token").mock(side_effect=token)
        registry = registry_with_key(router, path)
        async with registry.client:
            await registry.fetch_manifest(REF)
    params = route.calls.last.request.url.params
    assert params["service"] == "ollama.com"
    assert params["scope"] == "repository:ns/model:pull"
    assert params["ts"].isdigit()
    assert params["nonce"]


async def test_a_realm_on_another_host_never_gets_the_signature(tmp_path: Path) -> None:
    path, _ = write_key(tmp_path)
    model = make_model(10)
    with respx.mock(using="httpcore2") as router:
        challenged_manifest(router, "https://elsewhere.test/token", model.manifest.raw)
        route = router.get("https://elsewhere.test/token").respond(200, json={"token": "signed-token"})
        registry = registry_with_key(router, path)
        async with registry.client:
            await registry.fetch_manifest(REF)
    request = route.calls.last.request
    assert "Authorization" not in request.headers
    assert "nonce" not in request.url.params


async def test_without_a_key_the_token_request_is_anonymous(tmp_path: Path) -> None:
    model = make_model(10)
    with respx.mock(using="httpcore2") as router:
        challenged_manifest(router, "https://registry.test/token", model.manifest.raw)
        route = router.get("https://registry.test/token").respond(200, json={"token": "signed-token"})
        registry = registry_with_key(router, tmp_path / "no-key")
        async with registry.client:
            await registry.fetch_manifest(REF)
    assert "Authorization" not in route.calls.last.request.headers
