"""The dependency bounds: every run-time dependency is bounded, and CI's oldest run installs the lower bounds."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def release(version: str) -> tuple[int, ...]:
    """``42`` and ``42.0.0`` are the same release."""
    parts = [int(part) for part in version.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


def test_the_oldest_constraints_are_the_lower_bounds_of_the_run_time_dependencies() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # The uvloop extra is run time too: the CLI runs on it when it is installed.
    dependencies = project["dependencies"] + project["optional-dependencies"]["uvloop"]
    lower = {}
    for requirement in dependencies:
        requirement, _, _marker = requirement.partition(";")
        found = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+),<[0-9.]+", requirement.strip())
        assert found, f"{requirement!r}: a run-time dependency needs a lower and an upper bound"
        lower[found[1]] = release(found[2])
    lines = (ROOT / ".ci" / "constraints-oldest.txt").read_text().splitlines()
    pinned = dict(line.split("==") for line in lines if line and not line.startswith("#"))
    assert {name: release(version) for name, version in pinned.items()} == lower
