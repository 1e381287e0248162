"""A real OCI distribution v2 registry on 127.0.0.1 that serves models and misbehaves on request.

Integration tests run it in a background thread and point the real CLI at it::

    with FaultRegistry() as registry:
        model = registry.add_synthetic_model("library/demo", blobs=6, blob_size=64 * 1024)
        registry.inject(model.layer_digests[2], Fault("reset", at=0.3))
        ...  # run ollama-pull against f"{registry.host}/library/demo"
        assert len(registry.blob_requests(model.layer_digests[2])) == 2

By hand, ``python -m tests.fault_registry`` (from the repository's root) serves a synthetic model until Ctrl-C;
``--fault`` makes it misbehave (``--help`` lists the kinds), to watch the client retry.

Faults are consumed only by GET requests that would otherwise succeed (200 or 206), never by HEAD, by an auth
challenge, a 404 or a 416: a test that injects one fault then knows exactly which request took it.
For soak tests, ``inject_random`` gives any blob GET without a queued fault a seeded chance of a random one;
``faults_applied`` counts every fault served, queued or random, by kind.
Standard library only, so the test tool never shares a bug with the HTTP stack of the client under test.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import gzip
import hashlib
import json
import random
import re
import secrets
import signal
import socket
import socketserver
import ssl
import struct
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = [
    "FAULT_KINDS",
    "Fault",
    "FaultRegistry",
    "ModelFixture",
    "RequestRecord",
    "build_manifest",
    "main",
    "parse_fault",
]

FAULT_KINDS = (
    "stall_before",
    "stall_during",
    "slow",
    "truncate",
    "reset",
    "corrupt",
    "status",
    "gzip",
    "endless",
    "long_body",
    "lying_length",
    "redirect_loop",
    "redirect_scheme",
    "range_ignored",
)

MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_MEDIA_TYPE = "application/vnd.docker.container.image.v1+json"
TENSOR_MEDIA_TYPE = "application/vnd.ollama.image.tensor"
DEFAULT_CONFIG = b'{"model_format":"safetensors"}'
TOKEN_SERVICE = "fault-registry"
CDN_SIGNATURE = "abc"

# Streamed bodies go out in pieces this size so bytes_sent stays accurate when a client hangs up mid-body.
CHUNK = 64 * 1024
# A "slow" body is written about this many times a second: smooth enough for progress bars and stall detectors.
SLOW_WRITES_PER_SECOND = 20
# serve_forever checks for shutdown this often; it bounds how long stop() takes.
POLL_INTERVAL = 0.05
# Safety net for a client that neither reads nor hangs up; stop() closes live connections itself.
CONNECTION_TIMEOUT = 300.0
# An "endless" body ends here even if the client never hangs up, so a client that reads forever cannot keep a
# server thread busy (and the machine's loopback saturated) for the rest of the test run.
ENDLESS_LIMIT = 64 * 1024 * 1024
# Where "redirect_scheme" sends the client: a scheme no HTTP client can follow, on a host that serves nothing.
UNSUPPORTED_LOCATION = "ftp://127.0.0.1/whatever"
# The query parameter that marks the URLs of a "redirect_loop"; its value names the loop.
LOOP_PARAMETER = "fault-loop"

_V2_PATH = re.compile(r"^/v2/(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<reference>[^/]+)$")
_CDN_PATH = re.compile(r"^/cdn/(?P<digest>[^/]+)$")
_RANGE = re.compile(r"^bytes=(?P<start>\d*)-(?P<end>\d*)$")
_ERROR_CODES = {
    401: "UNAUTHORIZED",
    403: "DENIED",
    404: "NOT_FOUND",
    405: "UNSUPPORTED",
    429: "TOOMANYREQUESTS",
}


@dataclass(frozen=True)
class Fault:
    """One way to misbehave, applied to the next ``times`` matching GET requests.

    Kinds, and the fields each one reads:

    - ``stall_before``: send nothing for ``seconds``, then close.
    - ``stall_during``: send the headers and the first ``at`` of the body, go silent for ``seconds``, then close.
    - ``slow``: send everything at ``rate`` bytes per second.
    - ``truncate``: promise the full length, send the first ``at`` of the body, then close (FIN).
    - ``reset``: like ``truncate``, but abort the connection with a TCP RST.
    - ``corrupt``: flip one byte, at fraction ``at`` of the body; length and headers stay right.
    - ``status``: answer HTTP ``status`` (with ``Retry-After: retry_after`` if given) and an OCI error body.
    - ``gzip``: send the body gzip-compressed with ``Content-Encoding: gzip``, whatever the client accepts.
    - ``endless``: no Content-Length, ``Connection: close``, and random bytes until the client hangs up (or
      ``ENDLESS_LIMIT`` bytes, or ``stop()``).
    - ``long_body``: the real body followed by ``extra`` random bytes, with a Content-Length that counts them:
      valid HTTP framing, but more bytes than the manifest says the blob has.
    - ``lying_length``: a Content-Length ``extra`` bytes larger than the body; send the whole body, then close.
    - ``redirect_loop``: 307 to the same URL plus a ``fault-loop`` query parameter, and from then on 307 from
      that URL to itself, forever. The follow-ups consume nothing: ``times`` counts loops, that is requests
      without the marker (a client's attempts), and a loop stays open until ``clear_faults()`` or ``stop()``.
    - ``redirect_scheme``: 307 to ``UNSUPPORTED_LOCATION`` (an ``ftp://`` URL).
    - ``range_ignored``: answer a ``Range`` request with 200 and the whole body, as servers that do not support
      ranges do. It is consumed by the next matching GET even if that one has no Range header (and then changes
      nothing): inject it when the next request will be a resume.
    """

    kind: str
    times: int = 1
    at: float = 0.5
    seconds: float = 30.0
    rate: int = 65536
    status: int = 503
    retry_after: str | None = None
    extra: int = 65536

    def __post_init__(self) -> None:
        # A typo in a test's fault would otherwise silently serve a healthy response and pass for the wrong reason.
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {', '.join(FAULT_KINDS)}")
        if self.times < 1:
            raise ValueError("times must be at least 1")
        if not 0.0 <= self.at <= 1.0:
            raise ValueError("at must be a fraction between 0 and 1")
        if self.seconds < 0:
            raise ValueError("seconds must not be negative")
        if self.rate < 1:
            raise ValueError("rate must be at least 1 byte per second")
        if not 100 <= self.status <= 599:
            raise ValueError("status must be an HTTP status code")
        if self.extra < 1:
            raise ValueError("extra must be at least 1 byte")


@dataclass(frozen=True)
class RequestRecord:
    """What one request asked for and what it got; a request still being answered shows what was sent so far."""

    method: str
    path: str
    headers: dict[str, str]
    status: int
    range: str | None
    bytes_sent: int
    fault: str | None


@dataclass(frozen=True)
class ModelFixture:
    """A model as the registry serves it, for comparing with what the client stored."""

    name: str
    tag: str
    manifest: bytes
    manifest_digest: str
    config_digest: str
    layer_digests: tuple[str, ...]
    blobs: dict[str, bytes]


@dataclass
class _Entry:
    """The mutable side of a RequestRecord: logged on arrival (to keep arrival order), filled in as it is answered."""

    sequence: int
    method: str
    path: str
    headers: dict[str, str]
    range: str | None
    blob_digest: str | None = None
    status: int = 0
    bytes_sent: int = 0
    fault: str | None = None

    def record(self) -> RequestRecord:
        return RequestRecord(
            method=self.method,
            path=self.path,
            headers=dict(self.headers),
            status=self.status,
            range=self.range,
            bytes_sent=self.bytes_sent,
            fault=self.fault,
        )


@dataclass
class _QueuedFault:
    fault: Fault
    left: int


@dataclass
class _RandomFaults:
    """What ``inject_random`` set up; drawn from only under the registry's lock, so a run can be replayed."""

    rate: float
    kinds: tuple[str | Fault, ...]
    stall_seconds: float
    rng: random.Random

    def draw(self) -> Fault | None:
        if self.rng.random() >= self.rate:
            return None
        choice = self.kinds[self.rng.randrange(len(self.kinds))]
        # Drawn even for templates, so one fault always takes three draws: a kinds list that mixes names and
        # templates then replays the same way whichever comes up. Kept inside (0.1, 0.9) because a truncation or
        # stall at the very end sends the whole body, and a "fault" the client never notices is not one.
        at = self.rng.uniform(0.1, 0.9)
        if isinstance(choice, Fault):
            return choice
        return Fault(choice, at=at, seconds=self.stall_seconds)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def build_manifest(config: bytes, layers: Sequence[tuple[str, bytes, str | None]]) -> bytes:
    """An Ollama-format image manifest for ``config`` and ``layers`` (media type, bytes, layer name or None),
    compact as Ollama's registry serves it."""

    def descriptor(media_type: str, data: bytes, name: str | None) -> dict[str, object]:
        entry: dict[str, object] = {"mediaType": media_type, "digest": sha256_digest(data), "size": len(data)}
        if name is not None:
            entry["name"] = name
        return entry

    document = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": descriptor(CONFIG_MEDIA_TYPE, config, None),
        "layers": [descriptor(*layer) for layer in layers],
    }
    return json.dumps(document, separators=(",", ":")).encode()


def _error_body(code: str, message: str) -> bytes:
    return json.dumps({"errors": [{"code": code, "message": message}]}, separators=(",", ":")).encode()


def _byte_range(header: str | None, total: int) -> tuple[int, int] | Literal["unsatisfiable"] | None:
    """The inclusive (start, end) a single-range ``Range`` header asks for, or None to send the whole body.

    Malformed and multi-range headers are ignored, as RFC 9110 allows, rather than refused.
    """
    if header is None:
        return None
    match = _RANGE.match(header.strip())
    if match is None:
        return None
    start_text, end_text = match["start"], match["end"]
    if not start_text:
        if not end_text:
            return None
        suffix = int(end_text)
        if suffix == 0 or total == 0:
            return "unsatisfiable"
        return max(total - suffix, 0), total - 1
    start = int(start_text)
    end = int(end_text) if end_text else None
    if end is not None and end < start:
        return None
    if start >= total:
        return "unsatisfiable"
    return start, total - 1 if end is None else min(end, total - 1)


class _Server(ThreadingHTTPServer):
    """One listening socket of a FaultRegistry: the registry itself, or the CDN that blobs are redirected to."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], registry: FaultRegistry, *, cdn: bool) -> None:
        self.registry = registry
        self.cdn = cdn
        if ":" in address[0]:
            # Must be decided before the base class creates the socket.
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves a fully qualified host name, which can take seconds on a box without DNS.
        socketserver.TCPServer.server_bind(self)
        if self.registry.tls is not None:
            # The handshake happens in the handler's thread, so a client that never completes it blocks nobody.
            self.socket = self.registry.tls.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)
        address = self.socket.getsockname()
        self.server_name = str(address[0])
        self.server_port = int(address[1])

    def handle_error(self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any) -> None:
        # A client hanging up, or a connection cut by stop(), is ordinary here; anything else is a bug worth a trace.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fault-registry/1"
    timeout = CONNECTION_TIMEOUT
    server: _Server
    _entry: _Entry

    # --- plumbing -------------------------------------------------------------------------------------------

    def setup(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(CONNECTION_TIMEOUT)
            self.request.do_handshake()
        super().setup()
        self.server.registry._track(self.connection, live=True)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.server.registry._track(self.connection, live=False)

    def handle_one_request(self) -> None:
        if self.server.registry._stopping.is_set():
            self.close_connection = True
            return
        try:
            super().handle_one_request()
        except OSError:
            # The client hung up, or a fault or stop() closed the socket under us: this connection is over.
            self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        # Tests read the request log instead; stderr chatter would bury a failing test's output.
        pass

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def _refuse_method(self) -> None:
        # The request may carry a body we never read; closing is simpler than draining it for keep-alive.
        self.close_connection = True
        self._entry = self.server.registry._log_request(self, None)
        self._send(405, _error_body("UNSUPPORTED", "method not supported"), [("Content-Type", "application/json")])

    do_POST = do_PUT = do_PATCH = do_DELETE = _refuse_method

    # --- routing ----------------------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        registry = self.server.registry
        url = urlsplit(self.path)
        path = unquote(url.path)
        blob_digest: str | None = None
        v2 = _V2_PATH.match(path)
        cdn = _CDN_PATH.match(path)
        if self.server.cdn and cdn is not None:
            blob_digest = cdn["digest"]
        elif not self.server.cdn and v2 is not None and v2["kind"] == "blobs":
            blob_digest = v2["reference"]
        self._entry = registry._log_request(self, blob_digest)

        loop = parse_qs(url.query).get(LOOP_PARAMETER)
        if loop and registry._in_loop(loop[-1]):
            # A follow-up of an open redirect loop goes round again and consumes nothing: see Fault.
            registry._update(self._entry, fault="redirect_loop")
            self._send(307, b"", [("Location", self._own_url() + self.path)])
            return
        if self.server.cdn:
            if cdn is None:
                self._send_error(404, "NOT_FOUND", "not found")
            elif parse_qs(url.query).get("sig") != [CDN_SIGNATURE]:
                # A client that drops the query string of a redirect would fail against real signed CDN URLs too.
                self._send_error(403, "DENIED", "missing or invalid signature")
            else:
                self._serve_blob(cdn["digest"])
            return
        if path == "/token":
            self._serve_token()
            return
        if not path.startswith("/v2/") and path != "/v2":
            self._send_error(404, "NOT_FOUND", "not found")
            return
        if not self._authorized(v2["name"] if v2 is not None else None):
            return
        if v2 is None:
            if path in ("/v2", "/v2/"):
                self._send(200, b"{}", [("Content-Type", "application/json")])
            else:
                self._send_error(404, "NOT_FOUND", "not found")
        elif v2["kind"] == "manifests":
            self._serve_manifest(v2["name"], v2["reference"])
        elif registry.redirect_blobs and self.command == "GET" and registry._blob(v2["reference"]) is not None:
            location = f"{registry._cdn_url()}/cdn/{v2['reference']}?sig={CDN_SIGNATURE}"
            self._send(307, b"", [("Location", location)])
        else:
            self._serve_blob(v2["reference"])

    def _authorized(self, repository: str | None) -> bool:
        registry = self.server.registry
        if not registry.require_auth:
            return True
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and registry._use_token(token.strip()):
            return True
        challenge = f'Bearer realm="{registry.url}/token",service="{TOKEN_SERVICE}"'
        if repository is not None:
            challenge += f',scope="repository:{repository}:pull"'
        self._send(
            401,
            _error_body("UNAUTHORIZED", "authentication required"),
            [("Content-Type", "application/json"), ("WWW-Authenticate", challenge)],
        )
        return False

    def _serve_token(self) -> None:
        registry = self.server.registry
        if registry.signing_keys and not registry._verify_signature(self.headers.get("Authorization", ""), self.path):
            self._send_error(401, "UNAUTHORIZED", "missing or invalid signature")
            return
        fault = registry._take_fault(["token"]) if self.command == "GET" else None
        token = secrets.token_urlsafe(32)
        if fault is None or fault.kind != "status":
            registry._issue_token(token)
        body = json.dumps({"token": token, "access_token": token, "expires_in": 60}).encode()
        self._send(200, body, [("Content-Type", "application/json")], fault)

    def _serve_manifest(self, name: str, reference: str) -> None:
        registry = self.server.registry
        found = registry._manifest(name, reference)
        if found is None:
            self._send_error(404, "MANIFEST_UNKNOWN", "manifest unknown")
            return
        body, content_type = found
        fault = registry._take_fault(["manifest"]) if self.command == "GET" else None
        headers = [("Content-Type", content_type), ("Docker-Content-Digest", sha256_digest(body))]
        self._send(200, body, headers, fault)

    def _serve_blob(self, digest: str) -> None:
        registry = self.server.registry
        data = registry._blob(digest)
        if data is None:
            self._send_error(404, "BLOB_UNKNOWN", "blob unknown to registry")
            return
        headers = [
            ("Content-Type", "application/octet-stream"),
            ("Accept-Ranges", "bytes"),
            ("Docker-Content-Digest", digest),
        ]
        wanted = _byte_range(self.headers.get("Range"), len(data))
        if wanted == "unsatisfiable":
            self._send(416, b"", [*headers, ("Content-Range", f"bytes */{len(data)}")])
            return
        fault = registry._take_fault([digest, "blobs"], chance=True) if self.command == "GET" else None
        if wanted is None or (fault is not None and fault.kind == "range_ignored"):
            self._send(200, data, headers, fault)
            return
        start, end = wanted
        headers.append(("Content-Range", f"bytes {start}-{end}/{len(data)}"))
        self._send(206, data[start : end + 1], headers, fault)

    # --- responses ----------------------------------------------------------------------------------------

    def _own_url(self) -> str:
        registry = self.server.registry
        return registry._cdn_url() if self.server.cdn else registry.url

    def _send_error(self, status: int, code: str, message: str) -> None:
        self._send(status, _error_body(code, message), [("Content-Type", "application/json")])

    def _send(
        self, status: int, body: bytes, headers: Iterable[tuple[str, str]] = (), fault: Fault | None = None
    ) -> None:
        """Answer with ``body``, bent by ``fault``; HEAD gets the same headers and no body."""
        registry = self.server.registry
        headers = list(headers)
        # What the headers promise: the body's true length unless a fault lies, None for a close-delimited body.
        length: int | None = len(body)
        if fault is not None:
            registry._update(self._entry, fault=fault.kind)
            if fault.kind == "status":
                status = fault.status
                code = _ERROR_CODES.get(status, "UNAVAILABLE")
                body = _error_body(code, f"injected HTTP {status}")
                length = len(body)
                headers = [("Content-Type", "application/json")]
                if fault.retry_after is not None:
                    headers.append(("Retry-After", fault.retry_after))
            elif fault.kind == "gzip":
                body = gzip.compress(body)
                length = len(body)
                headers.append(("Content-Encoding", "gzip"))
            elif fault.kind == "corrupt" and body:
                position = min(int(fault.at * len(body)), len(body) - 1)
                flipped = bytearray(body)
                flipped[position] ^= 0xFF
                body = bytes(flipped)
            elif fault.kind == "stall_before":
                registry._stopping.wait(fault.seconds)
                self.close_connection = True
                return
            elif fault.kind in ("redirect_loop", "redirect_scheme"):
                if fault.kind == "redirect_loop":
                    separator = "&" if "?" in self.path else "?"
                    location = f"{self._own_url()}{self.path}{separator}{LOOP_PARAMETER}={registry._open_loop()}"
                else:
                    location = UNSUPPORTED_LOCATION
                status, body, length = 307, b"", 0
                headers = [("Location", location)]
            elif fault.kind == "long_body":
                body += secrets.token_bytes(fault.extra)
                length = len(body)
            elif fault.kind == "lying_length":
                length = len(body) + fault.extra
            elif fault.kind == "endless":
                length = None
                headers.append(("Connection", "close"))

        # Logged before the bytes leave, so a client that has its answer also finds it in the log.
        registry._update(self._entry, status=status)
        self.send_response(status)
        for header, value in headers:
            self.send_header(header, value)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command == "HEAD":
            return

        if fault is None:
            self._write(body, None)
            return
        if fault.kind == "endless":
            self._write_endless()
            self.close_connection = True
            return
        if fault.kind in ("stall_during", "truncate", "reset"):
            body = body[: int(fault.at * len(body))]
        if not self._write(body, fault.rate if fault.kind == "slow" else None):
            self.close_connection = True
            return
        if fault.kind == "stall_during":
            registry._stopping.wait(fault.seconds)
            self.close_connection = True
        elif fault.kind in ("truncate", "lying_length"):
            # The promised length was not sent: the connection cannot carry another response.
            self.close_connection = True
        elif fault.kind == "reset":
            self._reset_connection()

    def _write(self, body: bytes, rate: int | None) -> bool:
        """Write ``body`` in chunks, paced to ``rate`` bytes/s if given; False if stop() interrupted the pacing."""
        registry = self.server.registry
        view = memoryview(body)
        chunk = CHUNK if rate is None else max(1, min(CHUNK, rate // SLOW_WRITES_PER_SECOND))
        started = time.monotonic()
        sent = 0
        while sent < len(view):
            piece = view[sent : sent + chunk]
            # Counted before writing for the same reason as the status; taken back if the client is gone.
            registry._update(self._entry, add_bytes=len(piece))
            try:
                self.wfile.write(piece)
            except OSError:
                registry._update(self._entry, add_bytes=-len(piece))
                raise
            sent += len(piece)
            if rate is not None:
                # Pacing against the start time, not per chunk, keeps the average rate exact despite sleep jitter.
                delay = started + sent / rate - time.monotonic()
                if delay > 0 and registry._stopping.wait(delay):
                    return False
        return True

    def _write_endless(self) -> None:
        """Random bytes until the client hangs up (an OSError to the caller), stop(), or ENDLESS_LIMIT."""
        registry = self.server.registry
        # One random chunk, repeated: the client can tell nothing from the bytes, and the server spends no CPU.
        noise = secrets.token_bytes(CHUNK)
        sent = 0
        while sent < ENDLESS_LIMIT and not registry._stopping.is_set():
            registry._update(self._entry, add_bytes=len(noise))
            try:
                self.wfile.write(noise)
            except OSError:
                registry._update(self._entry, add_bytes=-len(noise))
                raise
            sent += len(noise)

    def _reset_connection(self) -> None:
        # A zero linger time makes close() send RST instead of FIN, which is how a crashed middlebox looks.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # The buffered reader holds a reference to the socket; close() only really closes once it is gone too.
        self.rfile.close()
        self.connection.close()
        self.close_connection = True


class FaultRegistry:
    """An OCI distribution v2 registry (plus an optional CDN for redirected blobs) with injectable faults."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        require_auth: bool = False,
        token_uses: int | None = None,
        redirect_blobs: bool = False,
        tls: ssl.SSLContext | None = None,
        signing_keys: Sequence[str] = (),
    ) -> None:
        """``tls`` serves HTTPS with that server context (the CDN too). ``signing_keys`` (OpenSSH ``ssh-ed25519``
        public key lines) makes the token endpoint demand Ollama's signed requests from one of those keys."""
        if token_uses is not None and token_uses < 1:
            raise ValueError("token_uses must be at least 1, or None for tokens that never expire")
        self.require_auth = require_auth
        self.token_uses = token_uses
        self.redirect_blobs = redirect_blobs
        self.tls = tls
        self.signing_keys = tuple(line.split()[1] for line in signing_keys)
        self.signed_requests_verified = 0
        self._bind_host = host
        self._bind_port = port
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._blobs: dict[str, bytes] = {}
        self._manifests: dict[tuple[str, str], tuple[bytes, str]] = {}
        self._faults: dict[str, deque[_QueuedFault]] = {}
        self._random: _RandomFaults | None = None
        self._applied: Counter[str] = Counter()
        self._loops: set[str] = set()
        self._loops_opened = 0
        self._tokens: dict[str, int | None] = {}
        self._tokens_issued: list[str] = []
        self._log: list[_Entry] = []
        self._cdn_log: list[_Entry] = []
        self._sequence = 0
        self._connections: set[socket.socket] = set()
        self._server: _Server | None = None
        self._cdn: _Server | None = None
        self._threads: list[threading.Thread] = []

    # --- lifecycle --------------------------------------------------------------------------------------------

    def start(self) -> FaultRegistry:
        if self._server is not None:
            raise RuntimeError("FaultRegistry is already started")
        self._stopping.clear()
        self._server = _Server((self._bind_host, self._bind_port), self, cdn=False)
        try:
            if self.redirect_blobs:
                self._cdn = _Server((self._bind_host, 0), self, cdn=True)
        except OSError:
            self._server.server_close()
            self._server = None
            raise
        for server in (self._server, self._cdn):
            if server is None:
                continue
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": POLL_INTERVAL},
                name="fault-registry-cdn" if server.cdn else "fault-registry",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop serving, end every stall and slow body, cut open connections; returns in a fraction of a second."""
        self._stopping.set()
        servers = [server for server in (self._server, self._cdn) if server is not None]
        for server in servers:
            server.shutdown()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            # A connection may already be closed by its handler or the client.
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        for server in servers:
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=1.0)
        self._threads.clear()
        self._server = None
        self._cdn = None

    def __enter__(self) -> FaultRegistry:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, as a model reference names the registry."""
        return self._authority(self._server)

    @property
    def url(self) -> str:
        return f"{self._scheme}://{self.host}"

    @property
    def _scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    def _cdn_url(self) -> str:
        return f"{self._scheme}://{self._authority(self._cdn)}"

    @staticmethod
    def _authority(server: _Server | None) -> str:
        if server is None:
            raise RuntimeError("FaultRegistry is not started")
        host = server.server_name
        return f"[{host}]:{server.server_port}" if ":" in host else f"{host}:{server.server_port}"

    # --- content ---------------------------------------------------------------------------------------------

    def add_blob(self, data: bytes) -> str:
        digest = sha256_digest(data)
        with self._lock:
            self._blobs[digest] = bytes(data)
        return digest

    def add_model(
        self,
        name: str,
        tag: str = "latest",
        *,
        layers: list[tuple[str, bytes, str | None]],
        config: bytes | None = None,
    ) -> ModelFixture:
        """Serve a model whose manifest lists ``layers`` as (media type, bytes, layer name or None)."""
        config_data = DEFAULT_CONFIG if config is None else config
        config_digest = self.add_blob(config_data)
        blobs = {config_digest: config_data}
        layer_digests = tuple(self.add_blob(data) for _, data, _ in layers)
        blobs.update(zip(layer_digests, (data for _, data, _ in layers), strict=True))
        manifest = build_manifest(config_data, layers)
        self.set_manifest(name, tag, manifest)
        return ModelFixture(
            name=name,
            tag=tag,
            manifest=manifest,
            manifest_digest=sha256_digest(manifest),
            config_digest=config_digest,
            layer_digests=layer_digests,
            blobs=blobs,
        )

    def add_synthetic_model(
        self,
        name: str,
        tag: str = "latest",
        *,
        blobs: int,
        blob_size: int,
        seed: int = 0,
        media_type: str = TENSOR_MEDIA_TYPE,
    ) -> ModelFixture:
        """A model of ``blobs`` pseudo-random layers: same seed, same bytes; sizes within 1/8 of ``blob_size``."""
        if blobs < 0 or blob_size < 1:
            raise ValueError("blobs must be at least 0 and blob_size at least 1")
        rng = random.Random(seed)
        spread = blob_size // 8
        layers: list[tuple[str, bytes, str | None]] = []
        for index in range(blobs):
            # Unequal sizes catch clients that assume every blob is as long as the first.
            size = max(1, blob_size + rng.randint(-spread, spread))
            layers.append((media_type, rng.randbytes(size), f"text_encoder/layer-{index:03d}.safetensors"))
        config = json.dumps(
            {"model_format": "safetensors", "model_family": "synthetic", "seed": seed}, separators=(",", ":")
        ).encode()
        return self.add_model(name, tag, layers=layers, config=config)

    def set_manifest(self, name: str, tag: str, body: bytes, content_type: str = MANIFEST_MEDIA_TYPE) -> None:
        """Serve ``body`` verbatim (possibly hostile) for ``name:tag`` and for ``name@<its digest>``."""
        with self._lock:
            self._manifests[(name, tag)] = (bytes(body), content_type)
            self._manifests[(name, sha256_digest(body))] = (bytes(body), content_type)

    # --- faults --------------------------------------------------------------------------------------------

    def inject(self, target: str, fault: Fault) -> None:
        """Queue ``fault`` for ``target``: a blob digest, ``"blobs"``, ``"manifest"`` or ``"token"``.

        Faults on one target are used in order, each ``times`` times. A digest's own faults come before the
        ``"blobs"`` ones. With ``redirect_blobs``, blob faults act on the CDN, where the bytes are served.
        """
        if target not in ("blobs", "manifest", "token") and not target.startswith("sha256:"):
            raise ValueError(f"unknown fault target {target!r}")
        with self._lock:
            self._faults.setdefault(target, deque()).append(_QueuedFault(fault, fault.times))

    def inject_random(
        self, *, rate: float, kinds: Sequence[str | Fault], seed: int, stall_seconds: float = 30.0
    ) -> None:
        """From now on, give each blob GET that has no queued fault a fault with probability ``rate``.

        The fault is drawn from ``kinds``: a kind's name gets a random ``at`` (within 0.1-0.9) and ``seconds`` =
        ``stall_seconds``; a :class:`Fault` is used as it is (its ``times`` ignored), which is how to ask for
        e.g. ``Fault("status", status=503)``. One ``random.Random(seed)`` is drawn from under the lock in
        arrival order, so the same requests in the same order meet the same faults. Only blob GETs that would
        succeed take part (as with queued faults); queued faults come first. Calling it again starts over with
        the new settings; ``rate=0`` turns it off.
        """
        if not 0.0 <= rate <= 1.0:
            raise ValueError("rate must be a probability between 0 and 1")
        if not kinds:
            raise ValueError("kinds must name at least one fault")
        if stall_seconds < 0:
            raise ValueError("stall_seconds must not be negative")
        for kind in kinds:
            if not isinstance(kind, Fault):
                # Refused now rather than at the first unlucky request, inside a server thread.
                Fault(kind, seconds=stall_seconds)
        settings = _RandomFaults(rate, tuple(kinds), stall_seconds, random.Random(seed))
        with self._lock:
            self._random = settings if rate > 0 else None

    def clear_faults(self) -> None:
        """Drop every queued fault, random injection and open redirect loop; ``faults_applied`` is kept."""
        with self._lock:
            self._faults.clear()
            self._random = None
            self._loops.clear()

    @property
    def faults_applied(self) -> dict[str, int]:
        """How many responses each kind of fault has bent so far, queued and random alike.

        A redirect loop counts once, however many times the client goes round it. ``reset_log`` leaves this be.
        """
        with self._lock:
            return dict(self._applied)

    def _take_fault(self, targets: Sequence[str], *, chance: bool = False) -> Fault | None:
        """The fault for this request: the first queued one of ``targets``, else (with ``chance``) a random one."""
        with self._lock:
            fault: Fault | None = None
            for target in targets:
                queue = self._faults.get(target)
                if not queue:
                    continue
                queued = queue[0]
                queued.left -= 1
                if queued.left <= 0:
                    queue.popleft()
                fault = queued.fault
                break
            if fault is None and chance and self._random is not None:
                fault = self._random.draw()
            if fault is not None:
                self._applied[fault.kind] += 1
            return fault

    def _open_loop(self) -> str:
        with self._lock:
            self._loops_opened += 1
            loop = str(self._loops_opened)
            self._loops.add(loop)
            return loop

    def _in_loop(self, loop: str) -> bool:
        with self._lock:
            return loop in self._loops

    # --- content lookup for the handler ------------------------------------------------------------------

    def _blob(self, digest: str) -> bytes | None:
        with self._lock:
            return self._blobs.get(digest)

    def _manifest(self, name: str, reference: str) -> tuple[bytes, str] | None:
        with self._lock:
            return self._manifests.get((name, reference))

    # --- tokens -----------------------------------------------------------------------------------------------

    @property
    def tokens_issued(self) -> list[str]:
        with self._lock:
            return list(self._tokens_issued)

    @property
    def token_requests(self) -> list[RequestRecord]:
        """GETs of the token endpoint, in arrival order, stalled and refused ones included: a token issued is
        not a token delivered when a fault bends the answer."""
        with self._lock:
            return [entry.record() for entry in self._log if entry.method == "GET" and entry.path.startswith("/token")]

    def _verify_signature(self, authorization: str, path: str) -> bool:
        """Check an Ollama-signed token request as registry.ollama.ai does: a known key, ``ts`` and ``nonce``
        present, and an ed25519 signature over ``GET,<url>,<base64 of the hex SHA-256 of the empty body>``."""
        # Imported here so that the rest of this module stays standard library only.
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        public, _, signature = authorization.partition(":")
        query = parse_qs(urlsplit(path).query)
        if public not in self.signing_keys or "ts" not in query or "nonce" not in query:
            return False
        # The key field is the SSH wire format: string "ssh-ed25519", then the 32-byte key.
        blob = base64.b64decode(public)
        name_length = int.from_bytes(blob[:4], "big")
        raw_key = blob[4 + name_length + 4 :]
        empty = base64.b64encode(hashlib.sha256(b"").hexdigest().encode()).decode()
        message = f"GET,{self.url}{path},{empty}".encode()
        try:
            Ed25519PublicKey.from_public_bytes(raw_key).verify(base64.b64decode(signature), message)
        except (InvalidSignature, ValueError):
            return False
        with self._lock:
            self.signed_requests_verified += 1
        return True

    def _issue_token(self, token: str) -> None:
        with self._lock:
            self._tokens[token] = self.token_uses
            self._tokens_issued.append(token)

    def _use_token(self, token: str) -> bool:
        """Accept ``token`` once more if it has uses left; an exhausted token is refused like an expired one."""
        with self._lock:
            if token not in self._tokens:
                return False
            left = self._tokens[token]
            if left is None:
                return True
            if left <= 0:
                return False
            self._tokens[token] = left - 1
            return True

    # --- request log ---------------------------------------------------------------------------------------

    def _log_request(self, handler: _Handler, blob_digest: str | None) -> _Entry:
        headers: dict[str, str] = {}
        for header, value in handler.headers.items():
            key = header.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        with self._lock:
            self._sequence += 1
            entry = _Entry(
                sequence=self._sequence,
                method=handler.command,
                path=handler.path,
                headers=headers,
                range=handler.headers.get("Range"),
                blob_digest=blob_digest,
            )
            (self._cdn_log if handler.server.cdn else self._log).append(entry)
        return entry

    def _update(
        self, entry: _Entry, *, status: int | None = None, fault: str | None = None, add_bytes: int = 0
    ) -> None:
        with self._lock:
            if status is not None:
                entry.status = status
            if fault is not None:
                entry.fault = fault
            entry.bytes_sent += add_bytes

    def _track(self, connection: socket.socket, *, live: bool) -> None:
        with self._lock:
            if live:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    @property
    def requests(self) -> list[RequestRecord]:
        """Requests to the registry (not the CDN), in arrival order."""
        with self._lock:
            return [entry.record() for entry in self._log]

    @property
    def cdn_requests(self) -> list[RequestRecord]:
        with self._lock:
            return [entry.record() for entry in self._cdn_log]

    def blob_requests(self, digest: str) -> list[RequestRecord]:
        """GETs of one blob on registry and CDN together, in arrival order; a redirect and its CDN GET count as two."""
        with self._lock:
            entries = [e for e in (*self._log, *self._cdn_log) if e.method == "GET" and e.blob_digest == digest]
            return [entry.record() for entry in sorted(entries, key=lambda e: e.sequence)]

    def reset_log(self) -> None:
        with self._lock:
            self._log.clear()
            self._cdn_log.clear()


