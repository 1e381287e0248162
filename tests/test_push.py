"""The push client against an in-memory OCI registry behind httpx2.MockTransport: sessions, chunks, mounts,
retries, and the errors a refusal becomes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from ollama_pull.bundle import export_models
from ollama_pull.errors import AuthenticationError, IncompleteModel, IntegrityError, InvalidBundle, RegistryError
from ollama_pull.events import BlobMounted, BlobProgress, BlobRetry, Event, PushFinished, PushPlanned
from ollama_pull.housekeeping import prune
from ollama_pull.network import make_client
from ollama_pull.push import PushSettings, _body, _Progress, push, push_source
from ollama_pull.reference import parse_reference
from ollama_pull.retry import Backoff
from ollama_pull.store import Store

from .fakes import Model, cancel_while_in_thread, make_model, no_sleep

pytestmark = pytest.mark.anyio

SOURCE = "registry.test/ns/model:tag"
FAST = PushSettings(backoff=Backoff(0.0, 0.0), chunked_min_size=4096, chunk_size=1500)


class MemoryRegistry:
    """Just enough of the distribution API: HEAD/POST/PATCH/PUT for blobs, HEAD/PUT for manifests, mounts."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[str, bytes] = {}
        self.sessions: dict[str, bytearray] = {}
        self.log: list[tuple[str, str]] = []
        self.fail_next: list[httpx2.Response] = []
        self.mountable = True

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        self.log.append((request.method, path))
        if self.fail_next and request.method in ("PUT", "PATCH"):
            return self.fail_next.pop(0)
        if "/blobs/uploads/" in path:
            repository, session = path.removeprefix("/v2/").split("/blobs/uploads/", 1)
            return self.upload(request, repository, session)
        if "/blobs/" in path:
            return httpx2.Response(200 if path.rsplit("/", 1)[1] in self.blobs else 404)
        if "/manifests/" in path:
            if request.method == "PUT":
                self.manifests[path] = request.content
                return httpx2.Response(201)
            held = self.manifests.get(path)
            if held is None:
                return httpx2.Response(404)
            return httpx2.Response(200, headers={"Docker-Content-Digest": "sha256:" + hashlib.sha256(held).hexdigest()})
        return httpx2.Response(404)

    def upload(self, request: httpx2.Request, repository: str, session: str) -> httpx2.Response:
        if request.method == "POST":
            mount = request.url.params.get("mount")
            if mount and self.mountable and mount in self.blobs:
                return httpx2.Response(201)
            name = uuid.uuid4().hex
            self.sessions[name] = bytearray()
            return httpx2.Response(202, headers={"Location": f"/v2/{repository}/blobs/uploads/{name}?_state=s"})
        data = self.sessions[session]
        data += request.content
        if request.method == "PATCH":
            start = int(request.headers["Content-Range"].split("-")[0])
            assert start == len(data) - len(request.content)
            return httpx2.Response(202, headers={"Location": f"/v2/{repository}/blobs/uploads/{session}?_state=t"})
        digest = request.url.params["digest"]
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            return httpx2.Response(400, json={"errors": [{"code": "DIGEST_INVALID", "message": "digest mismatch"}]})
        self.blobs[digest] = bytes(data)
        return httpx2.Response(201)


def stocked(root: Path, model: Model) -> Path:
    store = Store(root)
    store.prepare()
    for digest, data in model.blobs.items():
        store.blob_path(digest).write_bytes(data)
    store.write_manifest(parse_reference(SOURCE), model.manifest.raw)
    return root


async def run(
    server: MemoryRegistry, models: Path, destination: str = "dest.test/team/copy:v1", **options: object
) -> tuple[object, list[Event]]:
    events: list[Event] = []
    async with make_client(transport=httpx2.MockTransport(server)) as client:
        result = await push(
            SOURCE,
            destination,
            models_dir=models,
            client=client,
            settings=FAST,
            on_event=events.append,
            sleep=no_sleep,
            **options,  # type: ignore[arg-type]
        )
    return result, events


async def test_blobs_go_up_whole_or_in_chunks_and_the_manifest_last(tmp_path: Path) -> None:
    model = make_model(1000, 6000)
    server = MemoryRegistry()
    result, events = await run(server, stocked(tmp_path, model))
    assert server.blobs == model.blobs
    assert server.manifests == {"/v2/team/copy/manifests/v1": model.manifest.raw}
    assert server.log[-1] == ("PUT", "/v2/team/copy/manifests/v1")
    # 6000 bytes in 1500-byte chunks: four PATCHes, then the closing PUT.
    assert sum(method == "PATCH" for method, _ in server.log) == 4
    assert isinstance(events[0], PushPlanned)
    assert isinstance(events[-1], PushFinished)
    assert (events[-1].uploaded_blobs, events[-1].uploaded_bytes) == (3, model.manifest.total_size)
    assert getattr(result, "manifest_uploaded", None) is True


