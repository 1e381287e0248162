"""Ollama's signed token requests: the user's ed25519 key (``~/.ollama/id_ed25519``) proves who asks.

registry.ollama.ai answers a token request that carries ``ts`` and ``nonce`` parameters and an
``Authorization: <public key>:<signature>`` header, where the signature (ed25519) covers
``GET,<token url>,<base64 of the hex SHA-256 of the empty body>``. This is how ``ollama pull`` reaches private
models; without the key, requests stay anonymous.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlencode

from .errors import AuthenticationError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

_EMPTY_BODY = base64.b64encode(hashlib.sha256(b"").hexdigest().encode()).decode()


def default_key_path() -> Path:
    return Path.home() / ".ollama" / "id_ed25519"


@dataclass(frozen=True)
class OllamaKey:
    private_key: Ed25519PrivateKey = field(repr=False)
    public_key: str  # the base64 field of the OpenSSH public key line, as Ollama sends it

    @classmethod
    def load(cls, path: Path) -> OllamaKey | None:
        """The key at ``path``, None when there is none; a file that is not an ed25519 key is an error."""
        # Imported here, not at the top: cryptography adds about 10 MiB to every pull's memory, and only pulls
        # that meet an Ollama token challenge with a key on disk need it.
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise AuthenticationError(f"cannot read the Ollama key {path}: {exc.strerror}") from exc
        try:
            key = serialization.load_ssh_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise AuthenticationError(f"{path} is not an unencrypted OpenSSH private key: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise AuthenticationError(f"{path} is not an ed25519 key, which the Ollama registry expects")
        line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        return cls(private_key=key, public_key=line.split()[1].decode("ascii"))

    def authorization(self, url: str) -> str:
        """The ``Authorization`` value that signs a GET of ``url``."""
        signature = self.private_key.sign(f"GET,{url},{_EMPTY_BODY}".encode())
        return f"{self.public_key}:{base64.b64encode(signature).decode('ascii')}"


def signed_token_url(
    realm: str, service: str | None, scopes: tuple[str, ...], *, now: float | None = None, nonce: str | None = None
) -> str:
    """The token URL with ``ts`` and ``nonce``, query keys sorted as Ollama's Go client encodes them."""
    params: list[tuple[str, str]] = [("nonce", nonce or base64.urlsafe_b64encode(secrets.token_bytes(16)).decode())]
    params += [("scope", scope) for scope in scopes]
    if service:
        params.append(("service", service))
    params.append(("ts", str(int(time.time() if now is None else now))))
    return f"{realm}{'&' if '?' in realm else '?'}{urlencode(params)}"
