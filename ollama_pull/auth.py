"""Registry authentication: answer a ``WWW-Authenticate`` challenge (Bearer token or Basic), on demand.

The first request goes out anonymously, as Ollama's does; a 401 that carries a Bearer challenge makes us fetch a
token from the realm and send the request again. Tokens are cached per repository. When a cached token expires,
the next 401 refreshes it once; concurrent downloads that hit the same 401 wait for that one refresh instead of
each asking for a token. A Basic challenge is answered with the configured credentials (see
:mod:`ollama_pull.credentials`), which also go to the token service when there is one. Tokens and credentials
never leave this module except in ``Authorization`` headers, and httpx2 drops those on a redirect to another host.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path

import httpx2

from .credentials import CredentialLookup, Credentials, find_credentials
from .errors import AuthenticationError, RegistryError
from .signing import OllamaKey, default_key_path, signed_token_url

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


class RegistryAuth(httpx2.Auth):
    """An httpx2 auth flow for OCI registries: token authentication, or Basic where the registry asks for it."""

    def __init__(self, credentials: CredentialLookup = find_credentials, key_path: Path | None = None) -> None:
        self._credentials = credentials
        self._key_path = key_path
        self._key: OllamaKey | None = None
        self._key_loaded = False
        # The Authorization value that works for a repository: "Bearer <token>" or "Basic <...>".
        self._headers: dict[str, str] = {}
        self._refresh = asyncio.Lock()

    async def async_auth_flow(self, request: httpx2.Request) -> AsyncGenerator[httpx2.Request, httpx2.Response]:
        key = _cache_key(request.url)
        sent = self._headers.get(key)
        if sent is not None:
            request.headers["Authorization"] = sent
        response = yield request
        if response.status_code != 401:
            return
        header = response.headers.get("WWW-Authenticate", "")
        async with self._refresh:
            # Another download may have refreshed the header while we waited for the lock: use what it got.
            if self._headers.get(key) == sent:
                credentials = self._credentials(request.url.netloc.decode("ascii"))
                challenge = parse_challenge(header)
                if challenge is not None:
                    token_response = yield _token_request(challenge, request, credentials, self._ollama_key())
                    await token_response.aread()
                    self._headers[key] = "Bearer " + _token_from(token_response, challenge)
                elif header.strip().lower().startswith("basic") and credentials is not None and sent is None:
                    self._headers[key] = credentials.basic_header()
                else:
                    # Refused credentials, or no way to answer: the caller reports the 401.
                    return
            request.headers["Authorization"] = self._headers[key]
        yield request

    def _ollama_key(self) -> OllamaKey | None:
        # Read once, at the first challenge: anonymous pulls never touch the key.
        if not self._key_loaded:
            self._key = OllamaKey.load(self._key_path or default_key_path())
            self._key_loaded = True
        return self._key


def _cache_key(url: httpx2.URL) -> str:
    match = _REPOSITORY.match(url.path)
    return f"{url.host}:{url.port}/{match.group(1) if match else ''}"


def _token_request(
    challenge: BearerChallenge, original: httpx2.Request, credentials: Credentials | None, key: OllamaKey | None
) -> httpx2.Request:
    realm = httpx2.URL(challenge.realm)
    if realm.scheme not in ("http", "https"):
        raise AuthenticationError(f"the registry's token realm is not an HTTP URL: {challenge.realm!r}")
    headers = {"User-Agent": original.headers.get("User-Agent", ""), "Accept": "application/json"}
    # The Ollama key signs only for a realm on the registry's own host, as Ollama insists: a signature is never
    # handed to another host, which then gets the plain request any registry client would send.
    if key is not None and realm.netloc == original.url.netloc:
        url = signed_token_url(challenge.realm, challenge.service, challenge.scopes)
        headers["Authorization"] = key.authorization(url)
        return httpx2.Request("GET", url, headers=headers)
    params: list[tuple[str, str | int | float | bool | None]] = []
    if challenge.service:
        params.append(("service", challenge.service))
    params.extend(("scope", scope) for scope in challenge.scopes)
    if credentials is not None:
        headers["Authorization"] = credentials.basic_header()
    return httpx2.Request("GET", realm.copy_merge_params(params), headers=headers)


def _token_from(response: httpx2.Response, challenge: BearerChallenge) -> str:
    where = httpx2.URL(challenge.realm).host
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
