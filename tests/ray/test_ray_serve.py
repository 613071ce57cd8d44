"""loraplex on Ray Serve (deploy/ray): 3 replicas of the tiny model on this CPU, 12 adapters in one shared
store, requests routed by adapter. Marked `ray` and skipped without ray[serve] (not a dependency, so not in
CI): `pip install "ray[serve]==2.60.0"` then `pytest -m ray tests/ray`."""

from __future__ import annotations

import json
import os
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.api.helpers import BASE_ID, REPO_ROOT, free_port, upload

pytestmark = pytest.mark.ray
serve = pytest.importorskip("ray.serve")

NUM_REPLICAS, NUM_ADAPTERS, MAX_SLOTS = 3, 12, 4
ROUNDS, MIN_HIT_RATE = 4, 0.9


@pytest.fixture(scope="module")
def cluster(tiny_llama_dir, tiny_adapters, tmp_path_factory):
    import ray

    os.environ["LORAPLEX_MAX_SLOTS"] = str(MAX_SLOTS)  # read by deploy.ray.app at import, here and in the workers
    from deploy.ray.app import build

    python_path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=NUM_REPLICAS + 1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": python_path, "LORAPLEX_MAX_SLOTS": str(MAX_SLOTS),
                                       "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}})
    port = free_port()
    settings = dict(
        model=str(tiny_llama_dir), served_model_name=BASE_ID, device="cpu", quantization="none", dtype="float32",
        cuda_graphs=False, max_model_len=256, kv_cache_blocks=256, max_rank=16, max_upload_bytes=200_000,
        request_timeout_s=60, max_slots=MAX_SLOTS,
        adapters_dir=str(tmp_path_factory.mktemp("shared-store")),  # one store for every replica
    )
    started = time.monotonic()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(settings, NUM_REPLICAS), route_prefix="/")
    print(f"\n{NUM_REPLICAS} replicas ready in {time.monotonic() - started:.1f} s")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    names = [f"tenant{i % 3}-adapter{i}" for i in range(NUM_ADAPTERS)]
    for i, name in enumerate(names):
        upload(client, name, tiny_adapters[list(tiny_adapters)[i % len(tiny_adapters)]])
    yield client, names, settings
    client.close()
    serve.shutdown()
    ray.shutdown()


def complete(client, model: str, max_tokens: int = 8) -> httpx.Response:
    body = {"model": model, "prompt": "Hello world", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return client.post("/v1/completions", json=body)


def test_every_route_answers_through_the_ingress(cluster):
    client, names, _ = cluster
    models = {m["id"] for m in client.get("/v1/models").json()["data"]}
    assert {BASE_ID, *names} <= models  # the shared store: every replica lists every upload
    assert client.get("/ready").status_code == 200
    assert client.post("/v1/completions", json={"model": "missing", "prompt": "x"}).status_code == 404
    body = {"inputs": "Hello", "parameters": {"adapter_id": names[0], "max_new_tokens": 4}}
    assert client.post("/generate", json=body).status_code == 200
    stream = {"model": names[1], "prompt": "Hello", "max_tokens": 4, "stream": True}
    with client.stream("POST", "/v1/completions", json=stream) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and json.loads(lines[0][6:])["model"] == names[1]


def test_requests_for_an_adapter_land_on_the_replica_that_holds_it(cluster):
    client, names, _ = cluster
    for name in names:  # warm-up: each adapter gets a replica; Serve learns where it is
        assert complete(client, name).status_code == 200
    time.sleep(2)  # replicas report their multiplexed ids to the routers periodically

    served_by: dict[str, Counter] = defaultdict(Counter)
    texts: dict[str, set[str]] = defaultdict(set)
    work = [name for _ in range(ROUNDS) for name in names]
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=4) as pool:
        responses = list(pool.map(lambda name: (name, complete(client, name)), work))
    elapsed = time.monotonic() - started
    for name, response in responses:
        assert response.status_code == 200, response.text
        served_by[name][response.headers["x-loraplex-replica"]] += 1
        texts[name].add(response.json()["choices"][0]["text"])
    hits = sum(counts.most_common(1)[0][1] for counts in served_by.values())
    hit_rate = hits / len(work)
    replicas = {replica for counts in served_by.values() for replica in counts}
    print(f"\nhit rate {hit_rate:.2f} over {len(work)} requests, {len(replicas)} replicas used, "
          f"{len(work) / elapsed:.1f} requests/s ({elapsed:.1f} s)")
    assert hit_rate >= MIN_HIT_RATE
    assert len(replicas) == NUM_REPLICAS  # the 12 adapters are spread, not all on one replica
    assert all(len(t) == 1 for t in texts.values()), "an adapter's greedy output differs between replicas"


