"""Adapter lifecycle over HTTP: upload, generate, replace, delete; archives; vLLM aliases; and a
replacement in the middle of 50 concurrent streams."""

from __future__ import annotations

import asyncio
import io
import json
import tarfile

import httpx
import pytest
import torch

from tests.api.helpers import BASE_ID, ENGINE_MODES, api_settings, assert_error, greedy_text, live_server, upload

STREAM_TOKENS = 48


@pytest.fixture(scope="module", params=list(ENGINE_MODES))
def server(request, tiny_llama_dir, tiny_adapters, tmp_path_factory):
    settings = api_settings(tiny_llama_dir, tmp_path_factory.mktemp("store"),
                            allowed_adapter_dirs=[tiny_adapters["attn-r4"].parent], max_batch_size=32,
                            engine_process=ENGINE_MODES[request.param])
    with live_server(settings) as live:
        yield live


@pytest.fixture()
def client(server):
    with server.client() as client:
        yield client


def test_upload_generate_replace_delete(client, tiny_adapters):
    base_text = greedy_text(client, BASE_ID)
    v1 = upload(client, "flow", tiny_adapters["attn-r4"])
    assert (v1["version"], v1["rank"], v1["target_modules"]) == (1, 4, ["q_proj", "v_proj"])
    assert set(v1) == {"name", "version", "sha256", "rank", "alpha", "target_modules", "size_bytes", "created"}
    text_v1 = greedy_text(client, "flow")
    assert text_v1 != base_text

    v2 = upload(client, "flow", tiny_adapters["all-r8"])
    assert v2["version"] == 2 and v2["sha256"] != v1["sha256"]
    text_v2 = greedy_text(client, "flow")
    assert text_v2 not in (text_v1, base_text)
    assert client.get("/v1/adapters/flow").json()["version"] == 2
    assert "flow" in [a["name"] for a in client.get("/v1/adapters").json()["data"]]

    deleted = client.delete("/v1/adapters/flow")
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert_error(client.get("/v1/adapters/flow"), 404, "flow")
    assert_error(client.post("/v1/completions", json={"model": "flow", "prompt": "x"}), 404, "flow")
    assert "flow" not in [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert_error(client.delete("/v1/adapters/flow"), 404, "flow")


def test_the_event_loops_answer_for_a_settled_adapter_follows_each_new_version(server, client, tiny_adapters):
    """Once an adapter's directory has not changed for a while, requests find it without a worker thread
    (registry.resolve_nowait); a new version changes the directory and is used by the very next request."""
    import os
    import time

    upload(client, "settled", tiny_adapters["attn-r4"])
    adapter_dir = server.state.store.root / "settled"
    past = time.time() - 60
    os.utime(adapter_dir, (past, past))
    text_v1 = greedy_text(client, "settled")  # read from disk, remembered
    registry = server.state.registry
    assert registry.resolve_nowait("settled").version == 1
    assert greedy_text(client, "settled") == text_v1
    assert upload(client, "settled", tiny_adapters["all-r8"])["version"] == 2
    assert registry.resolve_nowait("settled") is None
    assert greedy_text(client, "settled") not in (text_v1, greedy_text(client, BASE_ID))


def test_an_upload_writes_its_stages_to_the_trace(client, tiny_adapters, tmp_path, monkeypatch):
    """LORAPLEX_STEP_TRACE: each upload adds a line to uploads-<pid>.jsonl with the time the body took to
    arrive and split, the store's validation, hash and write, and the whole."""
    import os

    from server.api import adapters as adapters_api
    from server.engine.step_trace import StepTrace

    monkeypatch.setattr(adapters_api, "_UPLOAD_TRACE", StepTrace(str(tmp_path), kind="uploads"))
    record = upload(client, "traced", tiny_adapters["attn-r4"])
    (line,) = [json.loads(x) for x in (tmp_path / f"uploads-{os.getpid()}.jsonl").read_text().splitlines()]
    assert (line["adapter"], line["version"]) == ("traced", record["version"])
    assert line["receive_ms"] > 0 and line["store_ms"] > 0 and line["receive_ms"] + line["store_ms"] <= line["ms"]


def test_archive_upload(client, tiny_adapters):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            tar.add(tiny_adapters["mlp-r2-rs"] / name, arcname=name)
    response = client.put("/v1/adapters/from-archive", files={"archive": ("a.tar.gz", buffer.getvalue())})
    assert response.status_code == 201, response.text
    assert response.json()["rank"] == 2
    assert greedy_text(client, "from-archive") != greedy_text(client, BASE_ID)


def test_upload_with_missing_part_is_400(client, tiny_adapters):
    config = (tiny_adapters["attn-r4"] / "adapter_config.json").read_bytes()
    response = client.put("/v1/adapters/half", files={"adapter_config.json": ("c.json", config)})
    assert_error(response, 400, "adapter_model.safetensors")
    response = client.put("/v1/adapters/half", content=b"{}", headers={"content-type": "application/json"})
    assert_error(response, 415, "multipart")
    assert_error(client.get("/v1/adapters/half"), 404)


def test_vllm_load_and_unload_aliases(client, tiny_adapters):
    path = str(tiny_adapters["ko-r16"])
    loaded = client.post("/v1/load_lora_adapter", json={"lora_name": "vl", "lora_path": path})
    assert loaded.status_code == 200, loaded.text
    assert loaded.text == "Success: LoRA adapter 'vl' added successfully."  # vLLM's plain text
    assert client.get("/v1/adapters/vl").json()["rank"] == 16
    assert greedy_text(client, "vl") != greedy_text(client, BASE_ID)
    escape = str(tiny_adapters["ko-r16"]) + "/../../../../etc"
    assert_error(client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": escape}),
                 403, "allowed")
    assert_error(client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/etc"}),
                 403, "allowed")
    assert_error(client.post("/v1/load_lora_adapter", json={"lora_name": "../x", "lora_path": path}),
                 400, "invalid adapter name")
    broken = tiny_adapters["ko-r16"].parent / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "adapter_config.json").write_text("{not json")
    for bad_path in (broken, broken / "missing"):  # invalid, then absent: vLLM answers 400 to both
        assert_error(client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(bad_path)}),
                     400, "Loading lora x failed")
    unloaded = client.post("/v1/unload_lora_adapter", json={"lora_name": "vl"})
    assert unloaded.status_code == 200 and unloaded.text == "Success: LoRA adapter 'vl' removed successfully."
    assert_error(client.post("/v1/unload_lora_adapter", json={"lora_name": "vl"}), 404, "vl")


