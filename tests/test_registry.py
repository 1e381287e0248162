"""The registry client and token auth, against respx routes."""

from __future__ import annotations

import asyncio

import httpcore2
import httpx
import pytest
import respx

from ollama_pull import __version__
from ollama_pull.auth import BearerChallenge, parse_challenge
from ollama_pull.errors import AuthenticationError, ClientTooOld, InvalidManifest, ModelNotFound, RegistryError
from ollama_pull.manifest import MAX_MANIFEST_BYTES

from .fakes import BASE, REF, make_model, registry_for

pytestmark = pytest.mark.anyio

CHALLENGE = 'Bearer realm="https://auth.test/token",service="registry.test",scope="repository:ns/model:pull"'


def unauthorized() -> httpx.Response:
    return httpx.Response(401, headers={"WWW-Authenticate": CHALLENGE})


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (CHALLENGE, BearerChallenge("https://auth.test/token", "registry.test", ("repository:ns/model:pull",))),
        ('bearer realm=https://a/t,scope="a b"', BearerChallenge("https://a/t", None, ("a", "b"))),
        ('Basic realm="x"', None),
        ("Bearer service=x", None),
        ("", None),
    ],
)
def test_parse_challenge(header: str, expected: BearerChallenge | None) -> None:
    assert parse_challenge(header) == expected


