"""The server's own view of a load: deltas of its Prometheus histograms and counters across the load.

Client-side TTFT includes HTTP, tokenization and queueing in the API process; the engine's
`vllm:time_to_first_token_seconds` and `vllm:request_queue_time_seconds` start at the engine's arrival.
Comparing them tells where time goes (and `iteration_tokens` how full the steps were)."""

from __future__ import annotations

import httpx

MEANS = {  # result key -> histogram family whose mean over the load is reported
    "ttft_ms_mean": "vllm:time_to_first_token_seconds",
    "queue_ms_mean": "vllm:request_queue_time_seconds",
    "prefill_ms_mean": "vllm:request_prefill_time_seconds",
    "itl_ms_mean": "vllm:inter_token_latency_seconds",
    "tokens_per_step_mean": "vllm:iteration_tokens_total",
    "http_admission_ms_mean": "loraplex_http_admission_seconds",
    "http_first_output_ms_mean": "loraplex_http_first_output_seconds",
    # Adapter loads inside the server: disk -> CPU tier (read, check, pinned pages), CPU -> a GPU slot
    # (from the issue of the copy to its observed completion; in merged mode, the swaps).
    "cpu_load_ms_mean": 'loraplex_adapter_load_seconds{tier="cpu"}',
    "gpu_load_ms_mean": 'loraplex_adapter_load_seconds{tier="gpu"}',
}
COUNTERS = {"preemptions": "vllm:num_preemptions_total", "prefix_cache_hit_tokens": "vllm:prefix_cache_hits_total",
            "merged_swaps": 'loraplex_adapter_swaps_total{mode="merged"}',
            "slot_loads": 'loraplex_adapter_loads_total{tier="gpu"}',
            "cpu_loads": 'loraplex_adapter_loads_total{tier="cpu"}',
            "gpu_evictions": 'loraplex_adapter_evictions_total{tier="gpu"}',
            "cpu_evictions": 'loraplex_adapter_evictions_total{tier="cpu"}'}


def snapshot(url: str) -> dict[str, float]:
    """/metrics as sums: name -> the sum over its labels, and name{label="value"} -> the sum over the
    samples with that one label value (for the labels in LABELS)."""
    return parse_samples(httpx.get(f"{url}/metrics", timeout=10).text)


LABELS = ("mode", "tier")  # labels whose values split a counter in COUNTERS


def parse_samples(text: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        try:
            value = float(line.rsplit(" ", 1)[1])
        except ValueError:
            continue
        values[name] = values.get(name, 0.0) + value
        for label in LABELS:
            marker = f'{label}="'
            if marker in line:
                label_value = line.split(marker, 1)[1].split('"', 1)[0]
                key = f'{name}{{{label}="{label_value}"}}'
                values[key] = values.get(key, 0.0) + value
    return values


def deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """Means (ms, except tokens per step) and counter increases between two snapshots."""
    result: dict[str, float | None] = {}
    for key, family in MEANS.items():
        base, brace, label = family.partition("{")  # a label selects one series: name_count{label="v"}
        count_key, sum_key = f"{base}_count{brace}{label}", f"{base}_sum{brace}{label}"
        count = after.get(count_key, 0.0) - before.get(count_key, 0.0)
        total = after.get(sum_key, 0.0) - before.get(sum_key, 0.0)
        scale = 1.0 if key.startswith("tokens") else 1000.0
        result[key] = round(total / count * scale, 3) if count > 0 else None
    for key, name in COUNTERS.items():
        result[key] = after.get(name, 0.0) - before.get(name, 0.0)
    return result
