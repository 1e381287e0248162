"""Property-based tests: whatever the input, a value whose store paths stay inside the root, or our own error."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ollama_pull.errors import InvalidManifest, InvalidReference
from ollama_pull.manifest import parse_manifest
from ollama_pull.reference import parse_reference
from ollama_pull.store import Store

ROOT = Path("/srv/models")
STORE = Store(ROOT)

# Pieces that stress the parser: separators, dots, traversal, ports, digests, odd characters.
PIECES = st.sampled_from(
    ["", "/", ":", ".", "..", "@", "a", "Z9", "_", "-", "x.y", "host:5000", "sha256:", "~", "\\", "%2e", " ", "\0", "é"]
)
REFERENCES = st.one_of(st.text(max_size=120), st.lists(PIECES, max_size=12).map("".join))


def inside(path: Path) -> bool:
    resolved = Path(os.path.normpath(path))
    return resolved.is_relative_to(ROOT) and resolved != ROOT and ".." not in path.parts


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(REFERENCES)
def test_any_reference_parses_inside_the_store_or_is_invalid(text: str) -> None:
    try:
        reference = parse_reference(text)
    except InvalidReference:
        return
    path = STORE.manifest_path(reference)
    assert inside(path)
    assert path.relative_to(ROOT).parts[0] == "manifests"
    assert len(path.relative_to(ROOT).parts) == 5


DIGESTS = st.one_of(
    st.text(max_size=80),
    st.from_regex(r"sha256:[0-9a-f]{64}", fullmatch=True),
    st.builds(lambda tail: "sha256:" + tail, st.text(max_size=70)),
    st.sampled_from(
        ["sha256:../../etc/passwd", "sha512:" + "a" * 128, "sha256:" + "A" * 64, "sha256:" + "0" * 64 + "/"]
    ),
)
SIZES = st.one_of(st.integers(-5, 2**63), st.floats(allow_nan=True), st.booleans(), st.text(max_size=5), st.none())
LAYERS = st.fixed_dictionaries(
    {"mediaType": st.one_of(st.text(max_size=20), st.integers()), "digest": DIGESTS, "size": SIZES},
    optional={"name": st.one_of(st.text(max_size=20), st.integers(), st.none())},
)
VALID_LAYERS = st.fixed_dictionaries(
    {
        "mediaType": st.text(max_size=20),
        "digest": st.from_regex(r"sha256:[0-9a-f]{64}", fullmatch=True),
        "size": st.integers(0, 2**50),
    },
    optional={"name": st.text(max_size=20)},
)
# Mostly valid, with one field at a time gone wrong: where the validator's edges are.
NEAR_VALID = st.fixed_dictionaries(
    {
        "schemaVersion": st.sampled_from([2, 2, 2, 1, "2", True]),
        "config": st.one_of(VALID_LAYERS, VALID_LAYERS, LAYERS),
        "layers": st.lists(st.one_of(VALID_LAYERS, VALID_LAYERS, VALID_LAYERS, LAYERS), max_size=6),
    }
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
MANIFESTS = st.fixed_dictionaries(
    {},
    optional={
        "schemaVersion": st.one_of(st.just(2), JSON_VALUES),
        "config": st.one_of(LAYERS, JSON_VALUES),
        "layers": st.one_of(st.lists(st.one_of(LAYERS, JSON_VALUES), max_size=5), JSON_VALUES),
    },
)


def check(raw: bytes) -> None:
    try:
        manifest = parse_manifest(raw, model="m")
    except InvalidManifest:
        return
    assert manifest.raw == raw
    for layer in manifest.blobs:
        assert inside(STORE.blob_path(layer.digest))
        assert inside(STORE.partial_path(layer.digest))
        assert STORE.blob_path(layer.digest).parent == ROOT / "blobs"
        assert isinstance(layer.size, int)
        assert layer.size >= 0


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(MANIFESTS, NEAR_VALID))
def test_any_manifest_document_is_valid_and_safe_or_invalid(document: dict[str, Any]) -> None:
    check(json.dumps(document).encode())


@settings(max_examples=500)
@given(st.one_of(st.binary(max_size=200), JSON_VALUES.map(lambda value: json.dumps(value).encode())))
def test_any_bytes_are_a_manifest_or_invalid(raw: bytes) -> None:
    check(raw)