FAULT_TARGETS = ("blobs", "manifest", "token")
# What a --fault spec may set: each field of Fault but its kind, read from text as (reader, what it must be).
_FAULT_FIELDS: dict[str, tuple[Callable[[str], object], str]] = {
    "times": (int, "a whole number"),
    "at": (float, "a fraction"),
    "seconds": (float, "a number"),
    "rate": (int, "a whole number"),
    "status": (int, "an HTTP status code"),
    "retry_after": (str, "text"),
    "extra": (int, "a whole number"),
}


def parse_fault(spec: str) -> tuple[str, Fault]:
    """``[TARGET:]KIND[:TIMES][:FIELD=VALUE]...`` as the target and the :class:`Fault` to inject there.

    ``TARGET`` is ``blobs`` (the default: every blob GET), ``manifest`` or ``token``; ``FIELD`` is any field of
    :class:`Fault`, e.g. ``stall_during:2:seconds=5:at=0.5`` or ``manifest:status:status=429:retry_after=1``.
    """
    words = spec.split(":")
    target = words.pop(0) if words[0] in FAULT_TARGETS else "blobs"
    if not words or not words[0]:
        raise ValueError(f"{spec!r} names no fault kind; expected one of {', '.join(FAULT_KINDS)}")
    kind = words.pop(0)
    values: dict[str, Any] = {}
    if words and words[0].isdigit():
        values["times"] = int(words.pop(0))
    for word in words:
        name, equals, text = word.partition("=")
        if not equals or name not in _FAULT_FIELDS:
            raise ValueError(f"{word!r} in {spec!r}: expected FIELD=VALUE with FIELD one of {', '.join(_FAULT_FIELDS)}")
        read, expected = _FAULT_FIELDS[name]
        try:
            values[name] = read(text)
        except ValueError:
            raise ValueError(f"{word!r} in {spec!r}: {name} must be {expected}") from None
    return target, Fault(kind, **values)


