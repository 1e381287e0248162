"""The registry client and token auth, against respx routes."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import httpx
import httpx2
import pytest
import respx

from ollama_pull import __version__
from ollama_pull.auth import MAX_AUTH_TRIES, BearerChallenge, RegistryAuth, _cache_key, parse_challenge
from ollama_pull.errors import AuthenticationError, ClientTooOld, InvalidManifest, ModelNotFound, RegistryError
from ollama_pull.manifest import MAX_MANIFEST_BYTES
from ollama_pull.registry import UnusableBlobResponse

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
                httpx2.ConnectError("refused"),
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


async def test_a_token_used_up_before_a_waiting_request_sends_it_is_refreshed_again() -> None:
    # Tokens good for three uses, twenty downloads at once: most wait for a refresh whose token their siblings use
    # up before they send it, which is no reason to give up.
    uses: dict[str, int] = {}
    with respx.mock(using="httpcore2") as router:

        def grant(_request: httpx.Request) -> httpx.Response:
            name = f"token-{len(uses)}"
            uses[name] = 3
            return httpx.Response(200, json={"token": name})

        token = router.get("https://auth.test/token").mock(side_effect=grant)

        def blob(request: httpx.Request) -> httpx.Response:
            name = request.headers.get("Authorization", "").removeprefix("Bearer ")
            if uses.get(name, 0) <= 0:
                return unauthorized()
            uses[name] -= 1
            return httpx.Response(200, content=b"ok")

        router.get(url__startswith=f"{BASE}/blobs/").mock(side_effect=blob)
        registry = registry_for(router)

        async def fetch(n: int) -> int:
            async with registry.stream_blob(REF, f"sha256:{n:064x}") as response:
                return response.status_code

        async with registry.client:
            statuses = await asyncio.gather(*(fetch(n) for n in range(20)))
    assert statuses == [200] * 20
    # Every token used up before the next was asked for: the refreshes were merged.
    assert token.call_count == 7
    assert all(left == 0 for left in list(uses.values())[:-1])


async def test_a_request_is_sent_at_most_ten_times_the_last_with_a_token_of_its_own() -> None:
    with respx.mock(using="httpcore2") as router:
        token = router.get("https://auth.test/token").respond(200, json={"token": "own"})
        registry = registry_for(router)
        auth = registry.client.auth
        assert isinstance(auth, RegistryAuth)
        sent: list[str] = []

        def blob(request: httpx.Request) -> httpx.Response:
            sent.append(request.headers.get("Authorization", ""))
            # Whatever we send is refused, and each time a sibling download has just refreshed the token (played
            # here by writing the auth's cache, which only the flow itself does otherwise).
            auth._headers[_cache_key(request.url)] = f"Bearer sibling-{len(sent)}"
            return unauthorized()

        router.get(url__startswith=f"{BASE}/blobs/").mock(side_effect=blob)
        async with registry.client:
            # The registry client judges a blob response before handing it over: a 401 there is final.
            with pytest.raises(AuthenticationError, match=r"\(HTTP 401\)"):
                async with registry.stream_blob(REF, "sha256:" + "0" * 64):
                    pass
    assert len(sent) == MAX_AUTH_TRIES
    assert sent[1:-1] == [f"Bearer sibling-{n}" for n in range(1, MAX_AUTH_TRIES - 1)]
    assert sent[-1] == "Bearer own"
    assert token.call_count == 1


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
        (httpx.Response(500), RegistryError, "the token service at auth.test answered HTTP 500 \\(tried 6 times\\)"),
        (httpx.Response(404), RegistryError, "the token service at auth.test answered HTTP 404$"),
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


async def test_a_token_service_down_for_a_moment_is_retried_like_the_manifest() -> None:
    model = make_model(10)
    with respx.mock(using="httpcore2") as router:
        token = router.get("https://auth.test/token").mock(
            side_effect=[
                httpx.Response(503),
                httpx2.ConnectError("refused"),
                httpx.Response(200, json={"token": "t"}),
            ]
        )
        router.get(f"{BASE}/manifests/tag").mock(
            side_effect=lambda r: (
                httpx.Response(200, content=model.manifest.raw)
                if r.headers.get("Authorization") == "Bearer t"
                else unauthorized()
            )
        )
        registry = registry_for(router)
        async with registry.client:
            assert (await registry.fetch_manifest(REF)).raw == model.manifest.raw
    assert token.call_count == 3
    # The client's timeouts, not none at all: a token request is bounded like any other.
    assert token.calls.last.request.extensions["timeout"] == httpx.Timeout(30.0, read=60.0, pool=None).as_dict()


@pytest.mark.parametrize("stalls", [1, 10])
async def test_a_token_service_that_stalls_is_cut_off_and_named(stalls: int) -> None:
    model = make_model(10)
    left = {"stalls": stalls, "asked": 0}
    with respx.mock(using="httpcore2", assert_all_called=False) as router:

        async def token(_request: httpx.Request) -> httpx.Response:
            # Counted here: respx records a call only once it is answered.
            left["asked"] += 1
            if left["stalls"]:
                left["stalls"] -= 1
                await asyncio.Event().wait()
            return httpx.Response(200, json={"token": "t"})

        router.get("https://auth.test/token").mock(side_effect=token)
        router.get(f"{BASE}/manifests/tag").mock(
            side_effect=lambda r: (
                httpx.Response(200, content=model.manifest.raw)
                if r.headers.get("Authorization") == "Bearer t"
                else unauthorized()
            )
        )
        # Six tries allowed, as by default: a service that stays silent is given up on after three stalls.
        registry = registry_for(router, attempts=6, stall_timeout=0.05)
        async with registry.client:
            if stalls == 1:
                assert (await registry.fetch_manifest(REF)).raw == model.manifest.raw
                assert left["asked"] == 2
                return
            with pytest.raises(RegistryError) as caught:
                await registry.fetch_manifest(REF)
    # The silence is measured: at least the 0.05 s allowed, and more on a loaded machine.
    assert re.fullmatch(
        re.escape(f"cannot fetch the manifest of {REF.short} from {REF.host}: ")
        + r"stalled: no data for \d+\.\ds from the token service at auth\.test \(tried 3 times\)",
        str(caught.value),
    )
    assert left["asked"] == 3


async def test_a_manifest_body_that_stalls_is_cut_off() -> None:
    model = make_model(10)

    class Trickle(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield model.manifest.raw[:10]
            await asyncio.Event().wait()

    with respx.mock(using="httpcore2") as router:
        route = router.get(f"{BASE}/manifests/tag").mock(
            side_effect=[httpx.Response(200, stream=Trickle()), httpx.Response(200, content=model.manifest.raw)]
        )
        registry = registry_for(router, stall_timeout=0.05)
        async with registry.client:
            assert (await registry.fetch_manifest(REF)).raw == model.manifest.raw
    assert route.call_count == 2


async def test_a_mirror_that_stalls_is_left_for_the_origin() -> None:
    model = make_model(10)

    async def hang(_request: httpx.Request) -> httpx.Response:
        await asyncio.Event().wait()
        raise AssertionError("never answered")

    with respx.mock(using="httpcore2", assert_all_called=False) as router:
        router.get("https://mirror.test/v2/ns/model/manifests/tag").mock(side_effect=hang)
        origin = router.get(f"{BASE}/manifests/tag").respond(200, content=model.manifest.raw)
        registry = registry_for(router, stall_timeout=0.05)
        registry.mirror = "https://mirror.test"
        async with registry.client:
            assert (await registry.fetch_manifest(REF)).raw == model.manifest.raw
    assert origin.call_count == 1
    assert registry.mirror_failure is not None
    assert re.fullmatch(r"stalled: no data for \d+\.\ds", registry.mirror_failure)


class CountingSends:
    """Counts the requests that go through the client's own policy (``AsyncClient.send``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.urls: list[str] = []
        original = httpx2.AsyncClient.send

        async def send(client: httpx2.AsyncClient, request: httpx2.Request, **options: object) -> httpx2.Response:
            self.urls.append(str(request.url))
            return await original(client, request, **options)  # type: ignore[arg-type]

        monkeypatch.setattr(httpx2.AsyncClient, "send", send)


