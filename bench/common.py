"""What every part of the benchmark shares: byte units, its errors, and its progress log."""

from __future__ import annotations

import sys

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB


class BenchError(Exception):
    """The benchmark itself cannot go on (a tool is missing, nginx does not start)."""


class StoreMismatch(BenchError):
    """ollama-pull said it succeeded but its store is not byte for byte what the registry serves."""


def log(message: str) -> None:
    # Progress goes to stderr so that stdout carries only the results.
    print(message, file=sys.stderr, flush=True)
