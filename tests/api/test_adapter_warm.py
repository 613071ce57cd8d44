"""A stored adapter is read into the CPU tier right away (as vLLM's load_lora_adapter makes it resident),
with the engine in a thread and in its own process: no request needed."""

from __future__ import annotations

import time

from prometheus_client.parser import text_string_to_metric_families

from tests.api.helpers import upload


def cpu_loads(client) -> float:
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    return sum(s.value for s in families["loraplex_adapter_loads"].samples
               if s.name == "loraplex_adapter_loads_total" and s.labels.get("tier") == "cpu")


def test_an_uploaded_adapter_is_read_into_memory_before_any_request(open_server, tiny_adapters):
    with open_server.client() as client:
        before = cpu_loads(client)
        upload(client, "warm-me", tiny_adapters["all-r8"])
        deadline = time.monotonic() + 10
        while cpu_loads(client) < before + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cpu_loads(client) == before + 1
        reply = client.post("/v1/completions", json={"model": "warm-me", "prompt": [5, 6, 7], "max_tokens": 2})
        assert reply.status_code == 200
        assert cpu_loads(client) == before + 1  # the request found it in memory: no second read
