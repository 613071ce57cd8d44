"""Hostile and malformed input: each gets a 4xx naming the problem, and afterwards the server is
healthy and the adapter store listing is unchanged."""

from __future__ import annotations

import json
import pickle
import struct

import httpx
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from tests.api.helpers import BASE_ID, api_settings, assert_error, live_server, upload

MAX_RANK = 8
MAX_UPLOAD = 100_000


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tiny_adapters, tmp_path_factory):
    settings = api_settings(tiny_llama_dir, tmp_path_factory.mktemp("store"), max_rank=MAX_RANK,
                            max_upload_bytes=MAX_UPLOAD, max_model_len=128)
    with live_server(settings) as live, live.client() as client:
        upload(client, "good", tiny_adapters["attn-r4"])
        yield live


def _files(config: bytes, weights: bytes) -> dict:
    return {"adapter_config.json": ("adapter_config.json", config),
            "adapter_model.safetensors": ("adapter_model.safetensors", weights)}


def _adapter(tiny_adapters, name="attn-r4") -> tuple[dict, dict[str, torch.Tensor]]:
    root = tiny_adapters[name]
    return (json.loads((root / "adapter_config.json").read_text()),
            st_load((root / "adapter_model.safetensors").read_bytes()))


def _upload_case(kind: str, tiny_adapters) -> tuple[str, dict]:
    """(adapter name, multipart files) for one bad upload."""
    config, tensors = _adapter(tiny_adapters)
    good_config = json.dumps(config).encode()
    if kind == "pickle":
        return "evil", _files(good_config, pickle.dumps({k: v.numpy() for k, v in tensors.items()}))
    if kind == "malformed-header":
        return "evil", _files(good_config, struct.pack("<Q", 9) + b"{not json" + b"\0" * 16)
    if kind == "huge-header":
        return "evil", _files(good_config, struct.pack("<Q", 2**40) + b"{" + b" " * 64)
    if kind == "wrong-shape":
        key = next(k for k in tensors if "lora_A" in k)
        tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)
        return "evil", _files(good_config, st_save(tensors))
    if kind == "rank-over-limit":
        config, tensors = _adapter(tiny_adapters, "ko-r16")
        return "evil", _files(json.dumps(config).encode(), st_save(tensors))
    if kind == "too-many-layers":
        renamed = {k.replace("layers.1.", "layers.5."): v for k, v in tensors.items()}
        return "evil", _files(good_config, st_save(renamed))
    if kind == "wrong-architecture":
        config["auto_mapping"] = {"base_model_class": "Qwen2ForCausalLM"}
        return "evil", _files(json.dumps(config).encode(), st_save(tensors))
    if kind == "dora":
        return "evil", _files(json.dumps({**config, "use_dora": True}).encode(), st_save(tensors))
    if kind == "oversized":
        return "evil", _files(good_config, b"\0" * (MAX_UPLOAD + 1))
    if kind in ("traversal", "absolute"):
        return ("..%2F..%2Fetc" if kind == "traversal" else "%2Fetc%2Fpasswd"), _files(good_config, st_save(tensors))
    raise ValueError(kind)


UPLOAD_CASES = [
    ("traversal", 400, ["invalid adapter name"]),
    ("absolute", 400, ["invalid adapter name"]),
    ("pickle", 422, ["pickle"]),
    ("malformed-header", 422, ["JSON header"]),
    ("huge-header", 422, ["header length"]),
    ("wrong-shape", 422, ["shape"]),
    ("rank-over-limit", 422, ["rank 16", "max_rank 8"]),
    ("too-many-layers", 422, ["layer 5", "2 layers"]),
    ("wrong-architecture", 422, ["Qwen2ForCausalLM"]),
    ("dora", 422, ["DoRA"]),
    ("oversized", 413, ["max_upload_bytes"]),
]


