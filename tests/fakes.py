"""Builders shared by the unit tests: synthetic models, a hand-driven clock, streams that misbehave."""

from __future__ import annotations

import asyncio
import hashlib
import random
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import httpx
import pytest
import respx

from ollama_pull.engine import Downloader, DownloadSettings
from ollama_pull.events import BlobRetry, Event
from ollama_pull.manifest import TENSOR_MEDIA_TYPE, Layer, Manifest, parse_manifest
from ollama_pull.network import make_client
from ollama_pull.reference import parse_reference
from ollama_pull.registry import RegistryClient
from ollama_pull.retry import Backoff
from ollama_pull.store import Store

from .fault_registry import build_manifest

REF = parse_reference("registry.test/ns/model:tag")
BASE = "https://registry.test/v2/ns/model"
FAST = DownloadSettings(backoff=Backoff(base=0.0, cap=0.0), check_interval=0.005)


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Model:
    manifest: Manifest
    blobs: dict[str, bytes]

    @property
    def layers(self) -> tuple[Layer, ...]:
        return self.manifest.blobs


def make_model(*sizes: int, seed: int = 1) -> Model:
    config = b'{"model_format":"safetensors"}'
    layers = [
        (TENSOR_MEDIA_TYPE, random.Random(seed * 1000 + index).randbytes(size), f"tensor/{index}.st")
        for index, size in enumerate(sizes)
    ]
    blobs = {digest_of(data): data for data in (config, *(data for _, data, _ in layers))}
    return Model(parse_manifest(build_manifest(config, layers), model="m"), blobs)


class FakeClock:
    """Time that moves only when a test or a fake server says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class ChunkStream(httpx.AsyncByteStream):
    """A body sent in chunks; each chunk moves the fake clock, and the stream may stall for good after some."""

    def __init__(
        self,
        data: bytes,
        *,
        chunk: int = 16384,
        clock: FakeClock | None = None,
        seconds_per_chunk: float = 0.0,
        stall_after: int | None = None,
    ) -> None:
        self.data = data
        self.chunk = chunk
        self.clock = clock
        self.seconds_per_chunk = seconds_per_chunk
        self.stall_after = stall_after

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for count, start in enumerate(range(0, len(self.data), self.chunk)):
            if self.stall_after is not None and count >= self.stall_after:
                await asyncio.Event().wait()
            if self.clock is not None:
                self.clock.advance(self.seconds_per_chunk)
            # A real pause lets the engine's watchdog run between chunks.
            await asyncio.sleep(0.001 if self.seconds_per_chunk else 0)
            yield self.data[start : start + self.chunk]


def registry_for(router: respx.MockRouter, *, attempts: int = 6, stall_timeout: float = 10.0) -> RegistryClient:
    client = make_client()
    return RegistryClient(
        client, attempts=attempts, backoff=Backoff(base=0.0, cap=0.0), sleep=no_sleep, stall_timeout=stall_timeout
    )


async def no_sleep(_seconds: float) -> None:
    await asyncio.sleep(0)


async def download(
    router: respx.MockRouter,
    model: Model,
    store: Store,
    *,
    settings: DownloadSettings = FAST,
    clock: Callable[[], float] | None = None,
) -> list[Event]:
    events: list[Event] = []
    store.prepare()
    registry = registry_for(router)
    engine = Downloader(
        registry,
        store,
        settings=settings,
        on_event=events.append,
        sleep=no_sleep,
        **({"clock": clock} if clock else {}),
    )
    async with registry.client:
        await engine.download(REF, model.layers, model="m")
    return events


def assert_store_holds(store: Store, model: Model) -> None:
    names = sorted(path.name for path in store.blobs_dir.iterdir())
    assert names == sorted(digest.replace(":", "-") for digest in model.blobs)
    for digest, data in model.blobs.items():
        assert store.blob_path(digest).read_bytes() == data


def retries(events: list[Event]) -> list[BlobRetry]:
    return [event for event in events if isinstance(event, BlobRetry)]


async def cancel_while_in_thread(started: threading.Event, release: threading.Event, work: Awaitable[object]) -> None:
    """Cancel ``work`` once a worker thread it started is inside (``started``), let the thread go on only after the
    cancel (``release``), and expect the cancel to come out of ``work``."""
    task = asyncio.ensure_future(work)
    while not started.is_set():
        await asyncio.sleep(0.001)
    task.cancel()
    await asyncio.sleep(0.01)
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
