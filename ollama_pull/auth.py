"""Registry authentication: answer a ``WWW-Authenticate`` challenge (Bearer token or Basic), on demand.

The first request goes out anonymously, as Ollama's does; a 401 that carries a Bearer challenge makes us fetch a
token from the realm and send the request again. Tokens are cached per repository. When a cached token expires,
the next 401 refreshes it; concurrent downloads that hit the same 401 wait for that one refresh instead of each
asking for a token. A token may expire again before a waiting download gets to use it (a token good for a few
uses, many downloads in flight): a 401 on a token fetched for another request refreshes again, up to
``MAX_AUTH_TRIES`` sends of one request, while a 401 on a token fetched for this very request is final. A
repository that answered a request sent without credentials is remembered as anonymous until it answers with a
401, so that a blob GET may go out bare without the flow (see :meth:`RegistryAuth.cached_header`). The token
request carries the timeouts of the request it serves. A Basic challenge is answered with the configured
credentials (see :mod:`ollama_pull.credentials`), which also go to the token service when there is one. Tokens
and credentials never leave this module except in ``Authorization`` headers, and httpx2 drops those on a redirect
to another host.
"""

from __future__ import annotations

import asyncio
import enum
import re
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import httpx2

from .credentials import CredentialLookup, Credentials, find_credentials
from .errors import AuthenticationError, RegistryError, TokenServiceError
from .huggingface import access_hint, is_hugging_face
from .retry import RETRYABLE_STATUS, TOKEN_SERVICE
from .signing import OllamaKey, default_key_path, signed_token_url


class _Unknown(enum.Enum):
    UNKNOWN = enum.auto()


# What :meth:`RegistryAuth.cached_header` answers for a repository that has not answered a request yet.
UNKNOWN: Final = _Unknown.UNKNOWN

PresetHeader = Callable[[httpx2.URL], "str | None"]

