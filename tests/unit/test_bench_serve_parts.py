"""The pieces of bench.serve that need no server: tokenizer, adapters, traffic, ratios."""

from __future__ import annotations

import json
from collections import Counter

import torch

from adapters_store import BaseModelSpec, parse_adapter
from bench.serve.adapters import AdapterFactory, adapter_nbytes, adapter_specs
from bench.serve.load import Traffic, percentile
from bench.serve.modeldir import build_tokenizer
from bench.serve.scenarios import derive_ratios
from bench.shapes import llama_config, shape_facts


def test_tokenizer_has_the_model_vocab_and_round_trips(tmp_path):
    tokenizer = build_tokenizer("1b", tmp_path)
    assert len(tokenizer) == 128256
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (128000, 128001)
    text = "Hello world, naïve café 123!"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_adapters_are_valid_distinct_peft_files():
    shape = shape_facts(llama_config("tiny"))
    factory = AdapterFactory(shape, max_rank=32)
    spec = BaseModelSpec.from_hf_config(llama_config("tiny"))
    hashes = set()
    for index, adapter in enumerate(adapter_specs(4, [8, 32])):
        config, weights = factory.files(adapter, index)
        parsed_config, parsed = parse_adapter(config, weights, spec, max_rank=32)
        assert parsed.rank == adapter.rank and len(parsed_config["target_modules"]) == 7
        a, b = parsed.tensors[0, "q_proj"]
        assert bool(b.abs().sum() > 0) and bool(a.abs().sum() > 0)
        assert len(weights) > adapter_nbytes(shape, adapter.rank, torch.bfloat16)
        hashes.add(hash(weights))
    assert len(hashes) == 4


def test_traffic_distributions():
    names = tuple(f"a{i}" for i in range(32))
    assert Traffic(adapters=names, distribution="cycle").choices(64) == list(names) * 2
    counts = Counter(Traffic(adapters=names, distribution="zipf").choices(4000))
    assert counts["a0"] > 5 * counts["a31"]
    assert Traffic(adapters=()).choices(2) == ["", ""]
    prompts = Traffic(adapters=(), prompt_len=7).prompts(3, (3, 10))
    assert all(len(p) == 7 and all(3 <= t < 10 for t in p) for p in prompts)


def test_percentile_and_ratios():
    assert percentile([], 50) is None
    assert percentile([1.0, 2.0, 3.0], 50) == 2.0
    data = {"server": {f"{m}/{t}": {"tokens_per_s": v} for m, v in (("unmerged", 100.0), ("merged", 80.0),
                                                                   ("auto", 90.0))
                       for t in ("zipf", "uniform", "single")}}
    ratios = derive_ratios("lora-modes", "1b", data)
    assert ratios["auto_over_best_zipf_1b"] == 0.9
    assert json.dumps(derive_ratios("c32", "1b", {}))  # missing figures give nulls, not errors


def test_fairness_keys_file_is_one_the_server_reads(tmp_path):
    from bench.serve.phases import write_auth_file
    from bench.serve.scenarios import tenant_key
    from server.api.auth import KeyRing

    ring = KeyRing.from_file(write_auth_file(tmp_path / "keys.toml", ("light", "heavy")))
    assert ring.authenticate(tenant_key("heavy")).tenant == "heavy"
    assert "admin" in ring.authenticate(tenant_key("light")).scopes


def test_seed_store_writes_mixed_ranks_once(tmp_path):
    from adapters_store import AdapterStore
    from bench.serve.adapters import seed_store
    from bench.serve.modeldir import build_model_dir

    model_dir, _ = build_model_dir("tiny", tmp_path / "cache")
    factory = AdapterFactory(shape_facts(llama_config("tiny")), max_rank=16)
    specs = adapter_specs(6, [8, 16])
    first = seed_store(model_dir, tmp_path / "store", factory, specs, 16, 1 << 30)
    again = seed_store(model_dir, tmp_path / "store", factory, specs, 16, 1 << 30)
    assert (first["written"], again["written"]) == (6, 0)
    store = AdapterStore(tmp_path / "store", BaseModelSpec.from_hf_config(llama_config("tiny")), 16, 1 << 30)
    assert sorted((r.name, r.rank, r.version) for r in store.list()) == sorted((s.name, s.rank, 1) for s in specs)


