"""Pull models from an Ollama (OCI distribution v2) registry into the local Ollama model store.

The library is usable without the command line::

    import asyncio
    from ollama_pull import pull

    result = asyncio.run(pull("library/flux2-klein", on_event=print))
"""

__version__ = "0.1.0"

from .engine import Downloader, DownloadSettings
from .errors import OllamaPullError
from .pull import PullResult, pull
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
