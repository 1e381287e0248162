"""The fault-injecting registry itself, driven with the standard library's HTTP client and raw sockets."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gzip
import hashlib
import http.client
import json
import re
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from ollama_pull import pull
from ollama_pull.events import BlobRetry, Event

from . import fault_registry
from .fakes import FAST
from .fault_registry import FAULT_KINDS, Fault, FaultRegistry, ModelFixture

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
BLOB = bytes(range(256)) * 64  # 16 KiB, every byte position distinguishable enough to spot a flip


@pytest.fixture
def registry() -> Iterator[FaultRegistry]:
    with FaultRegistry() as server:
        yield server


@pytest.fixture
def model(registry: FaultRegistry) -> ModelFixture:
    return registry.add_model(
        "library/demo",
        layers=[("application/vnd.ollama.image.tensor", BLOB, "text_encoder/a.safetensors"), ("x/y", b"second", None)],
    )


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def request(
    registry: FaultRegistry, path: str, *, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[http.client.HTTPResponse, bytes]:
    with closing(http.client.HTTPConnection(registry.host, timeout=5)) as connection:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return response, response.read()


def blob_path(digest: str) -> str:
    return f"/v2/library/demo/blobs/{digest}"


def raw_get(registry: FaultRegistry, path: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", int(registry.host.rsplit(":", 1)[1])), timeout=5)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {registry.host}\r\n\r\n".encode())
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def wait_for_requests(registry: FaultRegistry, count: int) -> None:
    deadline = time.monotonic() + 5
    while len(registry.requests) < count:
        assert time.monotonic() < deadline, "request never arrived"
        time.sleep(0.005)


# --- serving ---------------------------------------------------------------------------------------------------


def test_model_manifest_and_blobs_are_served_byte_for_byte(registry: FaultRegistry, model: ModelFixture) -> None:
    response, body = request(registry, "/v2/library/demo/manifests/latest", headers={"Accept": MANIFEST_V2})
    assert response.status == 200
    assert body == model.manifest
    assert response.headers["Content-Type"] == MANIFEST_V2
    assert response.headers["Docker-Content-Digest"] == model.manifest_digest == sha256(body)
    document = json.loads(body)
    assert document["config"] == {
        "mediaType": "application/vnd.docker.container.image.v1+json",
        "digest": model.config_digest,
        "size": len(model.blobs[model.config_digest]),
    }
    assert document["layers"][0]["name"] == "text_encoder/a.safetensors"
    assert "name" not in document["layers"][1]
    assert model.blobs[model.config_digest] == b'{"model_format":"safetensors"}'
    for digest, data in model.blobs.items():
        response, body = request(registry, blob_path(digest))
        assert (response.status, body, sha256(body)) == (200, data, digest)
        assert response.headers["Content-Type"] == "application/octet-stream"
        assert response.headers["Accept-Ranges"] == "bytes"
    # By digest too, and a blob is served under any repository name.
    assert request(registry, f"/v2/library/demo/manifests/{model.manifest_digest}")[1] == model.manifest
    assert request(registry, f"/v2/other/x/blobs/{model.layer_digests[1]}")[1] == b"second"

    head, body = request(registry, blob_path(model.layer_digests[0]), method="HEAD")
    assert (head.status, head.headers["Content-Length"], body) == (200, str(len(BLOB)), b"")
    [manifest_get] = [r for r in registry.requests if "/manifests/latest" in r.path]
    assert manifest_get.headers["accept"] == MANIFEST_V2
    assert (manifest_get.method, manifest_get.status, manifest_get.bytes_sent) == ("GET", 200, len(model.manifest))


def test_unknown_names_are_oci_errors(registry: FaultRegistry, model: ModelFixture) -> None:
    response, body = request(registry, "/v2/library/missing/manifests/latest")
    assert response.status == 404
    assert json.loads(body) == {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]}
    response, body = request(registry, blob_path("sha256:" + "0" * 64))
    assert response.status == 404
    assert json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"
    response, body = request(registry, "/v2/")
    assert (response.status, body) == (200, b"{}")


def test_nested_names_and_hostile_manifests(registry: FaultRegistry) -> None:
    registry.set_manifest("a/b/c", "v1", b"not json at all", content_type="text/plain")
    response, body = request(registry, "/v2/a/b/c/manifests/v1")
    assert (response.status, body, response.headers["Content-Type"]) == (200, b"not json at all", "text/plain")


def test_synthetic_models_are_seeded(registry: FaultRegistry) -> None:
    first = registry.add_synthetic_model("library/one", blobs=4, blob_size=4096, seed=3)
    again = registry.add_synthetic_model("library/two", blobs=4, blob_size=4096, seed=3)
    other = registry.add_synthetic_model("library/three", blobs=4, blob_size=4096, seed=4)
    assert first.layer_digests == again.layer_digests
    assert set(first.layer_digests).isdisjoint(other.layer_digests)
    sizes = [len(first.blobs[d]) for d in first.layer_digests]
    assert all(3584 <= size <= 4608 for size in sizes)
    assert len(set(sizes)) > 1
    layers = json.loads(first.manifest)["layers"]
    assert [layer["name"] for layer in layers][:2] == [
        "text_encoder/layer-000.safetensors",
        "text_encoder/layer-001.safetensors",
    ]
    assert {layer["mediaType"] for layer in layers} == {"application/vnd.ollama.image.tensor"}
    assert len(first.blobs) == 5


@pytest.mark.parametrize(
    ("header", "status", "content_range", "expected"),
    [
        ("bytes=100-", 206, f"bytes 100-{len(BLOB) - 1}/{len(BLOB)}", BLOB[100:]),
        ("bytes=10-19", 206, f"bytes 10-19/{len(BLOB)}", BLOB[10:20]),
        ("bytes=16000-99999", 206, f"bytes 16000-{len(BLOB) - 1}/{len(BLOB)}", BLOB[16000:]),
        (f"bytes={len(BLOB)}-", 416, f"bytes */{len(BLOB)}", b""),
    ],
)
def test_range_requests(
    registry: FaultRegistry, model: ModelFixture, header: str, status: int, content_range: str, expected: bytes
) -> None:
    response, body = request(registry, blob_path(model.layer_digests[0]), headers={"Range": header})
    assert (response.status, response.headers["Content-Range"], body) == (status, content_range, expected)
    [record] = registry.requests
    assert (record.range, record.status, record.bytes_sent) == (header, status, len(expected))


# --- faults ------------------------------------------------------------------------------------------------------


def test_fault_validation() -> None:
    # New kinds are appended: code that indexed or listed the first eight keeps working.
    assert FAULT_KINDS[:8] == ("stall_before", "stall_during", "slow", "truncate", "reset", "corrupt", "status", "gzip")
    assert FAULT_KINDS[8:] == (
        "endless",
        "long_body",
        "lying_length",
        "redirect_loop",
        "redirect_scheme",
        "range_ignored",
    )
    with pytest.raises(ValueError, match="extra must be"):
        Fault("long_body", extra=0)
    with pytest.raises(ValueError, match="unknown fault kind"):
        Fault("explode")
    with pytest.raises(ValueError, match="at must be"):
        Fault("truncate", at=1.5)
    with pytest.raises(ValueError, match="unknown fault target"):
        FaultRegistry().inject("layer-1", Fault("reset"))


def test_stall_before_sends_nothing_then_closes(registry: FaultRegistry, model: ModelFixture) -> None:
    digest = model.layer_digests[0]
    registry.inject(digest, Fault("stall_before", seconds=0.3))
    started = time.monotonic()
    with raw_get(registry, blob_path(digest)) as sock:
        assert read_until_closed(sock) == b""
    assert 0.25 < time.monotonic() - started < 2
    [record] = registry.blob_requests(digest)
    assert (record.status, record.bytes_sent, record.fault) == (0, 0, "stall_before")


def test_stall_during_sends_part_then_goes_silent(registry: FaultRegistry, model: ModelFixture) -> None:
    digest = model.layer_digests[0]
    registry.inject(digest, Fault("stall_during", at=0.5, seconds=0.3))
    started = time.monotonic()
    with raw_get(registry, blob_path(digest)) as sock:
        received = read_until_closed(sock)
    assert 0.25 < time.monotonic() - started < 2
    head, _, body = received.partition(b"\r\n\r\n")
    assert f"Content-Length: {len(BLOB)}".encode() in head
    assert body == BLOB[: len(BLOB) // 2]
    assert registry.blob_requests(digest)[0].bytes_sent == len(BLOB) // 2


def test_slow_sends_everything_at_the_rate(registry: FaultRegistry, model: ModelFixture) -> None:
    digest = model.layer_digests[0]
    registry.inject(digest, Fault("slow", rate=len(BLOB) * 4))
    started = time.monotonic()
    response, body = request(registry, blob_path(digest))
    assert 0.2 < time.monotonic() - started < 2
    assert (response.status, body) == (200, BLOB)


def test_truncate_closes_early_with_the_full_length_promised(registry: FaultRegistry, model: ModelFixture) -> None:
    digest = model.layer_digests[0]
    registry.inject(digest, Fault("truncate", at=0.3))
    with closing(http.client.HTTPConnection(registry.host, timeout=5)) as connection:
        connection.request("GET", blob_path(digest))
        response = connection.getresponse()
        assert response.headers["Content-Length"] == str(len(BLOB))
        with pytest.raises(http.client.IncompleteRead) as incomplete:
            response.read()
    assert incomplete.value.partial == BLOB[: int(0.3 * len(BLOB))]
    [record] = registry.blob_requests(digest)
    assert (record.status, record.bytes_sent, record.fault) == (200, int(0.3 * len(BLOB)), "truncate")


def test_reset_aborts_with_rst(registry: FaultRegistry, model: ModelFixture) -> None:
    digest = model.layer_digests[0]
    registry.inject(digest, Fault("reset", at=0.3))
    with closing(http.client.HTTPConnection(registry.host, timeout=5)) as connection:
        connection.request("GET", blob_path(digest))
        response = connection.getresponse()
        with pytest.raises(ConnectionResetError):
            response.read()
    assert registry.blob_requests(digest)[0].fault == "reset"


def test_corrupt_flips_exactly_one_byte(registry: FaultRegistry, model: ModelFixture) -> None:
    digest = model.layer_digests[0]
    registry.inject(digest, Fault("corrupt", at=0.7))
    response, body = request(registry, blob_path(digest))
    assert (response.status, len(body)) == (200, len(BLOB))
    position = int(0.7 * len(BLOB))
    assert [i for i in range(len(BLOB)) if body[i] != BLOB[i]] == [position]
    assert body[position] == BLOB[position] ^ 0xFF


def test_status_with_retry_after_is_used_up_after_times(registry: FaultRegistry, model: ModelFixture) -> None:
    digest = model.layer_digests[0]
    registry.inject(digest, Fault("status", status=503, retry_after="2", times=2))
    for _ in range(2):
        response, _ = request(registry, blob_path(digest))
        assert (response.status, response.headers["Retry-After"]) == (503, "2")
    response, body = request(registry, blob_path(digest))
    assert (response.status, body) == (200, BLOB)
    assert [r.fault for r in registry.blob_requests(digest)] == ["status", "status", None]


def test_gzip_is_sent_whatever_the_client_accepts(registry: FaultRegistry, model: ModelFixture) -> None:
    digest = model.layer_digests[0]
    registry.inject(digest, Fault("gzip"))
    response, body = request(registry, blob_path(digest), headers={"Accept-Encoding": "identity"})
    assert response.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(body) == BLOB
    assert response.headers["Content-Length"] == str(len(body))


def test_faults_queue_in_order_and_by_target(registry: FaultRegistry, model: ModelFixture) -> None:
    first, second = model.layer_digests
    registry.inject("blobs", Fault("status", status=500))
    registry.inject(first, Fault("status", status=429))
    registry.inject(first, Fault("status", status=502))
    registry.inject("manifest", Fault("status", status=504))
    # HEAD and errors never consume a fault.
    assert request(registry, blob_path(first), method="HEAD")[0].status == 200
    assert request(registry, blob_path("sha256:" + "1" * 64))[0].status == 404
    assert [request(registry, blob_path(first))[0].status for _ in range(4)] == [429, 502, 500, 200]
    assert request(registry, blob_path(second))[0].status == 200
    assert [request(registry, "/v2/library/demo/manifests/latest")[0].status for _ in range(2)] == [504, 200]


def split_response(received: bytes) -> tuple[dict[str, str], bytes]:
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")[1:]
    return {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}, body


def test_endless_streams_without_a_length_until_the_client_hangs_up(
    registry: FaultRegistry, model: ModelFixture
) -> None:
    digest = model.layer_digests[0]
    registry.inject(digest, Fault("endless"))
    with raw_get(registry, blob_path(digest)) as sock:
        received = b""
        while len(received) < 1024 * 1024:
            received += sock.recv(65536)
    headers, body = split_response(received)
    assert "content-length" not in headers
    assert headers["connection"] == "close"
    assert len(body) > 1024 * 1024 - 65536
    assert body[: len(BLOB)] != BLOB
    # The server notices the hang-up and ends the response; what it counted is what the socket accepted.
    deadline = time.monotonic() + 5
    while registry._connections:
        assert time.monotonic() < deadline, "the endless body outlived its client"
        time.sleep(0.01)
    [record] = registry.blob_requests(digest)
    assert (record.status, record.fault) == (200, "endless")
    assert record.bytes_sent >= len(body)


def test_endless_is_bounded_for_a_client_that_never_hangs_up(
    registry: FaultRegistry, model: ModelFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fault_registry, "ENDLESS_LIMIT", 256 * 1024)
    registry.inject(model.layer_digests[0], Fault("endless"))
    with raw_get(registry, blob_path(model.layer_digests[0])) as sock:
        _, body = split_response(read_until_closed(sock))
    assert len(body) == 256 * 1024


def test_long_body_frames_more_bytes_than_the_blob(registry: FaultRegistry, model: ModelFixture) -> None:
    digest = model.layer_digests[0]
    registry.inject(digest, Fault("long_body", extra=1000))
    response, body = request(registry, blob_path(digest))
    assert (response.status, response.headers["Content-Length"]) == (200, str(len(BLOB) + 1000))
    assert len(body) == len(BLOB) + 1000
    assert body[: len(BLOB)] == BLOB
    assert registry.blob_requests(digest)[0].bytes_sent == len(BLOB) + 1000


def test_lying_length_sends_the_whole_body_and_closes_short(registry: FaultRegistry, model: ModelFixture) -> None:
    digest = model.layer_digests[0]
    registry.inject(digest, Fault("lying_length", extra=500))
    with closing(http.client.HTTPConnection(registry.host, timeout=5)) as connection:
        connection.request("GET", blob_path(digest))
        response = connection.getresponse()
        assert response.headers["Content-Length"] == str(len(BLOB) + 500)
        with pytest.raises(http.client.IncompleteRead) as incomplete:
            response.read()
    assert incomplete.value.partial == BLOB
    assert incomplete.value.expected == 500


def test_redirect_loop_goes_round_forever_and_times_counts_loops(registry: FaultRegistry, model: ModelFixture) -> None:
    digest = model.layer_digests[0]
    registry.inject(digest, Fault("redirect_loop", times=2))
    response, _ = request(registry, blob_path(digest))
    assert response.status == 307
    location = response.headers["Location"]
    assert location == f"{registry.url}{blob_path(digest)}?fault-loop=1"
    path = location.removeprefix(registry.url)
    for _ in range(30):
        response, _ = request(registry, path)
        assert (response.status, response.headers["Location"]) == (307, location)
    # urllib gives up on the loop by itself; it is a new attempt, so it opens the second loop.
    with pytest.raises(urllib.error.HTTPError, match="infinite loop") as looped:
        urllib.request.urlopen(registry.url + blob_path(digest))
    looped.value.close()
    assert request(registry, blob_path(digest))[1] == BLOB
    # A loop already open stays open after its fault is used up.
    assert request(registry, path)[0].status == 307
    assert registry.faults_applied == {"redirect_loop": 2}
    assert {r.fault for r in registry.blob_requests(digest)[:-2]} == {"redirect_loop"}
    registry.clear_faults()
    assert request(registry, path)[1] == BLOB


def test_redirect_scheme_points_at_ftp(registry: FaultRegistry, model: ModelFixture) -> None:
    digest = model.layer_digests[0]
    registry.inject(digest, Fault("redirect_scheme"))
    response, body = request(registry, blob_path(digest))
    assert (response.status, response.headers["Location"], body) == (307, "ftp://127.0.0.1/whatever", b"")
    assert request(registry, blob_path(digest))[1] == BLOB


def test_range_ignored_answers_a_range_with_the_whole_blob(registry: FaultRegistry, model: ModelFixture) -> None:
    digest = model.layer_digests[0]
    registry.inject(digest, Fault("range_ignored"))
    response, body = request(registry, blob_path(digest), headers={"Range": "bytes=100-"})
    assert (response.status, body, response.headers["Content-Range"]) == (200, BLOB, None)
    response, body = request(registry, blob_path(digest), headers={"Range": "bytes=100-"})
    assert (response.status, body) == (206, BLOB[100:])
    assert [r.fault for r in registry.blob_requests(digest)] == ["range_ignored", None]


def fault_sequence(seed: int, kinds: list[str | Fault]) -> tuple[list[str | None], dict[str, int]]:
    with FaultRegistry() as server:
        model = server.add_synthetic_model("library/demo", blobs=40, blob_size=512)
        server.inject_random(rate=0.3, kinds=kinds, seed=seed, stall_seconds=0.01)
        for digest in model.layer_digests:
            with closing(http.client.HTTPConnection(server.host, timeout=5)) as connection:
                connection.request("GET", blob_path(digest))
                with contextlib.suppress(http.client.HTTPException, OSError):
                    connection.getresponse().read()
        return [r.fault for r in server.requests], server.faults_applied


def test_inject_random_is_reproducible_and_counted() -> None:
    kinds: list[str | Fault] = ["truncate", "corrupt", Fault("status", status=503)]
    first, applied = fault_sequence(7, kinds)
    assert fault_sequence(7, kinds) == (first, applied)
    assert fault_sequence(8, kinds)[0] != first
    assert 4 <= sum(applied.values()) <= 24
    assert set(applied) <= {"truncate", "corrupt", "status"}
    assert applied == {kind: first.count(kind) for kind in applied}


def test_inject_random_templates_targeted_faults_and_switching_off(
    registry: FaultRegistry, model: ModelFixture
) -> None:
    first, second = model.layer_digests
    registry.inject(first, Fault("status", status=500))
    registry.inject_random(rate=1.0, kinds=[Fault("status", status=503, retry_after="3")], seed=1)
    # The queued fault comes first; manifests, HEAD and 404s never meet a random one.
    assert request(registry, blob_path(first))[0].status == 500
    response, _ = request(registry, blob_path(second))
    assert (response.status, response.headers["Retry-After"]) == (503, "3")
    assert request(registry, "/v2/library/demo/manifests/latest")[0].status == 200
    assert request(registry, blob_path(first), method="HEAD")[0].status == 200
    assert request(registry, blob_path("sha256:" + "1" * 64))[0].status == 404
    assert registry.faults_applied == {"status": 2}
    registry.inject_random(rate=0, kinds=["reset"], seed=1)
    assert request(registry, blob_path(second))[1] == b"second"
    registry.inject_random(rate=1.0, kinds=["corrupt"], seed=1)
    registry.clear_faults()
    assert request(registry, blob_path(second))[1] == b"second"
    with pytest.raises(ValueError, match="rate must be"):
        registry.inject_random(rate=1.5, kinds=["reset"], seed=0)
    with pytest.raises(ValueError, match="kinds must"):
        registry.inject_random(rate=0.5, kinds=[], seed=0)
    with pytest.raises(ValueError, match="unknown fault kind"):
        registry.inject_random(rate=0.5, kinds=["boom"], seed=0)


# --- auth ---------------------------------------------------------------------------------------------------------


def test_token_auth_challenge_token_and_expiry() -> None:
    with FaultRegistry(require_auth=True, token_uses=2) as registry:
        registry.add_synthetic_model("library/demo", blobs=1, blob_size=100)
        response, body = request(registry, "/v2/")
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == (
            f'Bearer realm="http://{registry.host}/token",service="fault-registry"'
        )
        response, body = request(registry, "/v2/library/demo/manifests/latest")
        assert response.status == 401
        assert json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"
        challenge = response.headers["WWW-Authenticate"]
        assert challenge.endswith(',scope="repository:library/demo:pull"')

        realm = re.search(r'realm="([^"]+)"', challenge)
        assert realm is not None
        with urllib.request.urlopen(f"{realm[1]}?service=fault-registry&scope=repository:library/demo:pull") as reply:
            grant = json.load(reply)
        token = grant["token"]
        assert grant["access_token"] == token
        assert grant["expires_in"] == 60
        assert registry.tokens_issued == [token]
        assert len(token) >= 32

        bearer = {"Authorization": f"Bearer {token}"}
        path = "/v2/library/demo/manifests/latest"
        assert [request(registry, path, headers=bearer)[0].status for _ in range(3)] == [200, 200, 401]
        assert request(registry, path, headers={"Authorization": "Bearer guessed"})[0].status == 401
        assert any(r.path.startswith("/token?service=") for r in registry.requests)


def test_a_failing_token_endpoint_issues_nothing() -> None:
    with FaultRegistry(require_auth=True) as registry:
        registry.inject("token", Fault("status", status=500))
        assert request(registry, "/token?service=fault-registry")[0].status == 500
        assert registry.tokens_issued == []
        assert request(registry, "/token?service=fault-registry")[0].status == 200
        assert len(registry.tokens_issued) == 1


def test_token_requests_are_counted_stalled_and_refused_ones_included() -> None:
    with FaultRegistry(require_auth=True) as registry:
        registry.inject("token", Fault("stall_before", seconds=0.1))
        registry.inject("token", Fault("status", status=403))
        with pytest.raises(http.client.RemoteDisconnected):
            request(registry, "/token?service=fault-registry")
        assert request(registry, "/token?service=fault-registry")[0].status == 403
        assert request(registry, "/token?service=fault-registry")[0].status == 200
        request(registry, "/v2/")
        assert [(r.fault, r.status) for r in registry.token_requests] == [
            ("stall_before", 0),
            ("status", 403),
            (None, 200),
        ]


def test_blobs_redirect_to_a_cdn_that_logs_what_arrived() -> None:
    with FaultRegistry(require_auth=True, redirect_blobs=True) as registry:
        model = registry.add_synthetic_model("library/demo", blobs=1, blob_size=5000)
        digest = model.layer_digests[0]
        registry.inject(digest, Fault("corrupt", at=0.0))
        token = json.loads(request(registry, "/token")[1])["token"]
        response, _ = request(registry, blob_path(digest), headers={"Authorization": f"Bearer {token}"})
        assert response.status == 307
        location = response.headers["Location"]
        assert re.fullmatch(rf"http://127\.0\.0\.1:\d+/cdn/{digest}\?sig=abc", location)
        assert not location.startswith(registry.url)
        # urllib follows the redirect by itself and, like a careful client, sends no token there.
        with urllib.request.urlopen(location) as reply:
            body = reply.read()
        assert body[0] == model.blobs[digest][0] ^ 0xFF  # the fault acted where the bytes were served
        assert body[1:] == model.blobs[digest][1:]
        [cdn] = registry.cdn_requests
        assert (cdn.status, cdn.fault, "authorization" in cdn.headers) == (200, "corrupt", False)
        assert [r.status for r in registry.blob_requests(digest)] == [307, 200]
        unsigned = location.split("?")[0]
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(unsigned)
        assert refused.value.code == 403
        refused.value.close()


# --- lifecycle ----------------------------------------------------------------------------------------------------


def test_stop_ends_a_long_stall_at_once(model: ModelFixture, registry: FaultRegistry) -> None:
    registry.inject(model.layer_digests[0], Fault("stall_before", seconds=30))
    with raw_get(registry, blob_path(model.layer_digests[0])) as sock:
        wait_for_requests(registry, 1)
        started = time.monotonic()
        registry.stop()
        assert time.monotonic() - started < 0.5
        sock.settimeout(1)
        assert read_until_closed(sock) == b""


ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def entry_point(*options: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``python -m tests.fault_registry`` run from the repository's root, as the README runs it, and its first line."""
    command = [sys.executable, "-m", "tests.fault_registry", "--port", "0", *options]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 15)
        assert ready, "no output from the entry point"
        yield process, process.stdout.readline()
    finally:
        process.kill()
        process.communicate()


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_entry_point_serves_until_interrupted(stop_signal: signal.Signals) -> None:
    with entry_point("--blobs", "2", "--blob-size", "4096") as (process, line):
        match = re.fullmatch(
            r"serving library/demo:latest at http://(127\.0\.0\.1:\d+)"
            r"  -> try: ollama-pull --insecure \1/library/demo\n",
            line,
        )
        assert match, line
        with urllib.request.urlopen(f"http://{match[1]}/v2/library/demo/manifests/latest") as reply:
            manifest = json.load(reply)
        assert len(manifest["layers"]) == 2
        process.send_signal(stop_signal)
        _, stderr = process.communicate(timeout=10)
    assert process.returncode == 0
    assert stderr == ""


