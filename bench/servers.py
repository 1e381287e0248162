"""nginx serving the registry tree on 127.0.0.1: its config, its process, and its access log."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from common import MIB, BenchError
from dataset import MANIFEST_MEDIA_TYPE, NAMESPACE, TAG, Model
from host import HOST

# nginx reads "20m" as 20 MiB/s, per connection: that is what makes one stream slow and many streams fast.
LIMIT_RATE = "20m"
LIMIT_RATE_BYTES = 20 * MIB


NGINX_CONF = """\
daemon off;
master_process on;
# One worker per core: the clients are what is measured, the server must not be the bottleneck.
worker_processes auto;
worker_rlimit_nofile 16384;
pid @DIR@/nginx.pid;
error_log @DIR@/error.log warn;

events {
    worker_connections 8192;
}

http {
    # No extension-based types: blobs are octet streams, manifests get their media type below.
    types {}
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65;
    keepalive_requests 1000000;
    # The bytes each request really sent and the Range it asked for: how resume is judged.
    log_format bench '$msec\t$request_method\t$request_uri\t$status\t$body_bytes_sent\t$http_range';
    access_log @DIR@/access.log bench;
    client_body_temp_path @DIR@/client_body;
    proxy_temp_path @DIR@/proxy;
    fastcgi_temp_path @DIR@/fastcgi;
    uwsgi_temp_path @DIR@/uwsgi;
    scgi_temp_path @DIR@/scgi;

    server {
        listen 127.0.0.1:@PORT@;
        root @ROOT@;
        location ~ ^/v2/.+/manifests/[^/]+$ {
            default_type application/vnd.docker.distribution.manifest.v2+json;
        }
        location ~ ^/v2/bench/[^/]+-limited/blobs/ {
            limit_rate @LIMIT@;
        }
    }
}
"""


@dataclass(frozen=True)
class AccessLine:
    uri: str
    status: int
    body_bytes: int
    range: str


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class Nginx:
    def __init__(self, program: str, directory: Path, root: Path) -> None:
        self.program = program
        self.directory = directory
        self.root = root
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def access_log(self) -> Path:
        return self.directory / "access.log"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        conf = self.directory / "nginx.conf"
        text = NGINX_CONF.replace("@DIR@", str(self.directory)).replace("@ROOT@", str(self.root))
        conf.write_text(text.replace("@PORT@", str(self.port)).replace("@LIMIT@", LIMIT_RATE))
        output = open(self.directory / "nginx.out", "wb")  # noqa: SIM115 - nginx keeps it open while it runs
        # -e: nginx opens its compiled-in error log before reading the config unless told otherwise.
        argv = [self.program, "-p", str(self.directory), "-e", str(self.directory / "error.log"), "-c", str(conf)]
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
        output.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(f"nginx exited at start:\n{self._tail()}")
            try:
                socket.create_connection((HOST, self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise BenchError(f"nginx did not listen on {HOST}:{self.port} within 15 s:\n{self._tail()}")

    def _tail(self) -> str:
        parts = []
        for name in ("nginx.out", "error.log"):
            path = self.directory / name
            if path.exists():
                parts.append(path.read_text(errors="replace")[-2000:])
        return "\n".join(parts)

    def self_check(self, model: Model) -> None:
        """The two properties every tool relies on: the manifest's media type, and Range on blobs."""
        base = f"http://{HOST}:{self.port}/v2/{NAMESPACE}/{model.name}"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"{base}/manifests/{TAG}", timeout=10) as response:
            body = response.read()
            kind = response.headers.get("Content-Type")
        if body != model.manifest or kind != MANIFEST_MEDIA_TYPE:
            raise BenchError(f"nginx serves the manifest wrong (Content-Type {kind!r})")
        blob = model.blobs[-1]
        request = urllib.request.Request(f"{base}/blobs/{blob.digest}", headers={"Range": "bytes=1-10"})
        with opener.open(request, timeout=10) as response:
            if response.status != 206 or len(response.read()) != 10:
                raise BenchError(f"nginx does not honour Range (status {response.status})")

    def log_offset(self) -> int:
        return self.access_log.stat().st_size if self.access_log.exists() else 0

    def read_log(self, offset: int) -> list[AccessLine]:
        with open(self.access_log, "rb") as handle:
            handle.seek(offset)
            text = handle.read().decode(errors="replace")
        lines = []
        for row in text.splitlines():
            fields = row.split("\t")
            if len(fields) == 6:
                _msec, _method, uri, status, sent, asked = fields
                lines.append(AccessLine(uri, int(status), int(sent), "" if asked == "-" else asked))
        return lines

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        # SIGQUIT is nginx's graceful stop; SIGKILL only if it does not go within a few seconds.
        self.process.send_signal(signal.SIGQUIT)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
