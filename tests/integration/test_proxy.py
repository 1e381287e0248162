"""Corporate networks: the pull through a real forward proxy (tinyproxy on 127.0.0.1), and NO_PROXY around it."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fault_registry import FaultRegistry

from .conftest import Run, assert_store_holds, cli_command, cli_env, reference

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("tinyproxy") is None, reason="tinyproxy is not installed (.ci/run installs it)"),
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[str]:
    """tinyproxy in the foreground on a free loopback port; yields its URL."""
    port = free_port()
    config = tmp_path / "tinyproxy.conf"
    config.write_text(
        f"Port {port}\nListen 127.0.0.1\nTimeout 60\nMaxClients 50\nAllow 127.0.0.1\nLogLevel Info\n"
        f'LogFile "{tmp_path / "tinyproxy.log"}"\n'
    )
    process = subprocess.Popen(
        ["tinyproxy", "-d", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert process.poll() is None, "tinyproxy exited at start"
                assert time.monotonic() < deadline, "tinyproxy did not start"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


def pull(models: Path, ref: str, **environment: str) -> Run:
    env = cli_env(models) | environment
    done = subprocess.run(
        cli_command("--insecure", ref), env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )
    return Run(done.returncode, done.stdout, done.stderr)


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy", "ALL_PROXY"])
def test_requests_go_through_the_proxy(registry: FaultRegistry, models: Path, proxy: str, variable: str) -> None:
    model = registry.add_synthetic_model("library/demo", blobs=4, blob_size=32 * 1024)
    run = pull(models, reference(registry, model), **{variable: proxy})
    assert run.returncode == 0, run.stderr
    assert_store_holds(models, registry, model)
    # tinyproxy stamps every request it forwards; every one that reached the registry carries it.
    assert len(registry.requests) == 6
    assert all("tinyproxy" in record.headers.get("via", "") for record in registry.requests)


def test_no_proxy_goes_around_it(registry: FaultRegistry, models: Path, proxy: str) -> None:
    model = registry.add_synthetic_model("library/demo", blobs=2, blob_size=1024)
    run = pull(models, reference(registry, model), HTTP_PROXY=proxy, NO_PROXY="127.0.0.1")
    assert run.returncode == 0, run.stderr
    assert registry.requests
    assert all("via" not in record.headers for record in registry.requests)


def test_a_proxy_that_is_down_is_a_clear_error(registry: FaultRegistry, models: Path) -> None:
    model = registry.add_synthetic_model("library/demo", blobs=1, blob_size=1024)
    env = cli_env(models) | {"HTTP_PROXY": f"http://127.0.0.1:{free_port()}"}
    done = subprocess.run(
        cli_command("--insecure", "--retries", "1", reference(registry, model)),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "connection failed" in done.stderr
    assert "Traceback" not in done.stderr
    assert registry.requests == []