def test_tgi_generate_and_stream(client, tiny_adapters):
    upload(client, "tgi", tiny_adapters["attn-r4"])
    body = {"inputs": "Hello world", "parameters": {"adapter_id": "tgi", "max_new_tokens": 8, "details": True}}
    result = client.post("/generate", json=body).json()
    assert result["generated_text"] == greedy_text(client, "tgi", max_tokens=8)
    details = result["details"]
    assert details["finish_reason"] == "length" and details["generated_tokens"] == 8
    assert len(details["tokens"]) == 8 and all(t["logprob"] <= 0 for t in details["tokens"])

    with client.stream("POST", "/generate_stream", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]
    assert len(events) == 8 and [e["index"] for e in events] == list(range(1, 9))
    assert all(e["generated_text"] is None for e in events[:-1])
    assert events[-1]["generated_text"] == result["generated_text"]
    assert events[-1]["details"]["generated_tokens"] == 8
    full = client.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3,
                                                                         "return_full_text": True}})
    assert full.json()["generated_text"].startswith("Hi")
    assert_error(client.post("/generate", json={"inputs": "Hi", "parameters": {"adapter_id": "nope"}}),
                 404, "nope")
    assert_error(client.post("/generate", json={"inputs": "Hi", "parameters": {"temperature": 0}}),
                 400, "temperature")