# --- faults from the command line ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "target", "fault"),
    [
        ("reset", "blobs", Fault("reset")),  # blobs, once: the defaults
        ("reset:3", "blobs", Fault("reset", times=3)),
        ("stall_during:2:seconds=5:at=0.25", "blobs", Fault("stall_during", times=2, seconds=5.0, at=0.25)),
        ("slow:rate=1000", "blobs", Fault("slow", rate=1000)),
        ("blobs:corrupt:times=2", "blobs", Fault("corrupt", times=2)),  # times by name too
        ("manifest:status:status=429:retry_after=1", "manifest", Fault("status", status=429, retry_after="1")),
        ("token:status:status=500", "token", Fault("status", status=500)),
        ("long_body:extra=10", "blobs", Fault("long_body", extra=10)),
    ],
)
def test_a_fault_spec_names_its_target_kind_times_and_fields(spec: str, target: str, fault: Fault) -> None:
    assert fault_registry.parse_fault(spec) == (target, fault)


def test_a_fault_spec_can_set_every_field_of_a_fault() -> None:
    assert set(fault_registry._FAULT_FIELDS) == {field.name for field in dataclasses.fields(Fault)} - {"kind"}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("bogus", "unknown fault kind 'bogus'; expected one of stall_before,"),
        ("manifest", "'manifest' names no fault kind"),
        ("reset:0", "times must be at least 1"),
        ("reset:speed=3", "'speed=3' in 'reset:speed=3': expected FIELD=VALUE with FIELD one of times, at,"),
        ("reset:at", "'at' in 'reset:at': expected FIELD=VALUE"),
        ("slow:rate=fast", "'rate=fast' in 'slow:rate=fast': rate must be a whole number"),
        ("truncate:at=2", "at must be a fraction between 0 and 1"),
    ],
)
def test_a_bad_fault_spec_is_a_usage_error_that_says_what_is_wrong(
    spec: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        fault_registry.main(["--fault", spec])
    assert exited.value.code == 2
    assert f"error: argument --fault: {message}" in capsys.readouterr().err


def test_a_fault_from_the_command_line_makes_a_pull_retry(tmp_path: Path) -> None:
    events: list[Event] = []
    with entry_point("--blobs", "1", "--blob-size", "65536", "--fault", "reset:at=0.5") as (process, line):
        match = re.search(r"ollama-pull --insecure (\S+)", line)
        assert match, line
        assert process.stdout is not None
        assert process.stdout.readline() == f"fault on blobs: {Fault('reset', at=0.5)}\n"
        result = asyncio.run(pull(match[1], insecure=True, models_dir=tmp_path, settings=FAST, on_event=events.append))
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=10)
    assert process.returncode == 0
    [retry] = [event for event in events if isinstance(event, BlobRetry)]
    assert (retry.attempt, retry.reason.startswith("connection reset")) == (1, True), retry
    assert result.downloaded_blobs == 2  # the layer and the config, one of them at the second try
