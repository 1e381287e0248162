"""Registry credentials, found where other registry tools look: the environment, then docker's config file."""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

USERNAME_VARIABLE = "OLLAMA_PULL_USERNAME"
PASSWORD_VARIABLE = "OLLAMA_PULL_PASSWORD"


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    def basic_header(self) -> str:
        pair = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")


CredentialLookup = Callable[[str], "Credentials | None"]


def find_credentials(host: str, environ: Mapping[str, str] = os.environ) -> Credentials | None:
    """Credentials for ``host`` (``name[:port]``): ``$OLLAMA_PULL_USERNAME``/``$OLLAMA_PULL_PASSWORD`` for every
    registry, else the ``auths`` entry for the host in ``$DOCKER_CONFIG/config.json`` (``~/.docker``)."""
    username = environ.get(USERNAME_VARIABLE, "")
    if username:
        return Credentials(username, environ.get(PASSWORD_VARIABLE, ""))
    directory = environ.get("DOCKER_CONFIG") or str(Path.home() / ".docker")
    return _from_docker_config(Path(directory) / "config.json", host)


def _from_docker_config(path: Path, host: str) -> Credentials | None:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        # No config, or one we cannot read: the same as no credentials, as for docker itself.
        return None
    auths = config.get("auths") if isinstance(config, dict) else None
    if not isinstance(auths, dict):
        return None
    for key, entry in auths.items():
        if _registry_host(key) != host or not isinstance(entry, dict):
            continue
        if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
            return Credentials(entry["username"], entry["password"])
        encoded = entry.get("auth")
        if isinstance(encoded, str):
            try:
                username, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                continue
            if username:
                return Credentials(username, password)
    return None


def _registry_host(key: str) -> str:
    """docker config keys may be ``host``, ``https://host`` or ``https://host/v1/``: keep only the host."""
    return key.split("://", 1)[-1].split("/", 1)[0]