async def test_a_second_push_only_asks(tmp_path: Path) -> None:
    model = make_model(1000, 6000)
    server = MemoryRegistry()
    models = stocked(tmp_path, model)
    await run(server, models)
    server.log.clear()
    result, _ = await run(server, models)
    assert {method for method, _ in server.log} == {"HEAD"}
    assert getattr(result, "uploaded_blobs", None) == 0


async def test_a_model_on_the_same_registry_is_mounted(tmp_path: Path) -> None:
    model = make_model(1000)
    server = MemoryRegistry()
    server.blobs.update(model.blobs)
    models = stocked(tmp_path, model)
    events: list[Event] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        # The memory registry shares blobs across repositories; a real one answers HEAD per repository.
        if request.method == "HEAD" and "/blobs/" in request.url.path:
            return httpx2.Response(404)
        return server(request)

    async with make_client(transport=httpx2.MockTransport(handler)) as client:
        result = await push(
            SOURCE,
            "registry.test/team/copy:v1",
            models_dir=models,
            client=client,
            settings=FAST,
            on_event=events.append,
        )
    assert result.mounted_blobs == 2
    assert [e.source for e in events if isinstance(e, BlobMounted)] == ["ns/model"] * 2
    posts = [request for request in server.log if request[0] == "POST"]
    assert len(posts) == 2
    assert not [method for method, path in server.log if method in ("PUT", "PATCH") and "/blobs/" in path]


async def test_a_refused_mount_uploads_through_the_session_it_opened(tmp_path: Path) -> None:
    model = make_model(1000)
    server = MemoryRegistry()
    server.mountable = False
    result, _ = await run(server, stocked(tmp_path, model), "registry.test/team/copy:v1")
    assert getattr(result, "uploaded_blobs", None) == 2
    assert sum(method == "POST" for method, _ in server.log) == 2


async def test_a_failed_upload_is_retried_and_progress_never_goes_back(tmp_path: Path) -> None:
    model = make_model(1000)
    server = MemoryRegistry()
    server.fail_next = [httpx2.Response(503)]
    _, events = await run(server, stocked(tmp_path, model))
    assert server.blobs == model.blobs
    assert len([e for e in events if isinstance(e, BlobRetry)]) == 1
    by_blob: dict[str, list[int]] = {}
    for event in events:
        if isinstance(event, BlobProgress):
            by_blob.setdefault(event.digest, []).append(event.completed)
    assert all(values == sorted(values) for values in by_blob.values())


async def test_bytes_that_are_not_the_digest_are_an_integrity_error(tmp_path: Path) -> None:
    model = make_model(1000)
    models = stocked(tmp_path, model)
    bad = model.layers[1]
    Store(models).blob_path(bad.digest).write_bytes(b"x" * bad.size)
    with pytest.raises(IntegrityError, match="DIGEST_INVALID"):
        await run(MemoryRegistry(), models)


@pytest.mark.parametrize(
    ("answer", "error", "message"),
    [
        (httpx2.Response(401), AuthenticationError, r"refused to take .* \(HTTP 401\): it wants credentials"),
        (httpx2.Response(403), AuthenticationError, r"\(HTTP 403\)"),
        (
            httpx2.Response(400, json={"errors": [{"code": "NAME_INVALID", "message": "invalid repository name"}]}),
            RegistryError,
            r"\(HTTP 400: NAME_INVALID invalid repository name\)",
        ),
    ],
)
async def test_refusals_are_one_line_errors(tmp_path: Path, answer: httpx2.Response, error: type, message: str) -> None:
    models = stocked(tmp_path, make_model(10))
    with pytest.raises(error, match=message) as caught:
        await run(lambda _request: answer, models)  # type: ignore[arg-type]
    assert "\n" not in str(caught.value)


async def test_the_source_must_be_whole(tmp_path: Path) -> None:
    model = make_model(10, 20)
    models = stocked(tmp_path, model)
    Store(models).blob_path(model.layers[1].digest).unlink()
    with pytest.raises(IncompleteModel):
        push_source(SOURCE, models_dir=models)