def test_cold_load_bench_runs_on_the_tiny_shape(capsys):
    from bench.cold_load import main

    assert main(["--model", "tiny", "--rank", "4", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tiny rank 4:") and "of bfloat16" in out
    assert "put ms: " in out and "load_weights ms: " in out and out.count(",") >= 2


def test_scrape_splits_the_swap_and_load_counters_by_mode_and_tier():
    from bench.serve.scrape import deltas, parse_samples

    before = parse_samples('loraplex_adapter_swaps_total{model_name="m",mode="merged"} 2.0\n'
                           'loraplex_adapter_swaps_total{model_name="m",mode="unmerged"} 5.0\n')
    after = parse_samples('# HELP x\n'
                          'loraplex_adapter_swaps_total{model_name="m",mode="merged"} 3.0\n'
                          'loraplex_adapter_swaps_total{model_name="m",mode="unmerged"} 9.0\n'
                          'loraplex_adapter_loads_total{model_name="m",tier="cpu"} 4.0\n'
                          'loraplex_adapter_loads_total{model_name="m",tier="gpu"} 7.0\n')
    assert after["loraplex_adapter_swaps_total"] == 12.0
    result = deltas(before, after)
    assert (result["merged_swaps"], result["cpu_loads"], result["slot_loads"]) == (1.0, 4.0, 7.0)


def test_scrape_means_of_one_tier_of_the_load_time_histogram():
    from bench.serve.scrape import deltas, parse_samples

    def metrics(cpu_sum, cpu_count, gpu_sum, gpu_count):
        return parse_samples(
            f'loraplex_adapter_load_seconds_sum{{model_name="m",tier="cpu"}} {cpu_sum}\n'
            f'loraplex_adapter_load_seconds_count{{model_name="m",tier="cpu"}} {cpu_count}\n'
            f'loraplex_adapter_load_seconds_sum{{model_name="m",tier="gpu"}} {gpu_sum}\n'
            f'loraplex_adapter_load_seconds_count{{model_name="m",tier="gpu"}} {gpu_count}\n')

    result = deltas(metrics(1.0, 10, 0.5, 5), metrics(1.3, 13, 0.52, 9))
    assert result["cpu_load_ms_mean"] == 100.0 and result["gpu_load_ms_mean"] == 5.0
    assert deltas(metrics(1.0, 10, 0.5, 5), metrics(1.0, 10, 0.5, 5))["cpu_load_ms_mean"] is None


def test_client_process_shares_cover_every_request_once():
    from bench.serve.client_procs import shares

    traffic = Traffic(adapters=("a",), concurrency=7, num_requests=20)
    parts = shares(traffic, 3)
    assert [streams for streams, _ in parts] == [3, 2, 2]
    assert sorted(i for _, indices in parts for i in indices) == list(range(20))
    assert len(shares(traffic, 50)) == 7  # never more processes than streams
    assert shares(traffic, 1) == [(7, list(range(20)))]


def test_a_failed_load_says_why_once_per_status():
    from bench.serve.load import RequestResult, summarize

    results = [RequestResult("a", 503, 0.0, error="the engine is not running: boom"),
               RequestResult("a", 503, 0.0, error="later"), RequestResult("b", "ReadTimeout", 0.0, error="timed out"),
               RequestResult("c", 200, 0.0, first=0.1, done=0.2, chunk_times=[0.1], completion_tokens=1)]
    summary = summarize(results, 1.0, Traffic(adapters=("a", "b", "c"), prompt_len=4), 0.0)
    assert summary["errors_by_status"] == {"503": 2, "ReadTimeout": 1}
    assert summary["first_error"] == {"503": "the engine is not running: boom", "ReadTimeout": "timed out"}


def test_lora_modes_runs_zipf_and_uniform_longer_except_in_merged_mode():
    """Merged mode swaps at every batch of Zipf or uniform traffic (~18 s for 128 requests on the H200); the other
    modes finish 128 in under a second with the engine in its own process, too short to weigh one stall."""
    from bench.serve.scenarios import Knobs, build

    scenario = build("lora-modes", Knobs())
    requests = {(phase.name, load.name): load.traffic.num_requests for phase in scenario.phases for load in phase.loads}
    assert requests[("merged", "zipf")] == requests[("merged", "uniform")] == 128
    for mode in ("unmerged", "auto"):
        assert requests[(mode, "zipf")] == requests[(mode, "uniform")] == requests[(mode, "single")] == 512
    assert requests[("merged", "single")] == 512 and requests[("auto", "warmup")] == 32
