"""The real CNCF distribution registry (Debian's ``docker-registry``) on 127.0.0.1, and a pusher for its v2 API.

The fault-injecting registry is ours, so it can share a misreading of the spec with the client; this one is the
reference implementation that Docker Hub and most private registries descend from. Tests start it like this::

    with DistributionRegistry(users={"tester": "secret"}) as registry:
        manifest, blobs = push_model(registry.url, "library/demo", "v1", layers=[...], config=b"{}",
                                     auth=("tester", "secret"))
        ...  # run ollama-pull against f"{registry.host}/library/demo:v1"

Plain HTTP only: the CLI reaches it with ``--insecure``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any
from urllib.parse import urljoin

import httpx2

from tests.fault_registry import build_manifest

__all__ = [
    "MANIFEST_MEDIA_TYPE",
    "AccessRecord",
    "DistributionRegistry",
    "Layer",
    "PushRejected",
    "RegistryStartError",
    "manifest_bytes",
    "push_model",
    "sha256_digest",
]

MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"

# The registry usually answers within a few hundred milliseconds; ten seconds covers a loaded CI machine.
START_DEADLINE = 10.0
# Binding port 0 then closing leaves a window in which another process can take the port: try a few more.
START_ATTEMPTS = 5
STOP_GRACE = 5.0
REALM = "ollama-pull tests"
# The access log is in Apache's combined format: 127.0.0.1 - - [date] "GET /v2/ HTTP/1.1" 401 87 "" "agent"
_ACCESS_LINE = re.compile(
    r'^\S+ \S+ \S+ \[[^]]*\] "(?P<method>\S+) (?P<path>\S+) [^"]*" (?P<status>\d{3}) \S+ "[^"]*" "(?P<agent>[^"]*)"'
)


class RegistryStartError(RuntimeError):
    """docker-registry exited or never answered; the message ends with its log."""


class PushRejected(RuntimeError):
    """The registry refused part of a push; ``body`` is its answer verbatim, to report exactly what it said."""

    def __init__(self, what: str, status: int, body: str) -> None:
        self.what = what
        self.status = status
        self.body = body
        super().__init__(f"the registry refused {what}: HTTP {status}: {body}")


@dataclass(frozen=True)
class AccessRecord:
    """One request as the registry's access log shows it."""

    method: str
    path: str
    status: int
    user_agent: str


@dataclass(frozen=True)
class Layer:
    """One layer of an Ollama manifest; ``name`` becomes the descriptor's ``name`` field when given."""

    media_type: str
    data: bytes
    name: str | None = None


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def bcrypt_htpasswd(users: Mapping[str, str]) -> str:
    """An htpasswd file's text; docker-registry accepts only bcrypt entries in it."""
    # Imported here so tests that need no auth run without bcrypt installed.
    import bcrypt

    return "".join(
        f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()}\n"
        for user, password in users.items()
    )


