from __future__ import annotations

import json
from typing import Any

import pytest

from ollama_pull.errors import InvalidManifest
from ollama_pull.manifest import MAX_MANIFEST_BYTES, Layer, parse_manifest

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


def document(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": D1, "size": 10},
        "layers": [{"mediaType": "application/vnd.ollama.image.tensor", "digest": D2, "size": 5, "name": "a/b.st"}],
    }
    base.update(changes)
    return base


def test_valid_manifest_keeps_exact_bytes() -> None:
    raw = json.dumps(document(), indent=3).encode() + b"\n"
    manifest = parse_manifest(raw, model="m")
    assert manifest.raw == raw
    assert manifest.config == Layer("application/vnd.docker.container.image.v1+json", D1, 10)
    assert manifest.layers[0].name == "a/b.st"
    assert manifest.layers[0].label == "a/b.st"
    assert manifest.config.label == "config 111111111111"
    assert Layer("application/vnd.ollama.image.model", D2, 1).label == "model 222222222222"
    assert manifest.total_size == 15


def test_a_blob_listed_twice_is_fetched_once() -> None:
    layer = {"mediaType": "application/vnd.ollama.image.tensor", "digest": D2, "size": 5}
    manifest = parse_manifest(json.dumps(document(layers=[layer, layer])).encode(), model="m")
    assert [blob.digest for blob in manifest.blobs] == [D1, D2]
    assert manifest.total_size == 15


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[]", "not a JSON object"),
        (json.dumps(document(schemaVersion=1)).encode(), "schemaVersion"),
        (json.dumps(document(schemaVersion=True)).encode(), "schemaVersion"),
        (json.dumps(document(layers=None)).encode(), "'layers'"),
        (json.dumps(document(layers={"a": 1})).encode(), "'layers'"),
        (json.dumps(document(config=None)).encode(), "config is missing"),
        (json.dumps(document(config="x")).encode(), "config is missing"),
        (json.dumps(document(layers=["x"])).encode(), "layers[0] is missing"),
        (json.dumps(document(config={"digest": D1, "size": 1})).encode(), "config.mediaType"),
        # Digests that would escape the store or are not sha256.
        (json.dumps(document(config={"mediaType": "x", "digest": "sha256:../../etc", "size": 1})).encode(), "digest"),
        (
            json.dumps(document(config={"mediaType": "x", "digest": "sha512:" + "a" * 128, "size": 1})).encode(),
            "digest",
        ),
        (json.dumps(document(config={"mediaType": "x", "digest": "sha256:" + "A" * 64, "size": 1})).encode(), "digest"),
        (json.dumps(document(config={"mediaType": "x", "digest": D1 + "\n", "size": 1})).encode(), "digest"),
        (json.dumps(document(config={"mediaType": "x", "digest": D1, "size": -1})).encode(), "size"),
        (json.dumps(document(config={"mediaType": "x", "digest": D1, "size": "1"})).encode(), "size"),
        (json.dumps(document(config={"mediaType": "x", "digest": D1, "size": 1.5})).encode(), "size"),
        (json.dumps(document(config={"mediaType": "x", "digest": D1, "size": True})).encode(), "size"),
        (json.dumps(document(config={"mediaType": "x", "digest": D1, "size": 1, "name": 3})).encode(), "name"),
        (b" " * (MAX_MANIFEST_BYTES + 1), "larger than"),
    ],
)
def test_invalid_manifests(raw: bytes, reason: str) -> None:
    with pytest.raises(InvalidManifest) as caught:
        parse_manifest(raw, model="ns/m:t")
    assert reason in caught.value.reason
    assert "nothing was written" in str(caught.value)
