"""Where credentials come from, and how the Basic challenge is answered."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import pytest
import respx

from ollama_pull.auth import RegistryAuth
from ollama_pull.credentials import Credentials, find_credentials
from ollama_pull.errors import AuthenticationError
from ollama_pull.network import make_client
from ollama_pull.registry import RegistryClient
from ollama_pull.retry import Backoff

from .fakes import BASE, REF, make_model, no_sleep

pytestmark = pytest.mark.anyio


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def docker_config(tmp_path: Path, auths: object) -> dict[str, str]:
    (tmp_path / "config.json").write_text(json.dumps({"auths": auths}))
    return {"DOCKER_CONFIG": str(tmp_path)}


@pytest.mark.parametrize(
    ("auths", "host", "expected"),
    [
        ({"reg.test:5000": {"auth": b64("u:p:with:colons")}}, "reg.test:5000", Credentials("u", "p:with:colons")),
        ({"https://reg.test/v1/": {"auth": b64("u:p")}}, "reg.test", Credentials("u", "p")),
        ({"reg.test": {"username": "u", "password": "p"}}, "reg.test", Credentials("u", "p")),
        ({"other.test": {"auth": b64("u:p")}}, "reg.test", None),
        ({"reg.test": {"auth": "%%% not base64"}}, "reg.test", None),
        ({"reg.test": "not an object"}, "reg.test", None),
        ([], "reg.test", None),
    ],
)
def test_docker_config_entries(tmp_path: Path, auths: object, host: str, expected: Credentials | None) -> None:
    assert find_credentials(host, docker_config(tmp_path, auths)) == expected


def test_environment_wins_over_docker_config(tmp_path: Path) -> None:
    environ = docker_config(tmp_path, {"reg.test": {"auth": b64("docker:pw")}})
    environ |= {"OLLAMA_PULL_USERNAME": "env", "OLLAMA_PULL_PASSWORD": "secret"}
    assert find_credentials("reg.test", environ) == Credentials("env", "secret")
    assert find_credentials("reg.test", {"DOCKER_CONFIG": str(tmp_path / "missing")}) is None


def test_a_password_is_not_in_the_repr() -> None:
    assert "hunter2" not in repr(Credentials("u", "hunter2"))


def registry_with(router: respx.MockRouter, credentials: Credentials | None) -> RegistryClient:
    client = make_client()
    client.auth = RegistryAuth(lambda host: credentials if host == "registry.test" else None)
    return RegistryClient(client, attempts=1, backoff=Backoff(0, 0), sleep=no_sleep)


async def test_a_basic_challenge_is_answered_once_and_remembered() -> None:
    model = make_model(10)
    good = Credentials("u", "p").basic_header()
    sent: list[str | None] = []

    def manifest(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers.get("Authorization"))
        if request.headers.get("Authorization") == good:
            return httpx.Response(200, content=model.manifest.raw)
        return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="registry"'})

    with respx.mock(using="httpcore2") as router:
        router.get(f"{BASE}/manifests/tag").mock(side_effect=manifest)
        registry = registry_with(router, Credentials("u", "p"))
        async with registry.client:
            await registry.fetch_manifest(REF)
            await registry.fetch_manifest(REF)
    assert sent == [None, good, good]


async def test_wrong_basic_credentials_are_an_auth_error_without_the_password() -> None:
    with respx.mock(using="httpcore2") as router:
        route = router.get(f"{BASE}/manifests/tag").respond(401, headers={"WWW-Authenticate": 'Basic realm="r"'})
        registry = registry_with(router, Credentials("u", "wrong-password"))
        async with registry.client:
            with pytest.raises(AuthenticationError, match="the credentials were refused") as caught:
                await registry.fetch_manifest(REF)
    assert route.call_count == 2
    assert "wrong-password" not in str(caught.value)


async def test_credentials_go_to_the_token_service() -> None:
    model = make_model(10)
    with respx.mock(using="httpcore2") as router:
        token = router.get("https://auth.test/token").respond(200, json={"token": "t"})

        def manifest(request: httpx.Request) -> httpx.Response:
            if request.headers.get("Authorization") == "Bearer t":
                return httpx.Response(200, content=model.manifest.raw)
            return httpx.Response(401, headers={"WWW-Authenticate": 'Bearer realm="https://auth.test/token"'})

        router.get(f"{BASE}/manifests/tag").mock(side_effect=manifest)
        registry = registry_with(router, Credentials("u", "p"))
        async with registry.client:
            await registry.fetch_manifest(REF)
    assert token.calls.last.request.headers["Authorization"] == Credentials("u", "p").basic_header()
