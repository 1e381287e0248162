"""Shared fixtures: every test gets its own models directory and no proxy from the environment."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import respx

# respx's httpcore2 mocker (registered by pytest-httpx2) patches httpcore2's pools; a pull's direct connections go
# through a pool of ours, whose requests and responses have the attributes of httpcore's that the mocker uses.
respx.mocks.Mocker.registry["httpcore2"].add_targets("ollama_pull.pool.ConnectionPool")

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy")


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    models = tmp_path / "models"
    monkeypatch.setenv("OLLAMA_MODELS", str(models))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in (
        *PROXY_VARIABLES,
        "OLLAMA_PULL_DEBUG",
        "NO_COLOR",
        "OLLAMA_PULL_USERNAME",
        "OLLAMA_PULL_PASSWORD",
        "DOCKER_CONFIG",
        "SSL_CERT_FILE",
        "OLLAMA_PULL_EVENT_LOOP",
        "HF_TOKEN",
        "HF_TOKEN_PATH",
        "HF_HOME",
        "XDG_CACHE_HOME",
        "SSL_CERT_DIR",
    ):
        monkeypatch.delenv(name, raising=False)
    return models


# The CLI runs on uvloop's event loop when it is installed (the test extra installs it), on asyncio's otherwise.
LOOPS = [pytest.param("asyncio", id="asyncio")]
if importlib.util.find_spec("uvloop") is not None:
    LOOPS.append(pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"))


@pytest.fixture(params=LOOPS)
def anyio_backend(request: pytest.FixtureRequest) -> object:
    """Async tests run through anyio's pytest plugin, which httpx2 already brings: on asyncio's own loop, and
    on uvloop's when it is installed."""
    return request.param
