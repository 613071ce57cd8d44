"""Concurrent identical requests over adapters that keep being evicted (max_cpu_adapters=1, and two GPU
slots for five models), with disconnects: the scenario that killed the engine thread for good (issue 9,
defect 1). Also in merged mode, where every change of adapter is a swap of the base weights (a base
request at the head of the queue used to fail the whole step there)."""

from __future__ import annotations

import random
import threading
import time

import httpx
import pytest

from tests.chaos.harness import (
    HANG_BOUND_S,
    HealthProbe,
    assert_server_sound,
    completion_body,
    expected_outputs,
    reference_outputs,
)

NUM_ROUNDS = 3
NUM_IDENTICAL = 10  # identical requests per adapter and round, fired together


@pytest.mark.parametrize("lora_mode", ["unmerged", "merged"])
def test_identical_requests_over_evicted_adapters(chaos_server, tiny_adapters, tmp_path, record_figures, lora_mode):
    server = chaos_server(tmp_path / "store", max_cpu_adapters=1, max_slots=2, max_rank=16,
                          lora_mode=lora_mode)  # a 32-unit pool: the four adapters take 40
    with server.client() as client:
        references = reference_outputs(client, tiny_adapters)
    expected = expected_outputs(references)
    rng = random.Random(1)
    outcomes: list[tuple[str, str, object]] = []  # (model, kind, text | status | exception name)
    lock = threading.Lock()

    def one(model: str, kind: str, start: threading.Barrier) -> None:
        start.wait(HANG_BOUND_S)
        body = completion_body(model)
        with httpx.Client(base_url=server.url, timeout=HANG_BOUND_S) as client:
            try:
                if kind == "json":
                    response = client.post("/v1/completions", json=body)
                    result = response.json()["choices"][0]["text"] if response.status_code == 200 \
                        else response.status_code
                elif kind == "stream":
                    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                        result = _stream_text(response)
                elif kind == "leave-stream":  # read one chunk, then hang up
                    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                        next(response.iter_lines())
                    result = "left"
                else:  # leave-json: give up after a few milliseconds
                    client.post("/v1/completions", json=body, timeout=rng.uniform(0.005, 0.05))
                    result = "finished before the client left"
            except httpx.TimeoutException as exc:
                result = "left" if kind == "leave-json" else type(exc).__name__
        with lock:
            outcomes.append((model, kind, result))

    rss_before = server.rss_mib()
    started = time.monotonic()
    with HealthProbe(server) as probe:
        for _ in range(NUM_ROUNDS):
            jobs = [(model, rng.choice(["json", "json", "stream", "leave-stream", "leave-json"]))
                    for model in expected for _ in range(NUM_IDENTICAL)]
            start = threading.Barrier(len(jobs))
            threads = [threading.Thread(target=one, args=(model, kind, start)) for model, kind in jobs]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(HANG_BOUND_S)
            assert not any(thread.is_alive() for thread in threads), "a request hung"
        figures = assert_server_sound(server, probe, rss_before, expected)
    seconds = time.monotonic() - started
    wrong = [(model, kind, result) for model, kind, result in outcomes
             if kind in ("json", "stream") and result != expected[model]]
    assert not wrong, wrong[:5]
    assert len(outcomes) == NUM_ROUNDS * NUM_IDENTICAL * len(expected)
    record_figures({**figures, "requests": len(outcomes), "seconds": round(seconds, 1)})


def _stream_text(response: httpx.Response) -> str | int:
    import json

    if response.status_code != 200:
        return response.status_code
    parts = []
    for line in response.iter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if "error" in chunk:
            return f"error event {chunk['error']}"
        parts.extend(choice["text"] for choice in chunk["choices"])
    return "".join(parts)