def _fault_argument(spec: str) -> tuple[str, Fault]:
    try:
        return parse_fault(spec)
    except ValueError as error:
        # argparse shows an ArgumentTypeError's own message; a ValueError only as "invalid value".
        raise argparse.ArgumentTypeError(str(error)) from None


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fault_registry",
        description="Serve a synthetic model like an OCI distribution v2 registry, for trying ollama-pull by hand.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on; 0 picks a free one (default)")
    parser.add_argument("--blobs", type=int, default=8, help="number of tensor layers (default: %(default)s)")
    parser.add_argument("--blob-size", type=int, default=1048576, help="bytes per layer (default: %(default)s)")
    parser.add_argument("--name", default="library/demo", help="model name (default: %(default)s)")
    parser.add_argument("--tag", default="latest", help="model tag (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the blob bytes (default: %(default)s)")
    parser.add_argument("--require-auth", action="store_true", help="demand Bearer tokens from /token")
    parser.add_argument("--token-uses", type=int, default=None, help="requests a token is good for")
    parser.add_argument("--redirect-blobs", action="store_true", help="redirect blob GETs to a second (CDN) port")
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        type=_fault_argument,
        metavar="SPEC",
        help=(
            "[TARGET:]KIND[:TIMES][:FIELD=VALUE]...: misbehave on the next TIMES (default 1) GETs of TARGET "
            "(blobs, the default; manifest; token), in the order given; repeatable. "
            f"KIND (the Fault class says what each does): {', '.join(FAULT_KINDS)}. "
            f"FIELD: {', '.join(_FAULT_FIELDS)}. "
            "E.g. --fault reset:2 --fault slow:rate=100000 --fault manifest:status:status=429:retry_after=1"
        ),
    )
    args = parser.parse_args(argv)

    if threading.current_thread() is threading.main_thread():
        # `kill` and Ctrl-C both mean "stop now, quietly": Ctrl-C too when started with it ignored, as a
        # background job of a non-interactive shell is (`cmd &` in a script), and Python then leaves it ignored.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _interrupt)
    registry = FaultRegistry(
        host=args.host,
        port=args.port,
        require_auth=args.require_auth,
        token_uses=args.token_uses,
        redirect_blobs=args.redirect_blobs,
    )
    try:
        registry.add_synthetic_model(args.name, args.tag, blobs=args.blobs, blob_size=args.blob_size, seed=args.seed)
        for target, fault in args.fault:
            registry.inject(target, fault)
        registry.start()
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    try:
        reference = f"{registry.host}/{args.name}" + ("" if args.tag == "latest" else f":{args.tag}")
        line = f"serving {args.name}:{args.tag} at {registry.url}  -> try: ollama-pull --insecure {reference}"
        print(line, flush=True)
        for target, fault in args.fault:
            print(f"fault on {target}: {fault}", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if threading.current_thread() is threading.main_thread():
            # A second Ctrl-C while stopping would otherwise print a traceback from inside stop().
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        registry.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
