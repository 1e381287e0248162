"""Hugging Face: where the user's token goes (hf.co and huggingface.co over HTTPS, nothing else), the messages
of a refusal or a rate limit, and where the model lands in the store."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import respx

from ollama_pull import pull
from ollama_pull.errors import AuthenticationError, RegistryError
from ollama_pull.events import Event
from ollama_pull.huggingface import HuggingFaceToken, find_token
from ollama_pull.network import make_client

from .fakes import FAST, ChunkStream, Model, make_model
from .test_signing import verify, write_key

pytestmark = pytest.mark.anyio

TOKEN = "hf_SecretTokenThatMustNeverShow"
NAME = "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M"
BASE = "https://hf.co/v2/bartowski/Llama-3.2-1B-Instruct-GGUF"
CDN = "https://cdn-lfs.hf.co"


@pytest.mark.parametrize(
    ("variables", "files", "expected"),
    [
        # HF_TOKEN wins over every file.
        ({"HF_TOKEN": f" {TOKEN}\n"}, {"explicit": "other", "hf-home/token": "other"}, TOKEN),
        # Then HF_TOKEN_PATH, even when HF_HOME has a token too.
        ({"HF_TOKEN_PATH": "explicit", "HF_HOME": "hf-home"}, {"explicit": f"{TOKEN}\n", "hf-home/token": "x"}, TOKEN),
        # Then $HF_HOME/token.
        ({"HF_HOME": "hf-home"}, {"hf-home/token": TOKEN, "home/.cache/huggingface/token": "x"}, TOKEN),
        # Then where `hf auth login` writes by default ...
        ({}, {"home/.cache/huggingface/token": f"{TOKEN}\n"}, TOKEN),
        # ... which moves with XDG_CACHE_HOME, as in huggingface_hub.
        ({"XDG_CACHE_HOME": "xdg"}, {"xdg/huggingface/token": TOKEN, "home/.cache/huggingface/token": "x"}, TOKEN),
        # An empty variable is no token; an empty or absent file neither.
        ({"HF_TOKEN": "  "}, {"home/.cache/huggingface/token": "\n"}, None),
        ({"HF_TOKEN_PATH": "absent"}, {}, None),
    ],
)
def test_the_token_is_found_where_hugging_face_hub_puts_it(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    variables: dict[str, str],
    files: dict[str, str],
    expected: str | None,
) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    environ = {key: value if key == "HF_TOKEN" else str(tmp_path / value) for key, value in variables.items()}
    assert find_token(environ) == expected


@pytest.mark.parametrize(
    ("url", "sent"),
    [
        ("https://hf.co/v2/u/r/manifests/latest", True),
        ("https://huggingface.co/v2/token", True),
        ("https://HF.CO/v2/u/r/blobs/sha256:00", True),
        ("http://hf.co/v2/u/r/manifests/latest", False),  # never in clear text
        ("https://hf.co:8443/v2/u/r/manifests/latest", False),
        ("https://cdn-lfs.hf.co/repos/blob", False),
        ("https://cas-bridge.xethub.hf.co/blob", False),
        ("https://hf.co.evil.test/v2/u/r/manifests/latest", False),
        ("https://registry.ollama.ai/v2/library/qwen3/manifests/8b", False),
        ("https://mirror.test/v2/u/r/manifests/latest", False),
    ],
)
def test_the_token_is_offered_to_hugging_face_over_https_only(url: str, sent: bool) -> None:
    header = HuggingFaceToken({"HF_TOKEN": TOKEN})(httpx.URL(url))
    assert header == (f"Bearer {TOKEN}" if sent else None)


def gguf_model() -> Model:
    return make_model(3000, 5000, seed=7)


def serve(router: respx.MockRouter, model: Model, base: str = BASE, tag: str = "Q4_K_M") -> None:
    """hf.co as it serves a GGUF repository: the manifest itself, each blob as a redirect to its CDN."""
    router.get(f"{base}/manifests/{tag}").respond(200, content=model.manifest.raw)
    for digest, data in model.blobs.items():
        router.get(f"{base}/blobs/{digest}").respond(302, headers={"Location": f"{CDN}/blob/{digest}?sig=x"})
        router.get(f"{CDN}/blob/{digest}").mock(
            side_effect=lambda _request, data=data: httpx.Response(200, stream=ChunkStream(data))
        )


async def run_pull(router: respx.MockRouter, models: Path, name: str = NAME, **options: object) -> list[Event]:
    events: list[Event] = []
    async with make_client() as client:
        await pull(name, models_dir=models, settings=FAST, client=client, on_event=events.append, **options)  # type: ignore[arg-type]
    return events


def authorizations(router: respx.MockRouter) -> dict[str, set[str | None]]:
    seen: dict[str, set[str | None]] = {}
    for call in router.calls:
        seen.setdefault(call.request.url.host, set()).add(call.request.headers.get("Authorization"))
    return seen


async def test_a_gated_model_is_pulled_with_the_token_which_never_reaches_the_cdn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    model = gguf_model()
    with respx.mock(using="httpcore2") as router:
        serve(router, model)
        events = await run_pull(router, tmp_path)
        assert authorizations(router) == {"hf.co": {f"Bearer {TOKEN}"}, "cdn-lfs.hf.co": {None}}
    manifest = tmp_path / "manifests" / "hf.co" / "bartowski" / "Llama-3.2-1B-Instruct-GGUF" / "Q4_K_M"
    assert manifest.read_bytes() == model.manifest.raw
    assert TOKEN not in repr(events)


async def test_the_tag_defaults_to_latest_and_anonymous_pulls_send_nothing(tmp_path: Path) -> None:
    model = gguf_model()
    with respx.mock(using="httpcore2") as router:
        serve(router, model, tag="latest")
        await run_pull(router, tmp_path, "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF")
        assert authorizations(router) == {"hf.co": {None}, "cdn-lfs.hf.co": {None}}
    assert (tmp_path / "manifests" / "hf.co" / "bartowski" / "Llama-3.2-1B-Instruct-GGUF" / "latest").is_file()


async def test_a_mirror_never_gets_the_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    model = gguf_model()
    with respx.mock(using="httpcore2") as router:
        serve(router, model, base="https://mirror.test/v2/bartowski/Llama-3.2-1B-Instruct-GGUF")
        await run_pull(router, tmp_path, mirror="https://mirror.test")
        assert authorizations(router) == {"mirror.test": {None}, "cdn-lfs.hf.co": {None}}


async def test_other_registries_never_get_the_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    model = gguf_model()
    with respx.mock(using="httpcore2") as router:
        serve(router, model, base="https://registry.test/v2/bartowski/gguf", tag="latest")
        await run_pull(router, tmp_path, "registry.test/bartowski/gguf")
        assert authorizations(router) == {"registry.test": {None}, "cdn-lfs.hf.co": {None}}


@pytest.mark.parametrize("status", [401, 403])
@pytest.mark.parametrize("token", [None, TOKEN])
async def test_a_refusal_says_how_to_get_access(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, status: int, token: str | None
) -> None:
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    with respx.mock(using="httpcore2") as router:
        router.get(f"{BASE}/manifests/Q4_K_M").respond(status)
        with pytest.raises(AuthenticationError) as caught:
            await run_pull(router, tmp_path)
    message = str(caught.value)
    assert message.startswith(f"Hugging Face refused access to {NAME} (HTTP {status}, ")
    assert ("the token sent was refused" if token else "no token was sent") in message
    for fix in ("HF_TOKEN", "https://huggingface.co/bartowski/Llama-3.2-1B-Instruct-GGUF", "~/.ollama/id_ed25519.pub"):
        assert fix in message
    assert TOKEN not in message
    assert "\n" not in message
    assert not (tmp_path / "manifests").exists()


@pytest.mark.parametrize(
    ("token", "fix"),
    [(None, "anonymous pulls are rate-limited, and a token lifts the limit: set HF_TOKEN"), (TOKEN, "wait a few")],
)
async def test_a_rate_limit_says_a_token_lifts_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, token: str | None, fix: str
) -> None:
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    with respx.mock(using="httpcore2") as router:
        route = router.get(f"{BASE}/manifests/Q4_K_M").respond(429)
        with pytest.raises(RegistryError, match="Hugging Face rate-limited the pull of") as caught:
            await run_pull(router, tmp_path)
        assert route.call_count == FAST.attempts
    assert fix in str(caught.value)
    assert TOKEN not in str(caught.value)


async def test_the_ollama_key_still_answers_hugging_faces_challenge(tmp_path: Path) -> None:
    key_dir = tmp_path / "home" / ".ollama"
    key_dir.mkdir(parents=True)
    _, public = write_key(key_dir)
    model = gguf_model()
    challenge = 'Bearer realm="https://hf.co/v2/token",service="hf.co",scope="repository:bartowski/x:pull"'
    with respx.mock(using="httpcore2") as router:
        serve(router, model)
        router.get(f"{BASE}/manifests/Q4_K_M").mock(
            side_effect=lambda request: (
                httpx.Response(200, content=model.manifest.raw)
                if request.headers.get("Authorization") == "Bearer from-key"
                else httpx.Response(401, headers={"WWW-Authenticate": challenge})
            )
        )
        token = router.get("https://hf.co/v2/token").mock(
            side_effect=lambda request: (
                httpx.Response(200, json={"token": "from-key"})
                if verify(request.headers.get("Authorization", ""), str(request.url), public)
                else httpx.Response(401)
            )
        )
        await run_pull(router, tmp_path / "models")
        assert token.call_count == 1
    assert (tmp_path / "models" / "manifests" / "hf.co" / "bartowski").is_dir()