def _assert_unharmed(client: httpx.Client, listing_before: list) -> None:
    assert client.get("/health").status_code == 200
    assert client.get("/v1/adapters").json()["data"] == listing_before
    assert client.post("/v1/completions", json={"model": "good", "prompt": "Hi", "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("kind, status, needles", UPLOAD_CASES, ids=[c[0] for c in UPLOAD_CASES])
def test_bad_upload(server, tiny_adapters, kind, status, needles):
    with server.client() as client:
        before = client.get("/v1/adapters").json()["data"]
        name, files = _upload_case(kind, tiny_adapters)
        assert_error(client.put(f"/v1/adapters/{name}", files=files), status, *needles)
        _assert_unharmed(client, before)
    assert not any(server.state.store.root.joinpath(".staging").iterdir())


def test_oversized_chunked_body_is_cut_off_while_reading(server):
    """No Content-Length: the bound is enforced on the bytes as they arrive."""
    sent = 0

    def body():
        nonlocal sent
        boundary_head = (b"--b\r\nContent-Disposition: form-data; name=\"archive\"; filename=\"a.zip\"\r\n"
                         b"Content-Type: application/octet-stream\r\n\r\n")
        yield boundary_head
        for _ in range(64):
            sent += 16384
            yield b"\0" * 16384
        yield b"\r\n--b--\r\n"

    with server.client() as client:
        before = client.get("/v1/adapters").json()["data"]
        response = client.put("/v1/adapters/chunky", content=body(),
                              headers={"content-type": "multipart/form-data; boundary=b"})
        assert_error(response, 413, "max_upload_bytes")
        _assert_unharmed(client, before)


REQUEST_CASES = [
    ("/v1/completions", {"model": BASE_ID, "prompt": "Hi", "temperature": -1}, 400, ["temperature"]),
    ("/v1/completions", {"model": BASE_ID, "prompt": "Hi", "top_p": 0}, 400, ["top_p"]),
    ("/v1/completions", {"model": BASE_ID, "prompt": "Hi", "max_tokens": 0}, 400, ["max_tokens"]),
    ("/v1/completions", {"model": BASE_ID, "prompt": "Hi", "n": 0}, 400, ["n"]),
    ("/v1/completions", {"model": BASE_ID, "prompt": "Hi", "n": 129}, 400, ["n"]),
    ("/v1/completions", {"model": BASE_ID, "prompt": "Hi", "repetition_penalty": 0}, 400, ["repetition_penalty"]),
    ("/v1/completions", {"model": BASE_ID, "prompt": "Hi", "stop": [""]}, 400, ["stop"]),
    ("/v1/completions", {"model": BASE_ID, "prompt": ["a", ""]}, 400, ["prompt[1]", "empty"]),
    ("/v1/completions", {"model": BASE_ID, "prompt": []}, 400, ["prompt"]),
    ("/v1/completions", {"model": BASE_ID, "prompt": [10**9]}, 400, ["vocabulary"]),
    ("/v1/completions", {"model": BASE_ID, "prompt": "Hello world " * 100}, 400,
     ["prompt", "max_model_len", "128"]),
    ("/v1/chat/completions", {"model": BASE_ID, "messages": [{"role": "user", "content": "Hello " * 200}]},
     400, ["messages", "max_model_len"]),
    ("/v1/chat/completions", {"model": BASE_ID, "messages": []}, 400, ["messages"]),
    ("/v1/chat/completions", {"model": BASE_ID, "messages": [{"role": "", "content": "x"}]},
     400, ["role"]),
    ("/v1/completions", {"model": "missing", "prompt": "Hi"}, 404, ["missing", "does not exist"]),
    ("/v1/completions", {"model": "../../etc/passwd", "prompt": "Hi"}, 404, ["does not exist"]),
    ("/v1/completions", {"prompt": "Hi"}, 400, ["model"]),
    ("/generate", {"inputs": "Hi", "parameters": {"top_p": 1.5}}, 400, ["top_p"]),
    ("/generate", {"inputs": "", "parameters": {}}, 400, ["inputs"]),
    ("/generate", {"inputs": "Hi", "parameters": {"adapter_id": "missing"}}, 404,
     ["adapter", "missing", "does not exist"]),
]


@pytest.mark.parametrize("path, body, status, needles", REQUEST_CASES,
                         ids=[f"{i}-{c[0]}" for i, c in enumerate(REQUEST_CASES)])
def test_bad_request(server, path, body, status, needles):
    with server.client() as client:
        before = client.get("/v1/adapters").json()["data"]
        assert_error(client.post(path, json=body), status, *needles)
        _assert_unharmed(client, before)


def test_the_param_of_an_error_is_the_field_that_caused_it(server):
    with server.client() as client:
        error = assert_error(client.post("/generate", json={"inputs": "Hi", "parameters": {"adapter_id": "x"}}), 404)
        assert error["param"] == "parameters.adapter_id"
        error = assert_error(client.post("/v1/completions", json={"model": "x", "prompt": "Hi"}), 404)
        assert error["param"] == "model"
        error = assert_error(client.post("/v1/unload_lora_adapter", json={"lora_name": "bad name!"}), 400, "bad name!")
        assert error["param"] == "lora_name"


def test_invalid_json_and_unknown_route(server):
    with server.client() as client:
        error = assert_error(client.post("/v1/completions", content=b"{not json",
                                         headers={"content-type": "application/json"}), 400, "not valid JSON")
        assert error["param"] == "body"
        assert_error(client.get("/v1/nothing-here"), 404)
        assert_error(client.delete("/v1/completions"), 405)
