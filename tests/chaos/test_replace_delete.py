"""Adapter replace and delete under load: every output comes whole from one version, and from a
version that was current while the request started (not an older one, not a mix of two).

One name, `hot`, is re-uploaded over and over, each version with the weights of another source
adapter, and deleted now and then, while clients stream and post long greedy requests for it. Each
source gives a different text when run alone, so an output identifies the version that made it.
A request sent after op k-1 completed and answered before op j started may come from ops k-1..j:
its text must equal the reference of one of the uploads among them, and a 404 needs a delete among
them. Versions are pruned to adapter_versions_kept=2 and the CPU cache holds 2 adapters meanwhile."""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time

import httpx

from tests.api.helpers import upload
from tests.chaos.harness import (
    HANG_BOUND_S,
    HealthProbe,
    assert_server_sound,
    completion_body,
    expected_outputs,
    generate_alone,
    reference_outputs,
)

NUM_TOKENS_LONG = 48  # long enough that several uploads land while one request runs
NUM_CLIENTS = 10
LOAD_S = 4.0
DELETE_EVERY = 7  # every 7th admin op deletes `hot` instead of uploading


class AdminLog:
    """The ops on `hot` in order: ('put', source) or ('delete', None); how many started and completed."""

    def __init__(self):
        self.ops: list[tuple[str, str | None]] = []
        self.num_completed = 0
        self.acknowledged: dict[int, str] = {}  # version answered 201 -> its source
        self.lock = threading.Lock()

    def counts(self) -> tuple[int, int]:
        with self.lock:
            return self.num_completed, len(self.ops)


def test_replace_and_delete_under_load(chaos_server, tiny_adapters, tmp_path, record_figures):
    store = tmp_path / "store"
    server = chaos_server(store, adapter_versions_kept=2, max_cpu_adapters=2)
    sources = list(tiny_adapters)
    with server.client() as client:
        references = reference_outputs(client, tiny_adapters)
        long_references = {key: generate_alone(client, f"ref-{key}", max_tokens=NUM_TOKENS_LONG) for key in sources}
        assert len(set(long_references.values())) == len(sources)
    log = AdminLog()
    stop = threading.Event()
    results: list[tuple] = []
    results_lock = threading.Lock()

    def admin() -> None:
        rng = random.Random(3)
        with httpx.Client(base_url=server.url, timeout=HANG_BOUND_S) as client:
            for i in range(100_000):
                is_last = stop.is_set()
                is_delete = i % DELETE_EVERY == DELETE_EVERY - 1 and not is_last
                source = None if is_delete else rng.choice(sources)
                with log.lock:
                    log.ops.append(("delete" if is_delete else "put", source))
                if is_delete:
                    assert client.delete("/v1/adapters/hot").status_code == 200
                else:
                    version = upload(client, "hot", tiny_adapters[source])["version"]
                    log.acknowledged[version] = source
                with log.lock:
                    log.num_completed += 1
                if is_last:
                    return  # the last op is an upload, so `hot` exists at the end
                time.sleep(rng.uniform(0.02, 0.1))

    def request_loop(index: int) -> None:
        rng = random.Random(100 + index)
        with httpx.Client(base_url=server.url, timeout=HANG_BOUND_S) as client:
            while not stop.is_set():
                is_stream = rng.random() < 0.5
                num_completed, _ = log.counts()
                answered = []  # ops started when the answer began: a stream's first chunk, a JSON body's end
                try:
                    outcome = _run(client, is_stream, lambda seen=answered: seen.append(log.counts()[1]))
                except httpx.TimeoutException:
                    outcome = "hung"
                with results_lock:
                    results.append((outcome, num_completed, answered[0] if answered else log.counts()[1],
                                    is_stream))
                if outcome == 404:
                    time.sleep(0.02)  # deleted for now: do not spin on quick 404s

    with server.client() as client:  # op 0, so every request has a version to see
        upload(client, "hot", tiny_adapters[sources[0]])
    log.ops.append(("put", sources[0]))
    log.num_completed = 1
    rss_before = server.rss_mib()
    started = time.monotonic()
    threads = [threading.Thread(target=admin, daemon=True)]
    threads += [threading.Thread(target=request_loop, args=(i,), daemon=True) for i in range(NUM_CLIENTS)]
    with HealthProbe(server) as probe:
        for thread in threads:
            thread.start()
        time.sleep(LOAD_S)
        stop.set()
        for thread in threads:
            thread.join(HANG_BOUND_S)
        assert not any(thread.is_alive() for thread in threads), "a request or an admin op hung"
        figures = assert_server_sound(server, probe, rss_before, expected_outputs(references))
    seconds = time.monotonic() - started

    wrong, num_candidates = [], []  # how many sources each output could have come from
    for outcome, num_completed, num_started, is_stream in results:
        candidates = log.ops[num_completed - 1:num_started]
        if outcome == 404:
            is_right = any(kind == "delete" for kind, _ in candidates)
        else:
            is_right = any(kind == "put" and long_references[source] == outcome for kind, source in candidates)
        if not is_right:
            wrong.append((outcome, candidates, is_stream))
        num_candidates.append(len({source for kind, source in candidates if kind == "put"}))
    assert not wrong, f"{len(wrong)} of {len(results)} outputs from a wrong version: {wrong[:3]}"
    num_deletes = sum(kind == "delete" for kind, _ in log.ops)
    assert num_deletes >= 2 and len(log.acknowledged) >= 10, (num_deletes, len(log.acknowledged))

    last_version = max(log.acknowledged)
    with server.client() as client:
        current = client.get("/v1/adapters/hot").json()
    assert current["version"] == last_version, "the last acknowledged upload is not the current version"
    last_source = tiny_adapters[log.acknowledged[last_version]]
    assert current["sha256"] == hashlib.sha256((last_source / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert len([p for p in (store / "hot").iterdir() if p.name.startswith("v")]) <= 2, "old versions not pruned"
    record_figures({**figures, "requests": len(results), "versions": len(log.acknowledged), "deletes": num_deletes,
                    "not_found": sum(r[0] == 404 for r in results),
                    "mean_candidate_sources": round(sum(num_candidates) / len(num_candidates), 2),
                    "seconds": round(seconds, 1)})


def _run(client: httpx.Client, is_stream: bool, on_answer) -> str | int:
    """The text of one long greedy request for `hot` (or its status); calls `on_answer` when the answer
    begins (the first stream chunk; for JSON the response, which is sent whole at the end)."""
    body = completion_body("hot", max_tokens=NUM_TOKENS_LONG)
    if not is_stream:
        response = client.post("/v1/completions", json=body)
        on_answer()
        return response.json()["choices"][0]["text"] if response.status_code == 200 else response.status_code
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        on_answer()
        if response.status_code != 200:
            return response.status_code
        parts = []
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return f"error event {chunk['error']}"
                parts.extend(choice["text"] for choice in chunk["choices"])
    return "".join(parts)
