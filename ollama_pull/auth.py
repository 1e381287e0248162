"""Registry authentication: answer a ``WWW-Authenticate: Bearer`` challenge with a token, on demand.

The first request goes out anonymously, as Ollama's does; a 401 that carries a Bearer challenge makes us fetch a
token from the realm and send the request again. Tokens are cached per repository. When a cached token expires,
the next 401 refreshes it once; concurrent downloads that hit the same 401 wait for that one refresh instead of
each asking for a token. Tokens never leave this module except in the ``Authorization`` header.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import httpx

from .errors import AuthenticationError, RegistryError

_PARAM = re.compile(r'(\w+)\s*=\s*(?:"([^"]*)"|([^\s,]*))')
_REPOSITORY = re.compile(r"^/v2/(.+)/(?:manifests|blobs)/")


@dataclass(frozen=True)
class BearerChallenge:
    realm: str
    service: str | None
    scopes: tuple[str, ...]


def parse_challenge(header: str) -> BearerChallenge | None:
    """The Bearer challenge in a ``WWW-Authenticate`` value, or None when it is another scheme or has no realm."""
    scheme, _, params = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    values = {key.lower(): quoted or bare for key, quoted, bare in _PARAM.findall(params)}
    realm = values.get("realm")
    if not realm:
        return None
    return BearerChallenge(realm=realm, service=values.get("service"), scopes=tuple(values.get("scope", "").split()))


class RegistryAuth(httpx.Auth):
    """An httpx auth flow for OCI registries' token authentication."""

    def __init__(self) -> None:
        self._tokens: dict[str, str] = {}
        self._refresh = asyncio.Lock()

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        key = _cache_key(request.url)
        token = self._tokens.get(key)
        if token is not None:
            request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code != 401:
            return
        challenge = parse_challenge(response.headers.get("WWW-Authenticate", ""))
        if challenge is None:
            return
        async with self._refresh:
            # Another download may have refreshed the token while we waited for the lock: use its token.
            if self._tokens.get(key) == token:
                token_response = yield _token_request(challenge, request)
                await token_response.aread()
                self._tokens[key] = _token_from(token_response, challenge)
            token = self._tokens[key]
        request.headers["Authorization"] = f"Bearer {token}"
        yield request


def _cache_key(url: httpx.URL) -> str:
    match = _REPOSITORY.match(url.path)
    return f"{url.host}:{url.port}/{match.group(1) if match else ''}"


def _token_request(challenge: BearerChallenge, original: httpx.Request) -> httpx.Request:
    params: list[tuple[str, str | int | float | bool | None]] = []
    if challenge.service:
        params.append(("service", challenge.service))
    params.extend(("scope", scope) for scope in challenge.scopes)
    url = httpx.URL(challenge.realm)
    if url.scheme not in ("http", "https"):
        raise AuthenticationError(f"the registry's token realm is not an HTTP URL: {challenge.realm!r}")
    return httpx.Request(
        "GET",
        url.copy_merge_params(params),
        headers={"User-Agent": original.headers.get("User-Agent", ""), "Accept": "application/json"},
    )


def _token_from(response: httpx.Response, challenge: BearerChallenge) -> str:
    where = httpx.URL(challenge.realm).host
    if response.status_code in (401, 403):
        raise AuthenticationError(
            f"the token service at {where} refused access (HTTP {response.status_code}): "
            "the model may be private, or your credentials wrong"
        )
    if response.status_code != 200:
        raise RegistryError(f"the token service at {where} answered HTTP {response.status_code}")
    try:
        body = response.json()
    except ValueError as exc:
        raise RegistryError(f"the token service at {where} answered something that is not JSON") from exc
    token = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
    if not isinstance(token, str) or not token:
        raise RegistryError(f"the token service at {where} answered without a token")
    return token
