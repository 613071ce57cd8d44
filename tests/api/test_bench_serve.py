"""`python -m bench.serve` end to end on the tiny shape: real server subprocesses, HTTP uploads and
streams, the engine alone, and the result JSON's fields. No timing is asserted."""

from __future__ import annotations

import json
from pathlib import Path

from bench.serve.__main__ import main

SMALL = ["--model", "tiny", "--device", "cpu", "--requests", "6", "--concurrency", "3", "--prompt-len", "12",
         "--output-len", "5"]
LOAD_FIELDS = ("tokens_per_s", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99", "e2e_ms_p50",
               "e2e_ms_p99", "errors_by_status", "requests_ok", "output_tokens")


def run_bench(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "results"
    assert main([*SMALL, "--out", str(out), "--cache-dir", str(tmp_path.parent / "bench-serve-cache"), *args]) == 0
    (path,) = out.glob("*.json")
    data = json.loads(path.read_text())
    assert data["errors"] == {}, data["errors"]
    for key in ("date", "timestamp", "device", "command", "versions", "config", "build", "server", "engine"):
        assert key in data, key
    assert data["benchmark"] == "serve" and data["shape"] == "tiny" and "model" not in data  # not a bench.report run
    return data


def check_load(load: dict, num_requests: int, output_len: int) -> None:
    for field in LOAD_FIELDS:
        assert field in load, field
    assert load["errors_by_status"] == {}
    assert load["requests_ok"] == num_requests
    assert load["requests_with_exact_output_len"] == num_requests  # ignore_eos makes lengths exact
    assert load["output_tokens"] == num_requests * output_len


def test_c32_preset_on_tiny(tmp_path):
    """Its loads are sent from two client processes: their requests merge into one summary. The API process's CPU
    time is read from /proc in 10 ms clock ticks, so over a one-second load on a busy 2-core runner it can read 0.0
    (it did with 5-token and, once, with 20-token outputs): this test checks only that it is reported and in range;
    tests/unit/test_proc_cpu.py checks the accounting itself on a thread that is surely busy."""
    data = run_bench(tmp_path, "--preset", "c32", "--num-adapters", "3", "--client-procs", "2", "--output-len", "20")
    server, engine = data["server"], data["engine"]
    assert server["unmerged/upload"]["count"] == 3
    for name in ("greedy", "sampled"):
        check_load(server[f"unmerged/{name}"], 6, 20)
        assert server[f"unmerged/{name}"]["distinct_adapters"] == 3
        assert server[f"unmerged/{name}"]["client_procs"] == 2
        assert engine[f"unmerged/{name}"]["tokens_per_s"] > 0
        assert engine[f"unmerged/{name}"]["decode_step_ms_median"] > 0
        runs = engine[f"unmerged/{name}"]["tokens_per_s_runs"]  # the median of the timed runs is reported
        assert len(runs) == 5 and sorted(runs)[2] == engine[f"unmerged/{name}"]["tokens_per_s"]
        loop = engine[f"unmerged/{name}"]["closed_loop"]  # the load's 6 requests, 3 in flight, on the engine alone
        assert loop["output_tokens"] == 6 * 20 and loop["requests"] == 6 and len(loop["tokens_per_s_runs"]) == 3
        assert sorted(loop["tokens_per_s_runs"])[1] == loop["tokens_per_s"]
        assert loop["steps"] >= 2 * 20  # 3 in flight: two rounds of 20 tokens at least
        arrivals = engine[f"unmerged/{name}"]["closed_loop_arrivals"]  # replacements arrive 4-14 ms late
        assert arrivals["output_tokens"] == 6 * 20 and arrivals["requests"] == 6
        api = server[f"unmerged/{name}"]["server_cpu"]["api"]  # the server process's CPU over the load
        assert api["main_cpu_s"] >= 0 and 0 <= api["main_busy"] <= 1.5
    assert server["unmerged/sampled"]["traffic"]["temperature"] == 1.0
    # Fresh prompts per load: none may prefill from blocks an earlier load cached.
    seeds = [server[f"unmerged/{name}"]["traffic"]["seed"] for name in ("warmup", "greedy", "sampled")]
    assert len(set(seeds)) == 3
    assert server["unmerged/upload_to_usable"]["count"] == 4
    assert server["unmerged/upload_to_usable"]["upload_to_first_token_ms_p50"] > 0
    assert server["unmerged/start"]["exit_code"] == 0  # drained and stopped cleanly
    ratios = data["ratios"]
    for key in ("serve_over_engine_tiny_c32", "serve_over_engine_batch_tiny_c32", "serve_over_engine_arrivals_tiny_c32",
                "itl_p50_over_step_tiny_c32", "sampled_over_greedy_tiny_c32"):
        assert isinstance(ratios[key], float), key
    greedy = server["unmerged/greedy"]["tokens_per_s"]  # the serve ratio divides by the closed loop
    assert ratios["serve_over_engine_tiny_c32"] == greedy / engine["unmerged/greedy"]["closed_loop"]["tokens_per_s"]


def test_cold_warm_preset_on_tiny(tmp_path):
    data = run_bench(tmp_path, "--preset", "cold-warm", "--num-adapters", "2")
    server = data["server"]
    assert server["serve/upload_to_usable"]["count"] == 2
    assert server["serve/cold_upload"]["count"] == 2
    assert server["serve/restart"]["exit_code"] == 0
    assert server["serve/cold"]["count"] == server["serve/warm"]["count"] == 2
    assert server["serve/cold"]["errors_by_status"] == server["serve/warm"]["errors_by_status"] == {}
    for key in ("cold_ttft_extra_ms_tiny_r16", "upload_to_usable_ms_tiny_r16"):
        assert isinstance(data["ratios"][key], float), key


def test_prefix_preset_on_tiny(tmp_path):
    """Miss and hit probes complete; the hits' prefixes come from the cache (the server's own counter),
    the misses' do not."""
    data = run_bench(tmp_path, "--preset", "prefix", "--prompt-len", "96", "--requests", "3")
    server = data["server"]
    for label in ("prefix_warmup", "prefix_miss", "prefix_hit"):
        assert server[f"serve/{label}"]["errors_by_status"] == {}, label
    assert server["serve/prefix_miss"]["count"] == server["serve/prefix_hit"]["count"] == 3
    assert server["serve/prefix_hit"]["server_metrics"]["prefix_cache_hit_tokens"] >= 3 * 96
    assert server["serve/prefix_miss"]["server_metrics"]["prefix_cache_hit_tokens"] == 0
    assert isinstance(data["ratios"]["prefix_hit_ttft_over_miss_tiny"], float)


def test_zipf1000_preset_on_tiny(tmp_path):
    """The many-adapters run: a store seeded with mixed ranks, uniform traffic over the first 32 (here
    fewer) and Zipf traffic over all of them."""
    data = run_bench(tmp_path, "--preset", "zipf1000", "--num-adapters", "12")
    assert data["config"]["num_adapters"] == 12 and data["config"]["ranks"] == [8, 16, 32, 64]
    server = data["server"]
    for name in ("uniform32", "zipf1000"):
        check_load(server[f"serve/{name}"], 6, 5)
        assert server[f"serve/{name}"]["distinct_adapters"] > 1, name
    assert isinstance(data["ratios"]["zipf1000_over_uniform32"], float)


def test_fairness_preset_on_tiny(tmp_path):
    """Two tenants: the light one alone, then beside a heavy one that keeps sending all along."""
    data = run_bench(tmp_path, "--preset", "fairness")
    server = data["server"]
    check_load(server["serve/light_alone"], 6, 5)
    check_load(server["serve/light_with_heavy"], 6, 5)
    assert server["serve/light_with_heavy"]["background"]["requests_ok"] > 0  # the heavy tenant really ran
    assert isinstance(data["ratios"]["fair_light_p99_ratio"], float)
