"""Model references, parsed the way Ollama parses them (types/model/name.go)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidReference

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

_HOST_MAX = 350
_PART_MAX = 80
# The first character can never be "." or "-", which also rules out ".." and hidden names in store paths.
_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
_NAMESPACE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")
_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-:]*")


@dataclass(frozen=True)
class ModelReference:
    """A fully qualified model name: every part present, every part valid.

    ``scheme`` is ``"http"`` or ``"https"`` when the reference was written as a URL (``http://host/ns/model``), and
    then says how to reach that registry; None leaves it to the caller (``--insecure``). It is never part of the
    name: the model is stored without it, as Ollama stores it.
    """

    host: str
    namespace: str
    model: str
    tag: str
    scheme: str | None = None

    @property
    def repository(self) -> str:
        """The registry's repository name, as used in ``/v2/<repository>/...`` URLs and token scopes."""
        return f"{self.namespace}/{self.model}"

    def __str__(self) -> str:
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    @property
    def short(self) -> str:
        """The name as a user would type it, without the defaults."""
        name = self.model if self.namespace == DEFAULT_NAMESPACE else self.repository
        if self.host != DEFAULT_HOST:
            name = f"{self.host}/{self.repository}"
        return f"{name}:{self.tag}"

    @property
    def name(self) -> str:
        """The name for messages: like :attr:`short`, but keeping the namespace (``library/flux2-klein:latest``),
        so that what a message names is what a user can search for."""
        name = self.repository if self.host == DEFAULT_HOST else f"{self.host}/{self.repository}"
        return f"{name}:{self.tag}"


def parse_reference(text: str) -> ModelReference:
    """Parse ``[scheme://][host[:port]/][namespace/]model[:tag]``; raise :class:`InvalidReference` otherwise.

    As in Ollama, ``http://host:port/namespace/model:tag`` names that registry over plain HTTP; the scheme is cut
    off the name (Ollama's ``ParseNameBare``), so the model is stored under ``host:port/namespace/model``.
    """
    if not text or text != text.strip():
        raise InvalidReference(text, "empty or surrounded by white space")
    if "@" in text:
        raise InvalidReference(text, "digest references (model@sha256:...) are not supported; use a tag")

    scheme, separator, bare = text.partition("://")
    if not separator:
        scheme, bare = "", text
    elif scheme not in ("http", "https"):
        raise InvalidReference(text, f"the scheme {scheme!r} is not http or https")

    rest, tag = bare, DEFAULT_TAG
    colon = bare.rfind(":")
    if colon > bare.rfind("/"):
        rest, tag = bare[:colon], bare[colon + 1 :]

    parts = rest.split("/")
    if len(parts) > 3:
        raise InvalidReference(text, "too many '/' parts; expected [host/][namespace/]model[:tag]")
    if ":" in parts[-1]:
        tags = " and ".join(repr(":" + part) for part in bare.rsplit("/", 1)[-1].split(":")[1:])
        raise InvalidReference(text, f"it has two tags ({tags}); a reference has at most one")
    if len(parts) == 2 and _HOST.fullmatch(parts[0]) and ("." in parts[0] or parts[0].partition(":")[2].isdigit()):
        raise InvalidReference(
            text,
            f"{parts[0]!r} is a registry host without a namespace; write {parts[0]}/<namespace>/{parts[1]} "
            f"(on Ollama's registry, library/{parts[1]})",
        )
    if scheme and len(parts) < 3:
        raise InvalidReference(text, f"with {scheme}://, name the registry in full: {scheme}://host/namespace/model")
    host = parts[-3] if len(parts) == 3 else DEFAULT_HOST
    namespace = parts[-2] if len(parts) >= 2 else DEFAULT_NAMESPACE
    model = parts[-1]

    _check(text, "host", host, _HOST, _HOST_MAX)
    _check(text, "namespace", namespace, _NAMESPACE, _PART_MAX)
    _check(text, "model", model, _PART, _PART_MAX)
    _check(text, "tag", tag, _PART, _PART_MAX)
    return ModelReference(host=host, namespace=namespace, model=model, tag=tag, scheme=scheme or None)


def _check(text: str, what: str, value: str, pattern: re.Pattern[str], limit: int) -> None:
    if not value:
        raise InvalidReference(text, f"the {what} is empty")
    if len(value) > limit:
        raise InvalidReference(text, f"the {what} is longer than {limit} characters")
    if not pattern.fullmatch(value):
        allowed = "letters, digits, '_', '-'"
        if pattern is _HOST:
            allowed += ", '.', ':'"
        elif pattern is _PART:
            allowed += ", '.'"
        raise InvalidReference(
            text, f"the {what} {value!r} must start with a letter, digit or '_' and contain only {allowed}"
        )