async def test_blob_gets_skip_the_client_policy_and_reuse_the_cached_token(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model(10)
    digest = model.layers[0].digest
    sends = CountingSends(monkeypatch)
    with respx.mock(using="httpcore2") as router:
        router.get("https://auth.test/token").respond(200, json={"token": "registry-token"})

        def manifest(request: httpx.Request) -> httpx.Response:
            if request.headers.get("Authorization") != "Bearer registry-token":
                return unauthorized()
            return httpx.Response(200, content=model.manifest.raw)

        router.get(f"{BASE}/manifests/tag").mock(side_effect=manifest)
        blob = router.get(f"{BASE}/blobs/{digest}").respond(200, content=model.blobs[digest])
        registry = registry_for(router)
        async with registry.client:
            await registry.fetch_manifest(REF)
            async with registry.stream_blob(REF, digest) as response:
                assert await response.aread() == model.blobs[digest]
    assert sends.urls == [f"{BASE}/manifests/tag"]
    # One request: the token the manifest's auth flow got goes along at once, no 401 round trip per blob.
    assert blob.call_count == 1
    headers = blob.calls.last.request.headers
    assert headers["Authorization"] == "Bearer registry-token"
    assert headers["User-Agent"] == f"ollama-pull/{__version__}"
    assert headers["Accept-Encoding"] == "identity"


async def test_blob_gets_go_straight_to_a_repository_that_answered_without_a_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = make_model(10, 20)
    digests = [layer.digest for layer in model.layers]
    sends = CountingSends(monkeypatch)
    with respx.mock(using="httpcore2") as router:
        router.get(f"{BASE}/manifests/tag").respond(200, content=model.manifest.raw)
        blobs = [router.get(f"{BASE}/blobs/{digest}").respond(200, content=model.blobs[digest]) for digest in digests]
        registry = registry_for(router)
        async with registry.client:
            await registry.fetch_manifest(REF)
            for digest in digests:
                async with registry.stream_blob(REF, digest) as response:
                    assert await response.aread() == model.blobs[digest]
    # The manifest went out bare and was answered: no blob needs the client's auth flow to find that out again.
    assert sends.urls == [f"{BASE}/manifests/tag"]
    assert all("Authorization" not in blob.calls.last.request.headers for blob in blobs)


async def test_a_repository_that_starts_asking_for_a_token_mid_pull_gets_one(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model(10, 20)
    first, second, third = (layer.digest for layer in model.layers)
    sends = CountingSends(monkeypatch)
    locked = False

    def blob(request: httpx.Request) -> httpx.Response:
        if locked and request.headers.get("Authorization") != "Bearer registry-token":
            return unauthorized()
        return httpx.Response(200, content=model.blobs[request.url.path.rsplit("/", 1)[1]])

    with respx.mock(using="httpcore2") as router:
        token = router.get("https://auth.test/token").respond(200, json={"token": "registry-token"})
        router.get(f"{BASE}/manifests/tag").respond(200, content=model.manifest.raw)
        route = router.route(method="GET", path__startswith="/v2/ns/model/blobs/").mock(side_effect=blob)
        registry = registry_for(router)
        async with registry.client:
            await registry.fetch_manifest(REF)
            async with registry.stream_blob(REF, first) as response:
                assert await response.aread() == model.blobs[first]
            locked = True
            for digest in (second, third):
                async with registry.stream_blob(REF, digest) as response:
                    assert response.status_code == 200
                    assert await response.aread() == model.blobs[digest]
    # The bare blob GET's 401 hands the second blob to the auth flow, which fetches the token; the third blob
    # carries it straight away.
    assert sends.urls == [f"{BASE}/manifests/tag", f"{BASE}/blobs/{second}"]
    assert token.call_count == 1
    assert route.calls.last.request.headers["Authorization"] == "Bearer registry-token"
    assert route.call_count == 5


async def test_blob_gets_follow_redirects_and_keep_the_token_on_the_registry_host_only() -> None:
    digest = "sha256:" + "0" * 64
    with respx.mock(using="httpcore2") as router:
        router.get("https://auth.test/token").respond(200, json={"token": "registry-token"})
        router.get(f"{BASE}/manifests/tag").mock(side_effect=[unauthorized(), httpx.Response(200, json={})])
        router.get(f"{BASE}/blobs/{digest}").respond(307, headers={"Location": "/v2/ns/model/moved"})
        moved = router.get(f"{BASE}/moved").respond(302, headers={"Location": "https://cdn.test/blob?sig=1"})
        cdn = router.get("https://cdn.test/blob").respond(200, content=b"bytes")
        registry = registry_for(router)
        async with registry.client:
            with pytest.raises(InvalidManifest):
                await registry.fetch_manifest(REF)  # enough to cache the token
            async with registry.stream_blob(REF, digest, offset=2) as response:
                assert await response.aread() == b"bytes"
    assert moved.calls.last.request.headers["Authorization"] == "Bearer registry-token"
    request = cdn.calls.last.request
    assert "Authorization" not in request.headers
    assert request.headers["Range"] == "bytes=2-"


@pytest.mark.parametrize(
    ("location", "error"),
    [
        ("https://registry.test/v2/ns/model/blobs/sha256:" + "0" * 64, httpx2.TooManyRedirects),
        ("ftp://cdn.test/blob", httpx2.UnsupportedProtocol),
    ],
)
async def test_blob_gets_refuse_endless_and_non_http_redirects(location: str, error: type[Exception]) -> None:
    digest = "sha256:" + "0" * 64
    with respx.mock(using="httpcore2") as router:
        route = router.get(f"{BASE}/blobs/{digest}").respond(302, headers={"Location": location})
        registry = registry_for(router)
        auth = registry.client.auth
        assert isinstance(auth, RegistryAuth)
        # A token the auth flow got earlier (written here as only the flow writes it otherwise): blob GETs go direct.
        auth._headers[_cache_key(httpx2.URL(f"{BASE}/blobs/{digest}"))] = "Bearer cached"
        async with registry.client:
            with pytest.raises(error):
                async with registry.stream_blob(REF, digest):
                    pass
    assert route.call_count == (registry.client.max_redirects + 1 if error is httpx2.TooManyRedirects else 1)


async def test_a_client_holding_cookies_sends_blob_gets_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    digest = "sha256:" + "0" * 64
    sends = CountingSends(monkeypatch)
    with respx.mock(using="httpcore2") as router:
        blob = router.get(f"{BASE}/blobs/{digest}").respond(200, content=b"bytes")
        registry = registry_for(router)
        auth = registry.client.auth
        assert isinstance(auth, RegistryAuth)
        auth._headers[_cache_key(httpx2.URL(f"{BASE}/blobs/{digest}"))] = "Bearer cached"
        registry.client.cookies.set("session", "abc", domain="registry.test")
        async with registry.client, registry.stream_blob(REF, digest) as response:
            assert await response.aread() == b"bytes"
    assert sends.urls == [f"{BASE}/blobs/{digest}"]
    assert blob.calls.last.request.headers["Cookie"] == "session=abc"


@pytest.mark.parametrize(
    ("answer", "restart", "integrity", "wait", "reason"),
    [
        # Each row: what the server answered a request for bytes 5-, and how the registry client judges it.
        (httpx.Response(416), True, False, None, "cannot resume this blob (HTTP 416)"),
        (httpx.Response(503, headers={"Retry-After": "7"}), False, False, 7.0, "HTTP 503"),
        (httpx.Response(206, headers={"Content-Encoding": "gzip"}), False, True, None, "compressed the blob"),
        (httpx.Response(206, headers={"Content-Range": "bytes 0-9/10"}), True, False, None, "wrong offset (0, not 5)"),
    ],
)
async def test_a_blob_response_is_judged_by_the_registry_client_before_it_is_handed_over(
    answer: httpx.Response, restart: bool, integrity: bool, wait: float | None, reason: str
) -> None:
    digest = "sha256:" + "0" * 64
    with respx.mock(using="httpcore2") as router:
        router.get(f"{BASE}/blobs/{digest}").mock(return_value=answer)
        registry = registry_for(router)
        async with registry.client:
            with pytest.raises(UnusableBlobResponse) as caught:
                async with registry.stream_blob(REF, digest, offset=5):
                    pass
    assert (caught.value.restart, caught.value.integrity, caught.value.wait) == (restart, integrity, wait)
    assert reason in caught.value.reason