async def test_manifest_request_headers_and_exact_bytes() -> None:
    model = make_model(10)
    with respx.mock(using="httpcore2") as router:
        # registry.ollama.ai once served manifests as text/plain: the body counts, not the Content-Type.
        route = router.get(f"{BASE}/manifests/tag").respond(
            200, content=model.manifest.raw, headers={"Content-Type": "text/plain"}
        )
        registry = registry_for(router)
        async with registry.client:
            manifest = await registry.fetch_manifest(REF)
    assert manifest.raw == model.manifest.raw
    request = route.calls.last.request
    assert request.headers["Accept"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert request.headers["User-Agent"] == f"ollama-pull/{__version__}"
    assert "Authorization" not in request.headers


@pytest.mark.parametrize(
    ("status", "error", "message"),
    [
        (404, ModelNotFound, "model 'registry.test/ns/model:tag' not found"),
        (401, AuthenticationError, "refused access"),
        (403, AuthenticationError, "HTTP 403"),
        (412, ClientTooOld, "needs a newer client"),
        (400, RegistryError, "HTTP 400"),
    ],
)
async def test_final_manifest_statuses(status: int, error: type[Exception], message: str) -> None:
    with respx.mock(using="httpcore2") as router:
        route = router.get(f"{BASE}/manifests/tag").respond(status)
        registry = registry_for(router)
        async with registry.client:
            with pytest.raises(error, match=message):
                await registry.fetch_manifest(REF)
    assert route.call_count == 1


async def test_429_and_5xx_are_retried_honouring_retry_after() -> None:
    model = make_model(10)
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    with respx.mock(using="httpcore2") as router:
        route = router.get(f"{BASE}/manifests/tag").mock(
            side_effect=[
                httpx.Response(429, headers={"Retry-After": "3"}),
                httpx.Response(503),
                httpcore2.ConnectError("refused"),
                httpx.Response(200, content=model.manifest.raw),
            ]
        )
        registry = registry_for(router)
        registry._sleep = sleep
        async with registry.client:
            await registry.fetch_manifest(REF)
    assert route.call_count == 4
    assert slept[0] == 3.0
    assert len(slept) == 3


async def test_retries_are_bounded() -> None:
    with respx.mock(using="httpcore2") as router:
        route = router.get(f"{BASE}/manifests/tag").respond(503)
        registry = registry_for(router, attempts=3)
        async with registry.client:
            with pytest.raises(RegistryError, match=r"HTTP 503 \(tried 3 times\)"):
                await registry.fetch_manifest(REF)
    assert route.call_count == 3


@pytest.mark.parametrize(
    ("body", "headers", "reason"),
    [
        (b"x" * (MAX_MANIFEST_BYTES + 10), {}, "larger than"),
        (b"{}", {}, "schemaVersion"),
    ],
)
async def test_bad_manifests_are_refused(body: bytes, headers: dict[str, str], reason: str) -> None:
    with respx.mock(using="httpcore2") as router:
        router.get(f"{BASE}/manifests/tag").respond(200, content=body, headers=headers)
        registry = registry_for(router)
        async with registry.client:
            with pytest.raises(InvalidManifest, match=reason):
                await registry.fetch_manifest(REF)


async def test_a_manifest_that_does_not_match_its_announced_digest_is_fetched_again() -> None:
    model = make_model(10)
    with respx.mock(using="httpcore2") as router:
        route = router.get(f"{BASE}/manifests/tag").mock(
            side_effect=[
                httpx.Response(
                    200,
                    content=model.manifest.raw[:-1] + b" ",
                    headers={"Docker-Content-Digest": model.manifest.digest},
                ),
                httpx.Response(
                    200, content=model.manifest.raw, headers={"Docker-Content-Digest": model.manifest.digest}
                ),
            ]
        )
        registry = registry_for(router)
        async with registry.client:
            assert (await registry.fetch_manifest(REF)).raw == model.manifest.raw
    assert route.call_count == 2


async def test_a_manifest_that_never_matches_its_digest_fails_after_the_retries() -> None:
    with respx.mock(using="httpcore2") as router:
        router.get(f"{BASE}/manifests/tag").respond(
            200, content=b"{}", headers={"Docker-Content-Digest": "sha256:" + "0" * 64}
        )
        registry = registry_for(router, attempts=2)
        async with registry.client:
            with pytest.raises(RegistryError, match="do not match its Docker-Content-Digest"):
                await registry.fetch_manifest(REF)


async def test_token_challenge_is_answered_and_the_token_reused() -> None:
    model = make_model(10)
    with respx.mock(using="httpcore2") as router:
        token = router.get("https://auth.test/token").respond(200, json={"access_token": "secret-token"})

        sent: list[str | None] = []

        def manifest(request: httpx.Request) -> httpx.Response:
            sent.append(request.headers.get("Authorization"))
            if request.headers.get("Authorization") == "Bearer secret-token":
                return httpx.Response(200, content=model.manifest.raw)
            return unauthorized()

        router.get(f"{BASE}/manifests/tag").mock(side_effect=manifest)
        registry = registry_for(router)
        async with registry.client:
            await registry.fetch_manifest(REF)
            await registry.fetch_manifest(REF)
    assert token.call_count == 1
    assert token.calls.last.request.url.params.get_list("scope") == ["repository:ns/model:pull"]
    assert token.calls.last.request.url.params["service"] == "registry.test"
    # First anonymous, then with the token; the second fetch sends the cached token at once.
    assert sent == [
        None,
        "Bearer secret-token",
        "Bearer secret-token",
    ]


async def test_an_expired_token_is_refreshed_once_for_all_concurrent_requests() -> None:
    issued = iter(["first", "second", "third"])
    with respx.mock(using="httpcore2") as router:
        token = router.get("https://auth.test/token").mock(
            side_effect=lambda _r: httpx.Response(200, json={"token": next(issued)})
        )
        state = {"valid": "first"}

        def blob(request: httpx.Request) -> httpx.Response:
            if request.headers.get("Authorization") == f"Bearer {state['valid']}":
                return httpx.Response(200, content=b"ok")
            return unauthorized()

        router.get(url__startswith=f"{BASE}/blobs/").mock(side_effect=blob)
        registry = registry_for(router)
        async with registry.client:
            async with registry.stream_blob(REF, "sha256:" + "0" * 64) as response:
                assert response.status_code == 200
            state["valid"] = "second"  # the first token expires

            async def fetch(n: int) -> int:
                async with registry.stream_blob(REF, f"sha256:{n:064x}") as response:
                    return response.status_code

            statuses = await asyncio.gather(*(fetch(n) for n in range(20)))
    assert statuses == [200] * 20
    assert token.call_count == 2


async def test_a_token_that_is_refused_again_is_an_auth_error() -> None:
    with respx.mock(using="httpcore2") as router:
        router.get("https://auth.test/token").respond(200, json={"token": "never-good"})
        router.get(f"{BASE}/manifests/tag").mock(return_value=unauthorized())
        registry = registry_for(router)
        async with registry.client:
            with pytest.raises(AuthenticationError) as caught:
                await registry.fetch_manifest(REF)
    assert "never-good" not in str(caught.value)


@pytest.mark.parametrize(
    ("answer", "error", "message"),
    [
        (httpx.Response(403), AuthenticationError, "token service at auth.test refused access"),
        (httpx.Response(500), RegistryError, "answered HTTP 500"),
        (httpx.Response(200, content=b"<html>"), RegistryError, "not JSON"),
        (httpx.Response(200, json={"nothing": 1}), RegistryError, "without a token"),
    ],
)
async def test_token_service_failures(answer: httpx.Response, error: type[Exception], message: str) -> None:
    with respx.mock(using="httpcore2") as router:
        router.get("https://auth.test/token").mock(return_value=answer)
        router.get(f"{BASE}/manifests/tag").mock(return_value=unauthorized())
        registry = registry_for(router)
        async with registry.client:
            with pytest.raises(error, match=message):
                await registry.fetch_manifest(REF)


async def test_blob_redirect_to_another_host_drops_the_registry_token() -> None:
    digest = "sha256:" + "0" * 64
    with respx.mock(using="httpcore2") as router:
        router.get("https://auth.test/token").respond(200, json={"token": "registry-token"})

        def blob(request: httpx.Request) -> httpx.Response:
            if request.headers.get("Authorization") != "Bearer registry-token":
                return unauthorized()
            return httpx.Response(307, headers={"Location": "https://cdn.test/blob?sig=1"})

        router.get(f"{BASE}/blobs/{digest}").mock(side_effect=blob)
        cdn = router.get("https://cdn.test/blob").respond(200, content=b"bytes")
        registry = registry_for(router)
        async with registry.client, registry.stream_blob(REF, digest, offset=5) as response:
            assert response.status_code == 200
    request = cdn.calls.last.request
    assert "Authorization" not in request.headers
    assert request.headers["Range"] == "bytes=5-"
    assert request.headers["Accept-Encoding"] == "identity"
