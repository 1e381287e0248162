"""Hugging Face as a registry: ``hf.co/<user>/<repo>:<quantisation>`` pulls, with the user's Hugging Face token.

hf.co serves GGUF repositories through the same registry API as Ollama's (``ollama pull hf.co/...``). Gated and
private repositories need a token: ``$HF_TOKEN``, else the file ``hf auth login`` writes (``$HF_TOKEN_PATH``, else
``$HF_HOME/token``, else ``~/.cache/huggingface/token``, with ``$XDG_CACHE_HOME`` for ``~/.cache`` as
huggingface_hub has it). It goes out as ``Authorization: Bearer`` over HTTPS to
hf.co and huggingface.co only: httpx2 drops the header when a blob redirects to a CDN host, and a mirror or any other
registry never gets it. The Ollama key keeps working beside it: hf.co's token realm is on hf.co, so a challenge is
still answered with a signed request, as Ollama does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import httpx2

from .reference import ModelReference

TOKEN_VARIABLE = "HF_TOKEN"
HOSTS = frozenset({"hf.co", "huggingface.co"})


def access_hint(page: str = "https://huggingface.co/<user>/<repo>") -> str:
    """How to get access to a gated or private repository; ``page`` is the model's page, where its licence is."""
    return (
        f"set {TOKEN_VARIABLE} to a token of an account with access (or run `hf auth login`), accept the model's "
        f"licence on {page}, or add ~/.ollama/id_ed25519.pub to your Hugging Face account's SSH keys"
    )


def is_hugging_face(host: str) -> bool:
    """Whether ``host`` (``name[:port]``) is Hugging Face's registry."""
    return host.lower() in HOSTS


def find_token(environ: Mapping[str, str] = os.environ) -> str | None:
    """The user's Hugging Face token, looked for where ``huggingface_hub`` looks; None when there is none."""
    token = environ.get(TOKEN_VARIABLE, "").strip()
    if token:
        return token
    # huggingface_hub's own defaults: $HF_HOME is $XDG_CACHE_HOME/huggingface when that is set.
    cache = Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = environ.get("HF_TOKEN_PATH") or str(Path(environ.get("HF_HOME") or cache / "huggingface") / "token")
    try:
        token = Path(path).expanduser().read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        # No token file, or one we cannot read: anonymous, as huggingface_hub would be.
        return None
    return token or None


class HuggingFaceToken:
    """The ``Authorization`` header for a request, when the request goes to Hugging Face over HTTPS.

    The token is read once, at the first request to Hugging Face: pulls from other registries never touch it.
    """

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        self._environ = environ
        self._token: str | None = None
        self._loaded = False

    def __call__(self, url: httpx2.URL) -> str | None:
        if url.scheme != "https" or url.port not in (None, 443) or not is_hugging_face(url.host):
            return None
        if not self._loaded:
            self._token = find_token(self._environ)
            self._loaded = True
        return f"Bearer {self._token}" if self._token else None


def refused_message(reference: ModelReference, status: int, *, token_sent: bool) -> str:
    """What a 401 or 403 from Hugging Face means, ending with how to get access."""
    what = "the token sent was refused" if token_sent else "no token was sent"
    page = f"https://huggingface.co/{reference.repository}"
    return (
        f"Hugging Face refused access to {reference.name} (HTTP {status}, {what}): the model may be gated or "
        f"private: {access_hint(page)}"
    )


def rate_limited_message(model: str, attempts: int, *, token_sent: bool) -> str:
    """What a 429 from Hugging Face that outlasted every retry means."""
    if token_sent:
        fix = "it limits even requests with a token: wait a few minutes and run again"
    else:
        fix = (
            f"anonymous pulls are rate-limited, and a token lifts the limit: set {TOKEN_VARIABLE} or run "
            "`hf auth login`"
        )
    return f"Hugging Face rate-limited the pull of {model} (HTTP 429, tried {attempts} times): {fix}"
