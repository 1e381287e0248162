from __future__ import annotations

import pytest

from ollama_pull.errors import InvalidReference
from ollama_pull.reference import ModelReference, parse_reference


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # The defaults fill every missing part.
        ("flux2-klein", ("registry.ollama.ai", "library", "flux2-klein", "latest")),
        ("library/flux2-klein", ("registry.ollama.ai", "library", "flux2-klein", "latest")),
        ("qwen3:8b", ("registry.ollama.ai", "library", "qwen3", "8b")),
        ("user/model:v1.2", ("registry.ollama.ai", "user", "model", "v1.2")),
        ("example.com/ns/model:tag", ("example.com", "ns", "model", "tag")),
        # A port is part of the host; the tag is cut only at a ':' after the last '/'.
        ("localhost:5000/ns/model", ("localhost:5000", "ns", "model", "latest")),
        ("127.0.0.1:5000/ns/model:q4_K_M", ("127.0.0.1:5000", "ns", "model", "q4_K_M")),
        # Dots are fine in model and tag, and a part may start with '_' or a digit.
        ("_x/3.5-model_.1:_t.-", ("registry.ollama.ai", "_x", "3.5-model_.1", "_t.-")),
        ("a" * 350 + "/" + "n" * 80 + "/" + "m" * 80 + ":" + "t" * 80, ("a" * 350, "n" * 80, "m" * 80, "t" * 80)),
    ],
)
def test_valid_references(text: str, expected: tuple[str, str, str, str]) -> None:
    assert parse_reference(text) == ModelReference(*expected)


@pytest.mark.parametrize(
    ("text", "scheme"), [("http://127.0.0.1:5000/ns/model:v2", "http"), ("https://example.com/ns/model:v2", "https")]
)
def test_a_scheme_says_how_to_reach_the_registry_and_is_cut_from_the_name(text: str, scheme: str) -> None:
    # As Ollama's ParseNameBare: the model is stored under host/namespace/model, without the scheme.
    reference = parse_reference(text)
    assert reference.scheme == scheme
    assert str(reference) == text.split("://", 1)[1]
    assert reference.short == text.split("://", 1)[1]
    assert reference.name == reference.short


def test_messages_keep_the_namespace() -> None:
    assert parse_reference("library/flux2-klein").name == "library/flux2-klein:latest"
    assert parse_reference("flux2-klein").short == "flux2-klein:latest"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        (" model", "white space"),
        ("model ", "white space"),
        ("my model", "the model"),
        ("..", "the model"),
        ("ns/..", "the model"),
        ("../model", "the namespace"),
        ("ns/.hidden", "the model"),
        ("-model", "the model"),
        ("a/b/c/d", "too many"),
        ("host/a/b/c:tag", "too many"),
        # Each message names the part that is wrong, and only that part.
        ("model:a:b", "two tags (':a' and ':b')"),
        ("x:y:z", "two tags (':y' and ':z')"),
        ("localhost:5000/demo", "'localhost:5000' is a registry host without a namespace"),
        ("ftp://host/ns/model", "the scheme 'ftp' is not http or https"),
        ("http://host/model", "name the registry in full: http://host/namespace/model"),
        ("model:", "tag is empty"),
        (":tag", "model is empty"),
        ("ns/", "model is empty"),
        ("/model", "namespace is empty"),
        ("host//model", "namespace is empty"),
        ("name.space/model", "'name.space' is a registry host without a namespace"),
        ("ns/mo:del/x", "the namespace 'mo:del'"),
        ("model@sha256:" + "0" * 64, "digest"),
        ("model:t/x", "the namespace 'model:t'"),
        ("m" * 81, "longer than 80"),
        ("model:" + "t" * 81, "longer than 80"),
        ("h" * 351 + "/ns/model", "longer than 350"),
        ("ns/mödel", "the model"),
        ("ns/model\n", "white space"),
        ("host/ns/model:ta g", "the tag"),
    ],
)
def test_invalid_references(text: str, reason: str) -> None:
    with pytest.raises(InvalidReference) as caught:
        parse_reference(text)
    assert reason in caught.value.reason
    assert str(caught.value).startswith(f"invalid model reference {text!r}")


def test_repository_and_display_names() -> None:
    ref = parse_reference("127.0.0.1:5000/ns/model:tag")
    assert ref.repository == "ns/model"
    assert str(ref) == "127.0.0.1:5000/ns/model:tag"
    assert ref.short == "127.0.0.1:5000/ns/model:tag"
    assert parse_reference("qwen3").short == "qwen3:latest"
    assert parse_reference("user/m").short == "user/m:latest"
