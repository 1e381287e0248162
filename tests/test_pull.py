"""The pull end to end through the library API, against respx routes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import httpx
import pytest
import respx

from ollama_pull import Puller, pull
from ollama_pull.errors import BlobError, InvalidManifest
from ollama_pull.events import BlobStarted, Event, ManifestResolved, PullFinished, Resolving, WritingManifest
from ollama_pull.manifest import Layer
from ollama_pull.network import make_client
from ollama_pull.progress import Tally
from ollama_pull.store import Store

from .fakes import BASE, FAST, REF, ChunkStream, Model, make_model

pytestmark = pytest.mark.anyio


def routes(router: respx.MockRouter, model: Model) -> None:
    router.get(f"{BASE}/manifests/tag").respond(200, content=model.manifest.raw)
    for digest, data in model.blobs.items():
        router.get(f"{BASE}/blobs/{digest}").mock(
            side_effect=lambda _request, data=data: httpx.Response(200, stream=ChunkStream(data))
        )


async def run(router: respx.MockRouter, models: Path, events: list[Event] | None = None) -> object:
    async with make_client() as client:
        sink = events if events is not None else []
        return await pull(REF, models_dir=models, settings=FAST, client=client, on_event=sink.append)


async def test_pull_writes_blobs_then_the_exact_manifest(tmp_path: Path) -> None:
    model = make_model(1000, 2000, 3000)
    events: list[Event] = []
    with respx.mock(using="httpcore2", assert_all_called=False) as router:
        routes(router, model)
        result = await run(router, tmp_path, events)
    store = Store(tmp_path)
    manifest_path = tmp_path / "manifests" / "registry.test" / "ns" / "model" / "tag"
    assert manifest_path.read_bytes() == model.manifest.raw
    for digest, data in model.blobs.items():
        assert store.blob_path(digest).read_bytes() == data
    assert sorted(p.name for p in store.blobs_dir.iterdir()) == sorted(d.replace(":", "-") for d in model.blobs)
    assert isinstance(events[0], Resolving)
    assert isinstance(events[1], ManifestResolved)
    assert isinstance(events[-2], WritingManifest)
    assert isinstance(events[-1], PullFinished)
    assert events[-1].downloaded_blobs == 4
    assert events[-1].digest == model.manifest.digest
    assert getattr(result, "manifest_path", None) == manifest_path


async def test_present_blobs_are_skipped_and_counted_as_done(tmp_path: Path) -> None:
    model = make_model(1000, 2000, 3000)
    store = Store(tmp_path)
    store.prepare()
    present = model.layers[2]
    store.blob_path(present.digest).write_bytes(model.blobs[present.digest])
    events: list[Event] = []
    with respx.mock(using="httpcore2", assert_all_called=False) as router:
        routes(router, model)
        await run(router, tmp_path, events)
        assert router.get(f"{BASE}/blobs/{present.digest}").call_count == 0
    resolved = events[1]
    assert isinstance(resolved, ManifestResolved)
    assert (resolved.present_blobs, resolved.present_bytes) == (1, 2000)
    tally = Tally()
    tally.apply(resolved)
    assert tally.completed == 2000
    assert present.digest not in {event.digest for event in events if isinstance(event, BlobStarted)}


async def test_which_blobs_are_present_is_told_without_comparing_layers_to_each_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Comparing each layer with those found present grew with the square of the blobs: 0.9 s for 4,096.
    model = make_model(1000, 2000, 3000)
    store = Store(tmp_path)
    store.prepare()
    for layer in model.layers[1:3]:
        store.blob_path(layer.digest).write_bytes(model.blobs[layer.digest])

    def refused(self: Layer, other: object) -> bool:
        raise AssertionError("two layers compared")

    monkeypatch.setattr(Layer, "__eq__", refused)
    with respx.mock(using="httpcore2", assert_all_called=False) as router:
        routes(router, model)
        async with make_client() as client, Puller(models_dir=tmp_path, settings=FAST, client=client) as puller:
            plan = await puller.resolve(REF)
    assert [layer.digest for layer in plan.present] == [layer.digest for layer in model.layers[1:3]]
    assert [layer.digest for layer in plan.missing] == [model.layers[0].digest, model.layers[3].digest]


async def test_a_blob_with_the_wrong_size_on_disk_is_downloaded_again(tmp_path: Path) -> None:
    model = make_model(1000)
    store = Store(tmp_path)
    store.prepare()
    layer = model.layers[1]
    store.blob_path(layer.digest).write_bytes(b"short")
    with respx.mock(using="httpcore2", assert_all_called=False) as router:
        routes(router, model)
        await run(router, tmp_path)
    assert store.blob_path(layer.digest).read_bytes() == model.blobs[layer.digest]


async def test_an_invalid_manifest_writes_nothing(tmp_path: Path) -> None:
    with respx.mock(using="httpcore2", assert_all_called=False) as router:
        router.get(f"{BASE}/manifests/tag").respond(200, json={"schemaVersion": 2, "config": {}, "layers": []})
        with pytest.raises(InvalidManifest):
            await run(router, tmp_path / "models")
    assert not (tmp_path / "models").exists()


async def test_a_failed_blob_leaves_no_manifest_and_no_unverified_blob(tmp_path: Path) -> None:
    model = make_model(1000, 2000)
    bad = model.layers[2]
    with respx.mock(using="httpcore2", assert_all_called=False) as router:
        routes(router, model)
        router.get(f"{BASE}/blobs/{bad.digest}").respond(500)
        with pytest.raises(BlobError, match="HTTP 500"):
            async with make_client() as client:
                await pull(REF, models_dir=tmp_path, settings=dataclasses.replace(FAST, attempts=2), client=client)
    assert not (tmp_path / "manifests").exists()
    store = Store(tmp_path)
    for path in store.blobs_dir.iterdir():
        digest = path.name.replace("-", ":", 1)
        assert model.blobs[digest] == path.read_bytes()
    assert not store.blob_path(bad.digest).exists()


async def test_one_puller_pulls_twice_with_one_client_and_closes_only_its_own(tmp_path: Path) -> None:
    model = make_model(1000, 2000)
    with respx.mock(using="httpcore2", assert_all_called=False) as router:
        routes(router, model)
        async with Puller(models_dir=str(tmp_path), settings=FAST) as puller:
            first = await puller.pull(REF)
            # The second pull finds every blob in place and asks the registry for the manifest alone.
            second = await puller.pull(REF)
            client = puller.client
        assert client.is_closed
        assert (first.downloaded_blobs, second.downloaded_blobs, second.present_blobs) == (3, 0, 3)
        async with make_client() as shared:
            async with Puller(models_dir=tmp_path, settings=FAST, client=shared) as puller:
                assert (await puller.resolve(REF)).missing == ()
            assert not shared.is_closed
        assert router.get(f"{BASE}/manifests/tag").call_count == 3
