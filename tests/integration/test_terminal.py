"""What a person sees: the CLI in a real terminal (tmux), its screen captured mid-pull and at the end."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fault_registry import TENSOR_MEDIA_TYPE, Fault, FaultRegistry

from .conftest import cli_command, cli_env, reference

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (.ci/run installs it)"),
]


class Terminal:
    """A detached tmux session on its own server socket, so tests never touch a user's tmux."""

    def __init__(self) -> None:
        self.socket = f"ollama-pull-test-{uuid.uuid4().hex[:8]}"

    def tmux(self, *args: str) -> str:
        done = subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=10)
        return done.stdout

    def run(self, command: list[str], env: dict[str, str], *, width: int = 120, height: int = 40) -> None:
        exports = " ".join(f"{key}={shlex.quote(value)}" for key, value in env.items())
        shell = f"env -i {exports} {shlex.join(command)}; echo EXIT=$?; sleep 600"
        self.tmux("new-session", "-d", "-x", str(width), "-y", str(height), "-s", "pull", shell)

    def screen(self, *, escapes: bool = False, joined: bool = False) -> str:
        """The visible screen; ``joined`` glues each wrapped line back together, so a row that wrapped shows as one
        line longer than the terminal is wide."""
        options = [*(["-e"] if escapes else []), *(["-J"] if joined else [])]
        return self.tmux("capture-pane", "-p", *options, "-t", "pull")

    def wait_for(self, condition: Callable[[str], bool], timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if condition(screen):
                return screen
            assert time.monotonic() < deadline, f"the screen never showed what was expected:\n{screen}"
            time.sleep(0.05)

    def close(self) -> None:
        self.tmux("kill-server")


@pytest.fixture
def terminal() -> Iterator[Terminal]:
    term = Terminal()
    try:
        yield term
    finally:
        term.close()


def terminal_env(models: Path, **extra: str) -> dict[str, str]:
    env = cli_env(models)
    env.pop("NO_COLOR", None)
    keep = {key: env[key] for key in ("PATH", "HOME", "OLLAMA_MODELS", "PYTHONUNBUFFERED", "LANG") if key in env}
    return {**keep, "TERM": "xterm-256color", "LANG": "C.UTF-8", **extra}


def test_bars_mid_pull_and_the_summary_at_the_end(registry: FaultRegistry, models: Path, terminal: Terminal) -> None:
    model = registry.add_synthetic_model("library/demo", blobs=12, blob_size=256 * 1024)
    slow = model.layer_digests[0]
    registry.inject(slow, Fault("slow", rate=192 * 1024))
    terminal.run(cli_command("--insecure", "-j", "12", reference(registry, model)), terminal_env(models))

    label = "text_encoder/layer-000.safetensors"
    mid = terminal.wait_for(lambda screen: label in screen and "━" in screen)
    lines = mid.splitlines()
    overall = next(line for line in lines if line.startswith(f"{registry.host}/library/demo:latest"))
    assert "━" in overall
    assert "MiB" in overall
    blob_bar = next(line for line in lines if line.strip().startswith(label))
    assert "━" in blob_bar
    assert "KiB" in blob_bar or "MiB" in blob_bar
    # Twelve blobs at once, eight bars: the rest are summed up on one line.
    assert sum(line.startswith("  text_encoder/") for line in lines) <= 8

    end = terminal.wait_for(lambda screen: "EXIT=" in screen)
    assert "EXIT=0" in end
    assert f"pulled {registry.host}/library/demo:latest" in end
    assert "13 blobs new, 0 present" in end
    assert "text_encoder/layer-" not in end  # finished blob bars are gone
    assert "Traceback" not in end


def test_errors_are_red_one_liners_and_no_color_is_honoured(
    registry: FaultRegistry, models: Path, terminal: Terminal
) -> None:
    command = cli_command("--insecure", f"{registry.host}/library/missing")
    terminal.run(command, terminal_env(models))
    terminal.wait_for(lambda screen: "EXIT=" in screen)
    coloured = terminal.screen(escapes=True)
    error_line = next(line for line in coloured.splitlines() if "not found" in line)
    assert "\x1b[31m" in error_line or "\x1b[1;31m" in error_line  # red (tmux may split bold and colour)
    assert "EXIT=3" in terminal.screen()

    terminal.close()
    plain = Terminal()
    try:
        plain.run(command, terminal_env(models, NO_COLOR="1"))
        plain.wait_for(lambda screen: "EXIT=" in screen)
        screen = plain.screen(escapes=True)
        error_line = next(line for line in screen.splitlines() if "not found" in line)
        # Bold may stay (NO_COLOR is about colour); no colour code may.
        assert "31m" not in error_line
        assert "\x1b[38;" not in error_line
    finally:
        plain.close()


@pytest.mark.parametrize(("width", "height"), [(80, 24), (60, 24)])
def test_no_row_wraps_or_overflows_at_80_or_60_columns(
    registry: FaultRegistry, models: Path, terminal: Terminal, width: int, height: int
) -> None:
    long = "text_encoder/model.layers.{:02d}.self_attn.q_proj.weight-of-a-rather-long-checkpoint.safetensors"
    layers = [(TENSOR_MEDIA_TYPE, os.urandom(200 * 1024), long.format(n)) for n in range(12)]
    model = registry.add_model("some-team/a-model-with-a-long-name", "q4_K_M-2026-12", layers=layers)
    registry.inject("blobs", Fault("slow", rate=128 * 1024, times=12))
    terminal.run(cli_command("--insecure", "-j", "12", reference(registry, model)), terminal_env(models), width=width)
    terminal.tmux("resize-window", "-t", "pull", "-x", str(width), "-y", str(height))

    def rows_fit(screen: str) -> bool:
        return all(len(line) <= width for line in screen.splitlines())

    mid = terminal.wait_for(lambda screen: "━" in screen and "  text_enc" in screen)
    assert rows_fit(terminal.screen(joined=True)), terminal.screen(joined=True)
    assert "…" in mid  # the long labels are cut, not wrapped
    assert "MiB" in mid or "KiB" in mid
    end = terminal.wait_for(lambda screen: "EXIT=" in screen)
    assert "EXIT=0" in end
    assert rows_fit(terminal.screen(joined=True)), terminal.screen(joined=True)
    assert "pulled " in end
    assert "13 blobs new, 0 present" in end
