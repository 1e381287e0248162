"""Pull models from an Ollama (OCI distribution v2) registry into the local Ollama model store.

The library is usable without the command line::

    import asyncio
    from ollama_pull import pull

    result = asyncio.run(pull("library/flux2-klein", on_event=print))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Exports load on first use: `ollama-pull --version` and `--help` should not pay for httpx2, asyncio and
# cryptography.
_EXPORTS = {
    "DownloadSettings": ".engine",
    "Downloader": ".engine",
    "ModelReference": ".reference",
    "OllamaPullError": ".errors",
    "PullResult": ".api",
    "parse_reference": ".reference",
    "pull": ".api",
}

if TYPE_CHECKING:
    from .api import PullResult, pull
    from .engine import Downloader, DownloadSettings
    from .errors import OllamaPullError
    from .reference import ModelReference, parse_reference

__all__ = [
    "DownloadSettings",
    "Downloader",
    "ModelReference",
    "OllamaPullError",
    "PullResult",
    "__version__",
    "parse_reference",
    "pull",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ollama_pull' has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