def test_delete_then_reupload_serves_the_new_weights(client, tiny_adapters):
    """The engine caches GPU slots by (name, version): a re-upload after a delete must not reuse one."""
    old = upload(client, "again", tiny_adapters["attn-r4"])
    first = greedy_text(client, "again")
    assert client.delete("/v1/adapters/again").status_code == 200
    assert upload(client, "again", tiny_adapters["all-r8"])["version"] > old["version"]
    upload(client, "again-ref", tiny_adapters["all-r8"])
    assert greedy_text(client, "again") == greedy_text(client, "again-ref") != first


async def _stream_text(http: httpx.AsyncClient, model: str, started: asyncio.Event | None = None) -> str:
    body = {"model": model, "prompt": "Hello world", "max_tokens": STREAM_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": True}
    text, done = "", False
    async with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        if started is not None:
            started.set()
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                text += json.loads(line[6:])["choices"][0]["text"]
    assert done
    return text


def test_replacement_during_50_concurrent_streams(server, client, tiny_adapters):
    """25 streams start on v1, v2 is uploaded while they run, 25 more start on v2: none is lost and
    each matches a non-concurrent reference run of the version it started on."""
    upload(client, "ref-v1", tiny_adapters["attn-r4"])
    upload(client, "ref-v2", tiny_adapters["ko-r16"])
    upload(client, "hot", tiny_adapters["attn-r4"])
    reference = {v: greedy_text(client, f"ref-{v}", max_tokens=STREAM_TOKENS, ignore_eos=True)
                 for v in ("v1", "v2")}
    assert reference["v1"] != reference["v2"]

    async def scenario():
        limits = httpx.Limits(max_connections=60)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as http:
            started = [asyncio.Event() for _ in range(25)]
            first = [asyncio.create_task(_stream_text(http, "hot", e)) for e in started]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 30)
            put = await asyncio.to_thread(upload, client, "hot", tiny_adapters["ko-r16"])
            assert put["version"] == 2
            running_at_swap = sum(not t.done() for t in first)
            second = [asyncio.create_task(_stream_text(http, "hot")) for _ in range(25)]
            return await asyncio.gather(*first), await asyncio.gather(*second), running_at_swap

    texts_v1, texts_v2, running_at_swap = asyncio.run(scenario())
    assert running_at_swap > 0, "the replacement should land while v1 streams are still running"
    assert len(texts_v1) == len(texts_v2) == 25
    assert all(text == reference["v1"] for text in texts_v1)
    assert all(text == reference["v2"] for text in texts_v2)


def test_an_upload_is_in_the_cpu_tier_before_its_first_request(server, client, tiny_adapters, monkeypatch):
    """With the engine in a thread, an upload puts the new version in the CPU tier in the background (as
    vLLM's load_lora_adapter does), from the weights its validation parsed: nothing is read back from
    disk, not by the upload and not by the first request for it, and the first request's text is the
    adapter's. The engine process keeps its own tier and reads at first use."""
    import time

    from server import metrics

    if server.state.settings.engine_process:
        pytest.skip("the engine process loads at first use")
    registry = server.state.registry

    def no_read_back(*args, **kwargs):
        raise AssertionError("the upload's weights should have been adopted, not read back")

    monkeypatch.setattr(server.state.store, "load_weights", no_read_back)
    version = upload(client, "warm-up", tiny_adapters["mlp-r2-rs"])["version"]
    deadline = time.monotonic() + 10
    while registry.cached("warm-up", version) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert registry.cached("warm-up", version) is not None

    def loads() -> float:
        return metrics.REGISTRY.get_sample_value("loraplex_adapter_loads_total",
                                                 {"model_name": BASE_ID, "tier": "cpu"}) or 0.0

    before = loads()
    assert greedy_text(client, "warm-up")
    assert loads() == before
    monkeypatch.undo()
    adopted = registry.cached("warm-up", version)
    from_disk = server.state.store.load_weights(server.state.store.get("warm-up", version))
    assert adopted.tensors.keys() == from_disk.tensors.keys()
    for key, pair in from_disk.tensors.items():
        assert all(torch.equal(a, b) for a, b in zip(adopted.tensors[key], pair, strict=True))