class DistributionRegistry:
    """``docker-registry serve`` as a subprocess: filesystem storage in a temp dir, plain HTTP on 127.0.0.1.

    ``users`` turns on htpasswd Basic auth; ``remote_url`` turns the registry into a pull-through cache of that
    upstream (read-only: pushes are refused in that mode), with ``remote_credentials`` for a private upstream.
    docker-registry 2.8 sends those only to an upstream that asks for a Bearer token, never in answer to a Basic
    challenge (distribution/distribution#3153): an htpasswd-protected upstream looks empty to the cache.
    """

    def __init__(
        self,
        *,
        users: Mapping[str, str] | None = None,
        remote_url: str | None = None,
        remote_credentials: tuple[str, str] | None = None,
        binary: str = "docker-registry",
    ) -> None:
        found = shutil.which(binary)
        if found is None:
            raise RegistryStartError(f"{binary} is not installed (Debian package docker-registry)")
        self.binary = found
        self.users = dict(users or {})
        self.remote_url = remote_url
        self.remote_credentials = remote_credentials
        self._tempdir = tempfile.TemporaryDirectory(prefix="distribution-")
        self.root = Path(self._tempdir.name)
        self.storage = self.root / "storage"
        self.config_path = self.root / "config.yml"
        self.log_path = self.root / "registry.log"
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def host(self) -> str:
        """The registry as a model reference names it: ``127.0.0.1:<port>``."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def log(self) -> str:
        """Everything docker-registry wrote so far: its own log and the access log with each request's status."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def requests(self, user_agent: str = "", *, at_least: int = 0, timeout: float = 2.0) -> list[AccessRecord]:
        """Requests answered so far, oldest first; only those whose User-Agent starts with ``user_agent``.

        The access log line is written just after the response, so a client can be done before its last request
        is logged: ``at_least`` waits up to ``timeout`` seconds for that many records.
        """
        deadline = time.monotonic() + timeout
        while True:
            records = [
                AccessRecord(match["method"], match["path"], int(match["status"]), match["agent"])
                for match in map(_ACCESS_LINE.match, self.log().splitlines())
                if match and match["agent"].startswith(user_agent)
            ]
            if len(records) >= at_least or time.monotonic() >= deadline:
                return records
            time.sleep(0.02)

    def config(self) -> dict[str, Any]:
        """The configuration the registry runs with, after Debian's /etc/docker/registry/config.yml."""
        config: dict[str, Any] = {
            "version": "0.1",
            # Warnings and errors only; the access log (on stdout, also kept) still shows every request's status.
            "log": {"level": "warn", "formatter": "text", "fields": {"service": "registry"}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "cache": {"blobdescriptor": "inmemory"},
                "delete": {"enabled": True},
                # The purger is a background job that only adds noise and disk activity to a short-lived registry.
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {
                "addr": f"127.0.0.1:{self.port}",
                # Without a secret the registry makes up one and warns; upload state is signed with it.
                "secret": secrets.token_hex(16),
                "headers": {"X-Content-Type-Options": ["nosniff"]},
            },
            # The default storage health check would turn /v2/ into 503 after failures; nothing to watch here.
            "health": {"storagedriver": {"enabled": False}},
        }
        if self.users:
            config["auth"] = {"htpasswd": {"realm": REALM, "path": str(self.root / "htpasswd")}}
        if self.remote_url is not None:
            proxy: dict[str, str] = {"remoteurl": self.remote_url}
            if self.remote_credentials is not None:
                proxy["username"], proxy["password"] = self.remote_credentials
            config["proxy"] = proxy
        return config

    def start(self) -> DistributionRegistry:
        if self.users:
            (self.root / "htpasswd").write_text(bcrypt_htpasswd(self.users))
        for attempt in range(1, START_ATTEMPTS + 1):
            self.port = free_port()
            # JSON is YAML, and json.dumps quotes every path and URL safely.
            self.config_path.write_text(json.dumps(self.config(), indent=2))
            # The log keeps every attempt for diagnosis; only this attempt's lines say whether the port was taken.
            logged = len(self.log())
            self._spawn()
            try:
                self._wait_until_ready()
                return self
            except RegistryStartError:
                clash = "address already in use" in self.log()[logged:]
                self.stop()
                if not clash or attempt == START_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        # REGISTRY_* variables override the config file, and a proxy variable would capture the upstream traffic
        # of pull-through mode: the registry gets neither from the developer's environment.
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("REGISTRY_") and "proxy" not in key.lower()
        }
        self._log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            [self.binary, "serve", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.root,
        )

    def _wait_until_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + START_DEADLINE
        with httpx2.Client(trust_env=False, timeout=1.0) as client:
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    raise RegistryStartError(
                        f"docker-registry exited with {self._process.returncode} on port {self.port}:\n{self.log()}"
                    )
                try:
                    if client.get(f"{self.url}/v2/").status_code in (200, 401):
                        return
                except httpx2.TransportError:
                    pass
                time.sleep(0.05)
        raise RegistryStartError(
            f"docker-registry did not answer on port {self.port} within {START_DEADLINE}s:\n{self.log()}"
        )

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        self.stop()
        self._tempdir.cleanup()

    def __enter__(self) -> DistributionRegistry:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


def manifest_bytes(config: bytes, layers: Sequence[Layer]) -> bytes:
    """An Ollama-format image manifest, compact as Ollama writes it."""
    return build_manifest(config, [(layer.media_type, layer.data, layer.name) for layer in layers])


def push_model(
    base_url: str,
    name: str,
    tag: str,
    *,
    layers: Sequence[Layer],
    config: bytes,
    auth: tuple[str, str] | None = None,
) -> tuple[bytes, dict[str, bytes]]:
    """Push a model through the registry's own upload API; return the manifest bytes and every blob by digest.

    Each blob goes up as one monolithic upload (POST for a session, then PUT with the digest), then the manifest;
    any refusal raises PushRejected with the registry's answer.
    """
    blobs = {sha256_digest(config): config} | {sha256_digest(layer.data): layer.data for layer in layers}
    manifest = manifest_bytes(config, layers)
    with httpx2.Client(base_url=base_url, auth=auth, trust_env=False, timeout=30.0) as client:
        for digest, data in blobs.items():
            started = client.post(f"/v2/{name}/blobs/uploads/")
            if started.status_code != 202:
                raise PushRejected(f"an upload session for {name}", started.status_code, started.text)
            # The registry answers with an absolute URL that already carries its signed _state query.
            location = urljoin(f"{base_url}/", started.headers["Location"])
            separator = "&" if "?" in location else "?"
            stored = client.put(
                f"{location}{separator}digest={digest}",
                content=data,
                headers={"Content-Type": "application/octet-stream"},
            )
            if stored.status_code != 201:
                raise PushRejected(f"blob {digest}", stored.status_code, stored.text)
        answer = client.put(
            f"/v2/{name}/manifests/{tag}", content=manifest, headers={"Content-Type": MANIFEST_MEDIA_TYPE}
        )
        if answer.status_code != 201:
            raise PushRejected(f"the manifest of {name}:{tag}", answer.status_code, answer.text)
    return manifest, blobs