async def test_a_bundle_source_names_its_model_when_it_holds_several(tmp_path: Path) -> None:
    first, second = make_model(10, seed=1), make_model(20, seed=2)
    models = stocked(tmp_path / "models", first)
    Store(models).write_manifest(parse_reference("registry.test/ns/other:tag"), second.manifest.raw)
    for digest, data in second.blobs.items():
        Store(models).blob_path(digest).write_bytes(data)
    bundle = tmp_path / "both.tar"
    await export_models([SOURCE, "registry.test/ns/other:tag"], bundle, models_dir=models)
    with pytest.raises(InvalidBundle, match=r"it holds 2 models .*: name the one to use"):
        push_source(bundle)
    chosen = push_source(bundle, model="registry.test/ns/other:tag")
    assert chosen.manifest.raw == second.manifest.raw
    assert json.loads(chosen.manifest.raw)["layers"]


async def test_a_bearer_registry_grants_push_after_pull(tmp_path: Path) -> None:
    """HEAD is challenged for pull, the upload for pull,push: the token is refreshed once with the wider scope,
    and the streamed upload carries it from the start (a body cannot be sent twice)."""
    model = make_model(1000)
    server = MemoryRegistry()
    granted: dict[str, str] = {}
    tokens: list[str] = []
    events: list[Event] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        if request.url.host == "auth.test":
            scope = request.url.params["scope"]
            tokens.append(scope)
            granted[f"token-{len(tokens)}"] = scope
            return httpx2.Response(200, json={"token": f"token-{len(tokens)}"})
        needed = "pull" if request.method in ("HEAD", "GET") else "pull,push"
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        actions = set(granted.get(token, "").rsplit(":", 1)[-1].split(","))
        if not set(needed.split(",")) <= actions:
            challenge = f'Bearer realm="https://auth.test/token",service="r",scope="repository:team/copy:{needed}"'
            return httpx2.Response(401, headers={"WWW-Authenticate": challenge})
        return server(request)

    async with make_client(transport=httpx2.MockTransport(handler)) as client:
        result = await push(
            SOURCE, "dest.test/team/copy:v1", models_dir=stocked(tmp_path, model), client=client, on_event=events.append
        )
    assert result.uploaded_blobs == 2
    assert server.blobs == model.blobs
    assert tokens == ["repository:team/copy:pull", "repository:team/copy:pull,push"]
    assert not [event for event in events if isinstance(event, BlobRetry)]


async def test_a_prune_waits_while_the_store_is_read(tmp_path: Path) -> None:
    model = make_model(1000)
    models = stocked(tmp_path, model)
    Store(models).blob_path("sha256:" + "0" * 64).write_bytes(b"unreferenced")
    server = MemoryRegistry()
    uploading, release = asyncio.Event(), asyncio.Event()

    async def handler(request: httpx2.Request) -> httpx2.Response:
        if request.method == "PUT" and not uploading.is_set():
            uploading.set()
            await release.wait()
        return server(request)

    async with make_client(transport=httpx2.MockTransport(handler)) as client:
        pushing = asyncio.create_task(push(SOURCE, "dest.test/team/copy:v1", models_dir=models, client=client))
        await uploading.wait()
        pruning = asyncio.create_task(prune(models))
        await asyncio.sleep(0.2)
        assert not pruning.done()
        release.set()
        await pushing
        assert (await pruning).digests == ("sha256:" + "0" * 64,)
    assert server.blobs == model.blobs


async def test_an_upload_body_cancelled_while_its_thread_reads_closes_the_reader_after_the_read() -> None:
    # CI met "generator already executing": a cancelled upload closed the blob's reader while a worker thread was
    # still inside it. The read is waited for, then the reader is closed.
    reading, go_on, closed = threading.Event(), threading.Event(), threading.Event()

    def chunks() -> Iterator[bytes]:
        try:
            reading.set()
            go_on.wait(10)
            yield b"x" * 10
        finally:
            closed.set()

    layer = make_model(10).layers[0]
    body = _body(chunks(), _Progress("m", layer, lambda _event: None))
    await cancel_while_in_thread(reading, go_on, body.__anext__())
    await body.aclose()
    assert closed.wait(5)


async def test_a_ca_cert_that_cannot_be_loaded_fails_a_push_over_https_before_it_asks_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = stocked(tmp_path, make_model(1000))
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    connects: list[object] = []

    async def connecting(*args: object, **kwargs: object) -> None:
        connects.append(args)
        raise OSError("no connection in this test")

    monkeypatch.setattr(asyncio.get_running_loop(), "create_connection", connecting)
    with pytest.raises(RegistryError, match=f"^cannot use the CA certificate {bad}: "):
        await push(SOURCE, "dest.test/team/copy:v1", models_dir=models, ca_cert=bad, settings=FAST, sleep=no_sleep)
    assert connects == []