def test_a_replaced_adapter_gives_old_or_new_output_and_only_new_after_the_ack(cluster, tiny_adapters):
    client, names, _ = cluster
    name = names[0]
    old_text = complete(client, name, 24).json()["choices"][0]["text"]
    with ThreadPoolExecutor(max_workers=4) as pool:
        running = [pool.submit(complete, client, name, 24) for _ in range(6)]
        upload(client, name, tiny_adapters["all-r8"])  # another rank and targets: another output
        after_ack = [complete(client, name, 24) for _ in range(3)]
        during = [f.result() for f in running]
    new_texts = {r.json()["choices"][0]["text"] for r in after_ack}
    assert len(new_texts) == 1 and old_text not in new_texts, "every request after the ack runs the new version"
    assert {r.json()["choices"][0]["text"] for r in during} <= {old_text, *new_texts}


def _replaced(victim: str) -> bool:
    """Serve runs NUM_REPLICAS healthy engines again, none of them the killed one."""
    import ray

    engines = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "Engine" in a["name"]]
    deployment = serve.status().applications["default"].deployments["Engine"]
    return victim not in engines and len(engines) == NUM_REPLICAS and deployment.status == "HEALTHY"


def test_killing_a_replica_fails_only_its_requests_and_cleanly(cluster):
    import ray

    client, names, _ = cluster
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "Engine" in a["name"]]
    assert len(replicas) == NUM_REPLICAS
    victim = ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"])
    with ThreadPoolExecutor(max_workers=12) as pool:
        futures = [pool.submit(complete, client, name, 200) for name in names]
        time.sleep(0.5)  # the requests are in flight on every replica
        ray.kill(victim, no_restart=True)
        responses = [f.result() for f in futures]
    failed = [r for r in responses if r.status_code != 200]
    for response in failed:
        assert response.status_code == 503 and response.json()["error"]["type"] == "ServiceUnavailableError"
    print(f"\nreplica killed: {len(failed)} of {len(responses)} in-flight requests failed (503), none hung")
    assert len(failed) < len(responses)  # the other replicas' requests finished
    deadline = time.monotonic() + 120
    while not _replaced(replicas[0]["name"]):
        assert time.monotonic() < deadline, "Serve did not replace the killed replica"
        time.sleep(0.5)
    statuses = [complete(client, name).status_code for name in names]  # Serve has replaced the replica
    assert statuses == [200] * len(names), statuses


def _throughput(client, names) -> float:
    work = [name for _ in range(ROUNDS) for name in names]
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=6) as pool:
        statuses = list(pool.map(lambda name: complete(client, name, 32).status_code, work))
    assert statuses == [200] * len(work)
    return len(work) * 32 / (time.monotonic() - started)


def test_throughput_with_three_replicas_and_with_one(cluster):
    """Figures only: on this 2-core CPU three replicas share the same cores, so no speed-up is expected."""
    from deploy.ray.app import build

    client, names, settings = cluster
    three = _throughput(client, names)
    serve.run(build(settings, 1), route_prefix="/")
    one = _throughput(client, names)
    print(f"\ngenerated tokens/s over HTTP: 3 replicas {three:.0f}, 1 replica {one:.0f} (ratio {three / one:.2f})")
