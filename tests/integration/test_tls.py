"""A custom CA: an HTTPS registry on 127.0.0.1 whose certificate comes from a CA the test makes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import http.server
import ipaddress
import os
import platform
import ssl
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ollama_pull import Puller
from ollama_pull import pull as api_pull
from ollama_pull.drain import DRAIN, DRAIN_MIN
from ollama_pull.network import DirectTransport, PullClient, make_client
from ollama_pull.processes import MIN_BLOBS
from ollama_pull.store import Store
from tests.fakes import FAST
from tests.fault_registry import FaultRegistry

from .conftest import Run, assert_store_holds, cli_command, cli_env, reference

pytestmark = pytest.mark.integration


def certificate_authority(directory: Path) -> tuple[Path, ssl.SSLContext]:
    """A CA (written to ca.pem) and a server context whose certificate it signed for 127.0.0.1."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ollama-pull test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    chain = directory / "server.pem"
    chain.write_bytes(
        server.public_bytes(serialization.Encoding.PEM)
        + server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(chain)
    return ca_path, context


@pytest.fixture
def https_registry(tmp_path: Path) -> Iterator[tuple[FaultRegistry, Path]]:
    ca_path, context = certificate_authority(tmp_path)
    with FaultRegistry(tls=context) as registry:
        yield registry, ca_path


def pull(models: Path, *args: str, **environment: str) -> Run:
    done = subprocess.run(
        cli_command(*args), env=cli_env(models) | environment, capture_output=True, text=True, timeout=60
    )
    return Run(done.returncode, done.stdout, done.stderr)


def test_an_unknown_ca_is_refused_with_the_fix_in_the_message(
    https_registry: tuple[FaultRegistry, Path], models: Path
) -> None:
    registry, _ = https_registry
    model = registry.add_synthetic_model("library/demo", blobs=2, blob_size=4096)
    run = pull(models, "--retries", "1", reference(registry, model))
    assert run.returncode == 1
    assert "TLS certificate is not trusted" in run.stderr
    assert "--ca-cert" in run.stderr
    assert not models.exists()


def test_ca_cert_option_trusts_the_ca(https_registry: tuple[FaultRegistry, Path], models: Path) -> None:
    registry, ca_path = https_registry
    model = registry.add_synthetic_model("library/demo", blobs=3, blob_size=4096)
    run = pull(models, "--ca-cert", str(ca_path), reference(registry, model))
    assert run.returncode == 0, run.stderr
    assert_store_holds(models, registry, model)


def test_ssl_cert_file_trusts_the_ca(https_registry: tuple[FaultRegistry, Path], models: Path) -> None:
    registry, ca_path = https_registry
    model = registry.add_synthetic_model("library/demo", blobs=3, blob_size=4096)
    run = pull(models, reference(registry, model), SSL_CERT_FILE=str(ca_path))
    assert run.returncode == 0, run.stderr
    assert_store_holds(models, registry, model)


@pytest.mark.parametrize("bundle", ["missing", "not PEM"])
@pytest.mark.parametrize("dry_run", [False, True])
def test_a_bundle_that_ssl_cert_file_names_and_that_cannot_be_loaded_is_a_one_line_error(
    https_registry: tuple[FaultRegistry, Path], models: Path, tmp_path: Path, bundle: str, dry_run: bool
) -> None:
    registry, _ = https_registry
    model = registry.add_synthetic_model("library/demo", blobs=2, blob_size=4096)
    path = tmp_path / "bundle.pem"
    if bundle == "not PEM":
        path.write_text("not a certificate\n")
    run = pull(models, *(["--dry-run"] if dry_run else []), reference(registry, model), SSL_CERT_FILE=str(path))
    assert run.returncode == 1
    [line] = run.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot use the CA certificates SSL_CERT_FILE names ({path}): ")
    assert line.endswith("point SSL_CERT_FILE at a PEM bundle, or unset it")
    assert not models.exists()


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_ca_cert_that_cannot_be_loaded_is_a_one_line_error_before_any_request(
    https_registry: tuple[FaultRegistry, Path], models: Path, tmp_path: Path, dry_run: bool
) -> None:
    registry, _ = https_registry
    model = registry.add_synthetic_model("library/demo", blobs=2, blob_size=4096)
    path = tmp_path / "ca.pem"
    path.write_text("not a certificate\n")
    requests = len(registry.requests)
    run = pull(models, *(["--dry-run"] if dry_run else []), "--ca-cert", str(path), reference(registry, model))
    assert run.returncode == 1
    [line] = run.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot use the CA certificate {path}: ")
    assert len(registry.requests) == requests
    assert not models.exists()


def test_a_pull_over_plain_http_never_loads_the_bundle_ssl_cert_file_names(models: Path, tmp_path: Path) -> None:
    # The context is made only for TLS, so a bundle that cannot be loaded fails only what needs it.
    with FaultRegistry() as plain:
        model = plain.add_synthetic_model("library/demo", blobs=2, blob_size=4096)
        run = pull(models, f"http://{reference(plain, model)}", SSL_CERT_FILE=str(tmp_path / "missing.pem"))
        assert run.returncode == 0, run.stderr
        assert_store_holds(models, plain, model)


@contextlib.contextmanager
def redirecting(target: FaultRegistry, ca_path: Path, *, manifests: bool) -> Iterator[str]:
    """A registry over plain HTTP that sends every request on to ``target`` (with a 307), or every request but a
    manifest's, which it fetches from ``target`` itself; yields its host:port."""
    trusted = ssl.create_default_context(cafile=str(ca_path))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if not manifests and "/manifests/" in self.path:
                asked = urllib.request.Request(target.url + self.path, headers={"Accept": self.headers["Accept"]})
                with urllib.request.urlopen(asked, context=trusted) as answer:
                    body, kind = answer.read(), answer.headers["Content-Type"]
                headers = [("Content-Type", kind), ("Content-Length", str(len(body)))]
                self.send_response(200)
            else:
                body, headers = b"", [("Location", target.url + self.path), ("Content-Length", "0")]
                self.send_response(307)
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request: object, client_address: object) -> None:
            # A client that went away mid-answer is no news here.
            pass

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize("manifests", [True, False])
def test_a_plain_http_registry_that_sends_the_pull_to_tls_with_an_unusable_bundle_is_one_line_and_no_retry(
    https_registry: tuple[FaultRegistry, Path], models: Path, tmp_path: Path, manifests: bool
) -> None:
    # The context is made at that first TLS connection; no retry can get past a bundle that cannot be loaded.
    registry, ca_path = https_registry
    model = registry.add_synthetic_model("library/demo", blobs=MIN_BLOBS, blob_size=4096)
    path = tmp_path / "missing.pem"
    with redirecting(registry, ca_path, manifests=manifests) as host:
        run = pull(models, f"http://{host}/{model.name}:{model.tag}", SSL_CERT_FILE=str(path))
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert [line for line in lines if "retry" in line] == []
    [error] = [line for line in lines if line.startswith("error: ")]
    assert f"cannot use the CA certificates SSL_CERT_FILE names ({path}): " in error
    assert error.endswith("point SSL_CERT_FILE at a PEM bundle, or unset it")
    assert not (models / "manifests").exists()


