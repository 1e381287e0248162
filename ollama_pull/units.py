"""Byte counts and counts of things, as people read them: binary units everywhere, as ``--max-rate`` takes them."""

from __future__ import annotations


def format_size(size: float) -> str:
    """Binary units, one decimal, no thousands separator: ``512 B``, ``1.5 KiB``, ``1005.6 KiB``, ``3.2 GiB``."""
    value, unit = _scaled(size)
    return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"


def format_progress(completed: float, total: float) -> str:
    """``12.5/40.0 MiB``, the unit written once when both sides share it: the width of a progress row is dear."""
    done, done_unit = _scaled(completed)
    whole, whole_unit = _scaled(total)
    if done_unit == whole_unit:
        precision = 0 if whole_unit == "B" else 1
        return f"{done:.{precision}f}/{whole:.{precision}f} {whole_unit}"
    return f"{format_size(completed)}/{format_size(total)}"


def format_rate(bytes_per_second: float) -> str:
    return f"{format_size(bytes_per_second)}/s"


def plural(count: int, noun: str) -> str:
    """``1 blob``, ``2 blobs``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _scaled(size: float) -> tuple[float, str]:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return size, unit
        size /= 1024
    raise AssertionError("unreachable")
