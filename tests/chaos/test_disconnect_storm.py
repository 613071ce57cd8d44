"""A disconnect storm with huge and bad inputs mixed in: hundreds of streaming and non-streaming
requests on every generation route, each abandoned at a random moment, beside honest requests whose
outputs must stay right and malformed ones that must be refused at once."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import random
import time
from pathlib import Path

import httpx

from bench.reliability import build_bomb
from tests.api.helpers import BASE_ID
from tests.chaos.harness import (
    HANG_BOUND_S,
    HealthProbe,
    assert_server_sound,
    completion_body,
    expected_outputs,
    metric_values,
    reference_outputs,
)

NUM_ABANDONED = 300
NUM_HONEST = 40
NUM_ABANDONED_UPLOADS = 30
STORM_SPREAD_S = 4.0  # requests start at random moments over this many seconds
LONG_TOKENS = 400  # abandoned requests ask for this many tokens, so one that is not aborted keeps running


def test_disconnect_storm_with_bad_inputs(chaos_server, tiny_adapters, tmp_path, record_figures):
    store = tmp_path / "store"
    server = chaos_server(store)
    with server.client() as client:
        references = reference_outputs(client, tiny_adapters)
        aborted_before = _num_aborted(client)
    expected = expected_outputs(references)
    rng = random.Random(7)
    rss_before = server.rss_mib()
    started = time.monotonic()
    with HealthProbe(server) as probe:
        results = asyncio.run(_storm(server.url, expected, rng, tiny_adapters["all-r8"]))
        figures = assert_server_sound(server, probe, rss_before, expected)
    seconds = time.monotonic() - started
    with server.client() as client:
        num_aborted = _num_aborted(client) - aborted_before

    hung = [r for r in results if r[1] == "hung"]
    assert not hung, hung[:5]
    abandoned = [r for r in results if r[0] == "abandoned"]
    unclean = [r for r in abandoned if r[1] not in ("left", 200, 201, 503)]
    assert not unclean, unclean[:5]
    num_left = sum(r[1] == "left" and r[2] != "upload" for r in abandoned)
    assert num_left >= NUM_ABANDONED // 2, "the storm should abandon most of its requests mid-flight"
    # An abandoned request the engine saw is aborted there (one left while queued in the API may never reach it).
    assert num_aborted >= num_left // 2, (num_aborted, num_left)
    wrong = [r for r in results if r[0] == "honest" and r[1] != r[2]]
    assert not wrong, wrong[:5]
    refused_wrongly = [r for r in results if r[0].startswith("bad:") and r[1] not in r[2]]
    assert not refused_wrongly, refused_wrongly
    # An upload abandoned mid-body leaves nothing; one abandoned after its body arrived is whole.
    whole_sha256 = hashlib.sha256((tiny_adapters["all-r8"] / "adapter_model.safetensors").read_bytes()).hexdigest()
    with server.client() as client:
        uploaded = [a for a in client.get("/v1/adapters").json()["data"] if a["name"].startswith("abandoned-")]
    assert all(a["sha256"] == whole_sha256 and a["version"] == 1 for a in uploaded), uploaded
    assert not list((store / ".staging").iterdir())
    record_figures({**figures, "requests": len(results), "abandoned_mid_flight": num_left,
                    "aborted_in_engine": int(num_aborted), "seconds": round(seconds, 1)})


def _num_aborted(client: httpx.Client) -> float:
    return metric_values(client, ("vllm:request_success_total",), 'finished_reason="abort"')[
        "vllm:request_success_total"]


async def _storm(url: str, expected: dict[str, str], rng: random.Random, adapter_dir: Path) -> list[tuple]:
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=50)
    async with httpx.AsyncClient(base_url=url, timeout=HANG_BOUND_S, limits=limits) as client:
        jobs = [_abandoned(client, rng, list(expected)) for _ in range(NUM_ABANDONED)]
        jobs += [_honest(client, rng, model, text) for model, text in rng.choices(list(expected.items()),
                                                                                   k=NUM_HONEST)]
        jobs += [_abandoned_upload(client, rng, f"abandoned-{i}", adapter_dir) for i in range(NUM_ABANDONED_UPLOADS)]
        jobs += [_bad(client, rng, name, request, allowed) for name, (request, allowed) in _bad_inputs().items()]
        rng.shuffle(jobs)
        return await asyncio.gather(*jobs)


async def _after_random_delay(rng: random.Random) -> None:
    await asyncio.sleep(rng.uniform(0, STORM_SPREAD_S))


async def _bounded(job) -> object:
    try:
        return await asyncio.wait_for(job, HANG_BOUND_S)
    except asyncio.TimeoutError:
        return "hung"


async def _abandoned(client: httpx.AsyncClient, rng: random.Random, models: list[str]) -> tuple:
    """A long request on a random route, abandoned after a random delay (or after a few stream chunks)."""
    await _after_random_delay(rng)
    route, body, is_stream = _long_request(rng, rng.choice(models))
    give_up_after_s = rng.uniform(0.0, 0.5)
    num_chunks = rng.randrange(0, 4)

    async def run():
        if not is_stream:
            response = await client.post(route, json=body)
            return response.status_code
        async with client.stream("POST", route, json=body) as response:
            if response.status_code != 200:
                return response.status_code
            lines = response.aiter_lines()
            for _ in range(num_chunks):
                await anext(lines)
            return "left"  # leaving the `with` closes the connection mid-stream

    try:
        outcome = await asyncio.wait_for(run(), give_up_after_s)
    except asyncio.TimeoutError:
        outcome = "left"
    except (httpx.HTTPError, StopAsyncIteration) as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    return ("abandoned", outcome, route)


async def _abandoned_upload(client: httpx.AsyncClient, rng: random.Random, name: str, adapter_dir: Path) -> tuple:
    """A multipart upload sent slowly in small pieces and abandoned at a random moment."""
    await _after_random_delay(rng)
    boundary = "chaos-boundary"
    payload = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{part}"; filename="{part}"\r\n\r\n'.encode()
        + (adapter_dir / part).read_bytes() + b"\r\n"
        for part in ("adapter_config.json", "adapter_model.safetensors")) + f"--{boundary}--\r\n".encode()
    pieces = [payload[i:i + 4096] for i in range(0, len(payload), 4096)]

    async def body():
        for piece in pieces:
            await asyncio.sleep(0.002)
            yield piece

    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    try:
        response = await asyncio.wait_for(client.put(f"/v1/adapters/{name}", content=body(), headers=headers),
                                          rng.uniform(0.0, 0.3))
        outcome = response.status_code
    except asyncio.TimeoutError:
        outcome = "left"
    except httpx.HTTPError as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    return ("abandoned", outcome, "upload")


def _long_request(rng: random.Random, model: str) -> tuple[str, dict, bool]:
    is_stream = rng.random() < 0.5
    route = rng.choice(["/v1/completions", "/v1/chat/completions", "/generate"])
    if route == "/v1/completions":
        return route, completion_body(model, max_tokens=LONG_TOKENS, stream=is_stream), is_stream
    if route == "/v1/chat/completions":
        return route, {"model": model, "messages": [{"role": "user", "content": "Hello"}], "ignore_eos": True,
                       "max_tokens": LONG_TOKENS, "stream": is_stream}, is_stream
    parameters = {"max_new_tokens": LONG_TOKENS, **({} if model == BASE_ID else {"adapter_id": model})}
    return ("/generate_stream" if is_stream else "/generate"), {"inputs": "Hello", "parameters": parameters}, \
        is_stream


async def _honest(client: httpx.AsyncClient, rng: random.Random, model: str, text: str) -> tuple:
    """A short greedy request that runs to its end; its text must be the one it gives alone."""
    await _after_random_delay(rng)

    async def run() -> str | int:
        if rng.random() < 0.5:
            response = await client.post("/v1/completions", json=completion_body(model))
            return response.json()["choices"][0]["text"] if response.status_code == 200 else response.status_code
        parts = []
        async with client.stream("POST", "/v1/completions", json=completion_body(model, stream=True)) as response:
            if response.status_code != 200:
                return response.status_code
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    parts.extend(c["text"] for c in chunk.get("choices", ()))
        return "".join(parts)

    return ("honest", await _bounded(run()), text, model)


async def _bad(client: httpx.AsyncClient, rng: random.Random, name: str, request: dict,
               allowed: set[int]) -> tuple:
    await _after_random_delay(rng)

    async def run() -> int:
        return (await client.request(**request)).status_code

    return (f"bad:{name}", await _bounded(run()), allowed)


def _bad_inputs() -> dict[str, tuple[dict, set[int]]]:
    """name -> (httpx request arguments, the statuses that count as a clean refusal)."""
    json_headers = {"content-type": "application/json"}
    completions = {"method": "POST", "url": "/v1/completions"}
    bomb = build_bomb(64 << 20)
    return {
        "5 MB body": ({**completions, "json": completion_body(BASE_ID, prompt="x" * (5 << 20))}, {413}),
        "3 MB prompt": ({**completions, "json": completion_body(BASE_ID, prompt="Hello " * (500_000))}, {400}),
        "1M-character chat message": ({"method": "POST", "url": "/v1/chat/completions", "json": {
            "model": BASE_ID, "messages": [{"role": "user", "content": "a" * 1_000_000}]}}, {400}),
        "prompt over max_model_len tokens": ({**completions, "json": completion_body(
            BASE_ID, prompt="0123456789 abcdefghij " * 300)}, {400}),
        "lone surrogate": ({**completions, "headers": json_headers,
                            "content": b'{"model": "tiny-llama", "prompt": "a\\ud800b"}'}, {400}),
        "malformed JSON": ({**completions, "headers": json_headers, "content": b'{"model": "tiny-llama", "pro'},
                           {400, 422}),
        "unknown model": ({**completions, "json": completion_body("no-such-adapter")}, {404}),
        "negative max_tokens": ({**completions, "json": completion_body(BASE_ID, max_tokens=-1)}, {400, 422}),
        "logit_bias outside the vocabulary": ({**completions, "json": completion_body(
            BASE_ID, logit_bias={"99999999": 5})}, {400}),
        "corrupt safetensors": ({"method": "PUT", "url": "/v1/adapters/corrupt", "files": {
            "adapter_config.json": ("adapter_config.json", b'{"peft_type": "LORA", "r": 4, "lora_alpha": 8, '
                                                           b'"target_modules": ["q_proj"]}'),
            "adapter_model.safetensors": ("adapter_model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}junk"),
        }}, {400, 422}),
        "upload over max_upload_bytes": ({"method": "PUT", "url": "/v1/adapters/huge", "files": {
            "archive": ("a.zip", io.BytesIO(b"\0" * 3_000_000))}}, {413}),
        "archive bomb": ({"method": "PUT", "url": "/v1/adapters/bomb", "files": {
            "archive": ("a.tar.gz", bomb)}}, {400, 413, 422}),
        "adapter name with a newline": ({"method": "PUT", "url": "/v1/adapters/good%0A", "files": {
            "archive": ("a.zip", b"PK")}}, {400}),
    }
