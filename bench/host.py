"""This machine: the checkout and its venv, the programs the benchmark runs, and the environment they get."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from common import BenchError, log

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "bench"
VENV_BIN = REPO / ".venv" / "bin"
OLLAMA_PULL = VENV_BIN / "ollama-pull"
VENV_PYTHON = VENV_BIN / "python"
HOST = "127.0.0.1"


def find_program(name: str) -> str | None:
    # nginx lives in /usr/sbin, which is not on every user's PATH.
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin"
    return shutil.which(name, path=path)


def ensure_programs() -> dict[str, str]:
    """nginx, aria2c and curl, installed from Debian packages when missing (apt-get update only then)."""
    wanted = {"nginx": ("nginx-light", "nginx"), "aria2c": ("aria2",), "curl": ("curl",)}
    missing = {name: packages for name, packages in wanted.items() if find_program(name) is None}
    if missing:
        if shutil.which("apt-get") is None:
            raise BenchError(f"missing {', '.join(missing)} and there is no apt-get; install them by hand")
        prefix: list[str] = []
        if os.geteuid() != 0:
            if shutil.which("sudo") is None:
                raise BenchError(f"missing {', '.join(missing)}; run as root or install them by hand")
            prefix = ["sudo"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        log(f"installing {', '.join(missing)} with apt-get")
        # apt's chatter goes to stderr with the rest of the progress: stdout is for the results only.
        subprocess.run([*prefix, "apt-get", "update"], check=True, env=env, stdout=sys.stderr)
        for name, packages in missing.items():
            # nginx-light is the smallest build with everything used here; plain nginx is the fallback.
            for package in packages:
                install = [*prefix, "apt-get", "install", "-y", "--no-install-recommends", package]
                if subprocess.run(install, env=env, check=False, stdout=sys.stderr).returncode == 0:
                    break
            if find_program(name) is None:
                raise BenchError(f"could not install {name} (tried packages {', '.join(packages)})")
    if not OLLAMA_PULL.exists():
        raise BenchError(f"{OLLAMA_PULL} is missing: create the venv and `pip install -e .` first")
    programs = {name: find_program(name) for name in wanted}
    return {name: path for name, path in programs.items() if path is not None}


def compile_bytecode() -> None:
    """Byte-compile the checkout's package, as pip does when it installs a wheel. The venv's install is editable:
    its modules are compiled on import, and with PYTHONDONTWRITEBYTECODE set (as it is on some CI machines) the
    bytecode of every module changed since the last write is compiled again in every timed run: 15-20 ms of each
    pull here, for the engine's five modules changed last (bench/PROFILE.md), a cost no installed copy pays."""
    package = REPO / "ollama_pull"
    result = subprocess.run([str(VENV_PYTHON), "-m", "compileall", "-q", str(package)], capture_output=True, text=True)
    if result.returncode != 0:
        raise BenchError(f"could not byte-compile {package}: {(result.stdout + result.stderr).strip()}")


def child_env() -> dict[str, str]:
    # A proxy from the caller's environment would route loopback traffic elsewhere (curl and aria2c honour
    # http_proxy), and a mirror setting would send ollama-pull elsewhere: the benchmark is loopback only.
    dropped = {"http_proxy", "https_proxy", "all_proxy", "no_proxy", "ollama_pull_mirror", "ollama_models"}
    env = {key: value for key, value in os.environ.items() if key.lower() not in dropped}
    env["NO_PROXY"] = HOST
    return env


def program_version(argv: Sequence[str]) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, check=False, env=child_env())
    text = (result.stdout + result.stderr).strip().splitlines()
    return text[0].strip() if text else "?"