_PARAM = re.compile(r'(\w+)\s*=\s*(?:"([^"]*)"|([^\s,]*))')
_REPOSITORY = re.compile(r"^/v2/(.+)/(?:manifests|blobs)/")
# Sends of one request, the first included, as Ollama's own resolver bounds its retries on 401.
MAX_AUTH_TRIES = 10
# Sends with tokens other requests fetched, after which a request fetches its own for the last send.
_SHARED_TRIES = MAX_AUTH_TRIES - 1


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

    def __init__(
        self,
        credentials: CredentialLookup = find_credentials,
        key_path: Path | None = None,
        preset: PresetHeader = lambda _url: None,
    ) -> None:
        self._credentials = credentials
        # The Authorization value a request to a host carries before any challenge (a Hugging Face token).
        self._preset = preset
        self._key_path = key_path
        self._key: OllamaKey | None = None
        self._key_loaded = False
        # The Authorization value that works for a repository: "Bearer <token>" or "Basic <...>".
        self._headers: dict[str, str] = {}
        # Repositories that answered a request sent without credentials with something other than a 401.
        self._anonymous: set[str] = set()
        self._refresh = asyncio.Lock()
        # The host of the token service a token request is waiting on, if any: what a stalled request waits for.
        self.awaiting: str | None = None

    async def async_auth_flow(self, request: httpx2.Request) -> AsyncGenerator[httpx2.Request, httpx2.Response]:
        key = _cache_key(request.url)
        # In line behind a refresh under way and the downloads waiting for it: a download that has not waited yet
        # must not use up the new token before them, or one unlucky download could lose every round.
        async with self._refresh:
            sent = self._headers.get(key)
        for tries in range(1, MAX_AUTH_TRIES + 1):
            # Until a challenge has been answered, what a host is given before any challenge (a Hugging Face token).
            carried = sent or self._preset(request.url)
            if carried is not None:
                request.headers["Authorization"] = carried
            response = yield request
            if response.status_code != 401:
                if "Authorization" not in request.headers:
                    self._anonymous.add(key)
                return
            self._anonymous.discard(key)
            # httpx2 reads the 401's body only after this flow goes on: read before waiting for the refresh, so that
            # its connection goes back to the pool for the token request, instead of dozens of waiting downloads
            # holding every connection the refresh needs.
            await response.aread()
            async with self._refresh:
                current = self._headers.get(key)
                # Nobody refreshed since we sent: ours is the one refresh the others wait for. A download that kept
                # losing the race for shared tokens (one that waited for a connection, say) asks for its own.
                if current == sent or tries >= _SHARED_TRIES:
                    header = response.headers.get("WWW-Authenticate", "")
                    credentials = self._credentials(request.url.netloc.decode("ascii"))
                    challenge = parse_challenge(header)
                    if challenge is not None:
                        self.awaiting = httpx2.URL(challenge.realm).host
                        try:
                            token_response = yield _token_request(
                                challenge, request, credentials, self._ollama_key(), self._preset
                            )
                            await token_response.aread()
                        finally:
                            self.awaiting = None
                        fresh = "Bearer " + _token_from(token_response, challenge)
                    elif header.strip().lower().startswith("basic") and credentials is not None and carried is None:
                        fresh = credentials.basic_header()
                    else:
                        # Refused credentials, or no way to answer: the caller reports the 401.
                        return
                    request.headers["Authorization"] = fresh
                    try:
                        # The others see the new value only once this request has used it: a 401 now is about
                        # this request, not a token used up by its siblings, and final.
                        yield request
                    finally:
                        self._headers[key] = fresh
                    return
            # Another download refreshed while we waited, or while our request was in flight; by the time we send,
            # its token may be used up too, so a 401 on it goes round again.
            sent = current

    def cached_header(self, url: httpx2.URL) -> str | _Unknown | None:
        """The ``Authorization`` value a request to ``url`` carries before any challenge: the one that last worked
        for its repository, else the host's preset (a Hugging Face token); None when the repository answered
        without one; :data:`UNKNOWN` until it has answered at all, when only the flow can learn what it wants."""
        key = _cache_key(url)
        header = self._headers.get(key) or self._preset(url)
        if header is None and key not in self._anonymous:
            return UNKNOWN
        return header

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
    challenge: BearerChallenge,
    original: httpx2.Request,
    credentials: Credentials | None,
    key: OllamaKey | None,
    preset: PresetHeader,
) -> httpx2.Request:
    realm = httpx2.URL(challenge.realm)
    if realm.scheme not in ("http", "https"):
        raise AuthenticationError(f"the registry's token realm is not an HTTP URL: {challenge.realm!r}")
    headers = {"User-Agent": original.headers.get("User-Agent", ""), "Accept": "application/json"}
    # The client's timeouts (connect, read, ...) and a mark by which a failure names the token service.
    extensions = {"timeout": original.extensions.get("timeout", {}), TOKEN_SERVICE: realm.host}
    # The Ollama key signs only for a realm on the registry's own host, as Ollama insists: a signature is never
    # handed to another host, which then gets the plain request any registry client would send.
    if key is not None and realm.netloc == original.url.netloc:
        url = signed_token_url(challenge.realm, challenge.service, challenge.scopes)
        headers["Authorization"] = key.authorization(url)
        return httpx2.Request("GET", url, headers=headers, extensions=extensions)
    params: list[tuple[str, str | int | float | bool | None]] = []
    if challenge.service:
        params.append(("service", challenge.service))
    params.extend(("scope", scope) for scope in challenge.scopes)
    if credentials is not None:
        headers["Authorization"] = credentials.basic_header()
    elif (header := preset(realm)) is not None:
        headers["Authorization"] = header
    return httpx2.Request("GET", realm.copy_merge_params(params), headers=headers, extensions=extensions)


def _token_from(response: httpx2.Response, challenge: BearerChallenge) -> str:
    where = httpx2.URL(challenge.realm).host
    if response.status_code in (401, 403) and is_hugging_face(where):
        raise AuthenticationError(
            f"Hugging Face's token service refused access (HTTP {response.status_code}): {access_hint()}"
        )
    if response.status_code in (401, 403):
        raise AuthenticationError(
            f"the token service at {where} refused access (HTTP {response.status_code}): "
            "the model may be private, or your credentials wrong"
        )
    if response.status_code in RETRYABLE_STATUS:
        raise TokenServiceError(f"the token service at {where} answered HTTP {response.status_code}")
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
