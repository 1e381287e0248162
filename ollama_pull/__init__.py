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
    "ExportResult": ".bundle",
    "ImportResult": ".bundle",
    "ModelReference": ".reference",
    "OllamaPullError": ".errors",
    "PullResult": ".api",
    "Puller": ".api",
    "PushResult": ".push",
    "PushSettings": ".push",
    "export_models": ".bundle",
    "import_bundle": ".bundle",
    "parse_reference": ".reference",
    "pull": ".api",
    "push": ".push",
}

if TYPE_CHECKING:
    from .api import Puller, PullResult, pull
    from .bundle import ExportResult, ImportResult, export_models, import_bundle
    from .engine import Downloader, DownloadSettings
    from .errors import OllamaPullError
    from .push import PushResult, PushSettings, push
    from .reference import ModelReference, parse_reference

__all__ = [
    "DownloadSettings",
    "Downloader",
    "ExportResult",
    "ImportResult",
    "ModelReference",
    "OllamaPullError",
    "PullResult",
    "Puller",
    "PushResult",
    "PushSettings",
    "__version__",
    "export_models",
    "import_bundle",
    "parse_reference",
    "pull",
    "push",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ollama_pull' has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