@pytest.mark.anyio
async def test_the_tls_context_is_made_for_the_first_tls_connection_or_when_a_pull_needs_it(
    https_registry: tuple[FaultRegistry, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Making one loads httpcore2 (and, to verify, the system's CAs): a pull over plain HTTP never needs one.
    registry, ca_path = https_registry
    made: list[ssl.SSLContext] = []
    create = httpx2.create_ssl_context

    def counting(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        made.append(create(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(httpx2, "create_ssl_context", counting)
    with FaultRegistry() as plain:
        for insecure in (True, False):
            made.clear()
            async with make_client(insecure=insecure, ca_cert=ca_path) as client:
                assert (await client.get(f"{plain.url}/v2/")).status_code == 200
                assert made == []
                # Two requests at once, on two connections: one context.
                responses = await asyncio.gather(*(client.get(f"{registry.url}/v2/") for _ in range(2)))
                assert [response.status_code for response in responses] == [200, 200]
                assert isinstance(client, PullClient)
                assert isinstance(client.blob_transport, DirectTransport)
                assert len(client.blob_transport.pool.connections) == 3
                assert len(made) == 1
        # A puller makes it before its first request to a registry over HTTPS (and the CLI before it forks its
        # spares, which then share it), not for one over plain HTTP.
        plain_model = plain.add_synthetic_model("library/demo", blobs=1, blob_size=64)
        secure_model = registry.add_synthetic_model("library/demo", blobs=1, blob_size=64)
        made.clear()
        async with Puller(models_dir=tmp_path / "models", ca_cert=ca_path) as puller:
            puller.prepare([f"http://{reference(plain, plain_model)}"])
            await puller.resolve(f"http://{reference(plain, plain_model)}")
            assert made == []
            puller.prepare([f"http://{reference(plain, plain_model)}", reference(registry, secure_model)])
            assert len(made) == 1
            await puller.resolve(reference(registry, secure_model))
            assert len(made) == 1
        async with Puller(models_dir=tmp_path / "models", ca_cert=ca_path) as puller:
            await puller.resolve(reference(registry, secure_model))
            assert len(made) == 2


@pytest.mark.anyio
@pytest.mark.skipif(platform.system() != "Linux", reason="macOS and Windows trust their stores through truststore")
async def test_a_ca_in_the_systems_store_is_trusted_without_flags(
    https_registry: tuple[FaultRegistry, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Installing a CA into this machine's store is not a test's to do; OpenSSL's default paths, where
    # update-ca-certificates writes, are what Python reports, so the test makes them point at its CA.
    registry, ca_path = https_registry
    async with make_client() as client:
        with pytest.raises(httpx2.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await client.get(f"{registry.url}/v2/")
    paths = ssl.get_default_verify_paths()
    system_store = paths._replace(openssl_cafile=str(ca_path), openssl_capath=str(tmp_path / "no-such-directory"))
    monkeypatch.setattr(ssl, "get_default_verify_paths", lambda: system_store)
    async with make_client() as client:
        response = await client.get(f"{registry.url}/v2/")
    assert response.status_code in (200, 401)


@pytest.mark.anyio
async def test_over_tls_a_large_blob_is_read_by_the_event_loop_and_comes_in_chunks_from_the_start(
    https_registry: tuple[FaultRegistry, Path], tmp_path: Path
) -> None:
    registry, ca_path = https_registry
    data = os.urandom(2 * DRAIN_MIN + 99)
    model = registry.add_model("ns/big", layers=[("application/vnd.ollama.image.model", data, None)])
    digest = model.layer_digests[0]
    async with make_client(ca_cert=ca_path) as client:
        # A TLS socket carries ciphertext: no thread of ours may read it, so no body is offered to a drain.
        async with client.stream("GET", f"{registry.url}/v2/ns/big/blobs/{digest}") as response:
            assert DRAIN not in response.extensions
            assert await response.aread() == data
        registry.reset_log()
        settings = dataclasses.replace(FAST, split_min_size=DRAIN_MIN, chunk_size=DRAIN_MIN // 2)
        await api_pull(f"{registry.host}/ns/big", models_dir=tmp_path, settings=settings, client=client)
    assert Store(tmp_path).blob_path(digest).read_bytes() == data
    # No one stream first, as over plain HTTP: with nothing to tell the link's speed from ours, every request is
    # a chunk.
    ranges = [request.range for request in registry.blob_requests(digest)]
    assert len(ranges) == 5
    assert all(ranges)
