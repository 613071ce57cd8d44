"""GPU engine checks (run on the GPU machine): CUDA-graph decode equals eager, and the mixed batch
through the Triton kernels matches PEFT with each adapter alone."""

from __future__ import annotations

import pytest
import torch

from server.config import Settings
from server.engine.engine import LLMEngine
from server.engine.request import Request, SamplingParams
from server.model.loader import load_hf_dir
from tests.unit.test_mixed_batch_oracle import PROMPTS, adapter_refs, peft_logits, run_capturing

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def gpu_engine(model_dir, *, dtype="float32", quantize=False, graphs=True, **kw):
    settings = Settings(model=str(model_dir), device="cuda", dtype=dtype, quantization="nf4" if quantize else "none",
                        cuda_graphs=graphs, kv_cache_blocks=256, **kw)
    loaded = load_hf_dir(model_dir, device=torch.device("cuda"), dtype=getattr(torch, dtype), quantize=quantize)
    return LLMEngine(loaded, settings)


def make_requests(refs, names, n=8):
    return [Request(list(p), SamplingParams(max_tokens=n, temperature=0, ignore_eos=True),
                    adapter=None if name is None else refs[name]) for p, name in zip(PROMPTS, names, strict=True)]


@pytest.mark.parametrize("quantize,dtype,pairs", [(False, "float32", "auto"), (True, "bfloat16", "auto"),
                                                  (True, "bfloat16", "1")])
def test_graph_decode_equals_eager(tiny_llama_dir, tiny_adapters, quantize, dtype, pairs, monkeypatch):
    """pairs "1": every NF4 call of 1-8 rows on nf4_gemv_pairs, which the tiny model's weights (all under
    nf4_dispatch.PAIRS_MIN_WEIGHTS) never meet by default: eager and captured decode steps through it."""
    from server.kernels.nf4 import cuda_nf4_gemv, nf4_dispatch

    monkeypatch.setattr(nf4_dispatch, "PAIRS", pairs)
    calls = []
    real_pairs = cuda_nf4_gemv.nf4_gemv_pairs
    monkeypatch.setattr(cuda_nf4_gemv, "nf4_gemv_pairs", lambda *a, **k: calls.append(1) or real_pairs(*a, **k))
    refs = adapter_refs(tiny_llama_dir, tiny_adapters)
    names = [None, "attn-r4", "all-r8", "mlp-r2-rs", "ko-r16"]
    results = []
    for graphs in (False, True):
        engine = gpu_engine(tiny_llama_dir, dtype=dtype, quantize=quantize, graphs=graphs, max_slots=4, max_rank=16)
        requests = make_requests(refs, names)
        captured, _ = run_capturing(engine, requests)
        results.append((requests, captured))
        if graphs:
            assert engine.runner.graphs.num_captured > 0
    if pairs == "1" and nf4_dispatch.kernel_table() == nf4_dispatch.WITH_CUDA_KERNEL and nf4_dispatch.pairs_device():
        assert calls, "no decode call ran nf4_gemv_pairs"
    (eager_reqs, eager_logits), (graph_reqs, graph_logits) = results
    for a, b in zip(eager_reqs, graph_reqs, strict=True):
        assert a.output_token_ids == b.output_token_ids
        for x, y in zip(eager_logits[a.request_id], graph_logits[b.request_id], strict=True):
            torch.testing.assert_close(x, y, atol=2e-2, rtol=1e-2)


def test_gpu_mixed_batch_matches_peft_alone(tiny_llama_dir, tiny_adapters):
    refs = adapter_refs(tiny_llama_dir, tiny_adapters)
    names = [None, "attn-r4", "all-r8", "mlp-r2-rs", "ko-r16"]
    engine = gpu_engine(tiny_llama_dir, max_slots=4, max_rank=16)
    requests = make_requests(refs, names, n=6)
    captured, distinct = run_capturing(engine, requests)
    assert max(distinct) == 5
    assert_match_peft_alone(tiny_llama_dir, tiny_adapters, requests, names, captured)


def assert_match_peft_alone(model_dir, adapters, requests, names, captured):
    """Each request's captured logits against PEFT's with its adapter alone (None: the base model)."""
    for request, name in zip(requests, names, strict=True):
        full = request.prompt_token_ids + request.output_token_ids
        reference = peft_logits(model_dir, None if name is None else adapters[name], full)
        start = len(request.prompt_token_ids) - 1
        for step, row in enumerate(captured[request.request_id]):
            torch.testing.assert_close(row.cpu(), reference[start + step], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("one_row", [0, 256])
def test_down_shrink_in_the_activation_matches_peft_alone(tiny_llama_dir, tiny_adapters, one_row, monkeypatch):
    """LORAPLEX_LORA_SILU_SHRINK: the captured decode steps compute down_proj's LoRA shrink in the activation kernel
    (act_shrink), with gate_up's delta pending there (one_row 256) or expanded before it (0); the mixed batch still
    matches PEFT with each adapter alone."""
    from server.kernels.lora import act_shrink, triton_lora

    monkeypatch.setattr(act_shrink, "SILU_SHRINK", True)
    monkeypatch.setattr(triton_lora, "ONE_ROW_BLOCK_N", one_row)
    taken = []
    real = act_shrink.shrink_ahead
    monkeypatch.setattr(act_shrink, "shrink_ahead", lambda *a: taken.append(real(*a)) or taken[-1])
    refs = adapter_refs(tiny_llama_dir, tiny_adapters)
    names = [None, "attn-r4", "all-r8", "mlp-r2-rs", "ko-r16"]
    engine = gpu_engine(tiny_llama_dir, max_slots=4, max_rank=16)
    requests = make_requests(refs, names, n=6)
    captured, _ = run_capturing(engine, requests)
    assert engine.runner.graphs.num_captured > 0 and any(s is not None for s in taken), "no step took the shrink"
    assert_match_peft_alone(tiny_llama_dir, tiny_adapters, requests, names, captured)


@pytest.mark.parametrize("levers", ["pdl_lora", "silu_shrink", "silu_shrink side_expand2"])
def test_decode_levers_give_the_default_graph_decode(tiny_llama_dir, tiny_adapters, levers, monkeypatch):
    """LORAPLEX_PDL_LORA (the LoRA kernels launched with PDL), LORAPLEX_LORA_SILU_SHRINK and LORAPLEX_LORA_SIDE_EXPAND=2
    (qkv's and gate_up's delta beside the base, added by the attention and the activation): the NF4 bf16 engine's
    captured decode steps give the default's tokens, and its logits within bf16 rounding (the split-K shrinks' atomic
    adds vary h's last bits from run to run); and the float32 engine's match PEFT with each adapter alone (a delta
    lost or read too early shows there, not within bf16 rounding)."""
    from server.kernels import pdl
    from server.kernels.lora import act_shrink, lora_ops

    refs = adapter_refs(tiny_llama_dir, tiny_adapters)
    names = [None, "attn-r4", "all-r8", "mlp-r2-rs", "ko-r16"]
    results = []
    for on in (False, True):
        monkeypatch.setattr(pdl, "LORA", on and "pdl_lora" in levers)
        monkeypatch.setattr(act_shrink, "SILU_SHRINK", on and "silu_shrink" in levers)
        monkeypatch.setattr(lora_ops, "SIDE_EXPAND", 2 if on and "side_expand2" in levers else 0)
        engine = gpu_engine(tiny_llama_dir, dtype="bfloat16", quantize=True, max_slots=4, max_rank=16)
        requests = make_requests(refs, names)
        results.append((requests, run_capturing(engine, requests)[0]))
        assert engine.runner.graphs.num_captured > 0
    (default_reqs, default_logits), (lever_reqs, lever_logits) = results
    for a, b in zip(default_reqs, lever_reqs, strict=True):
        assert a.output_token_ids == b.output_token_ids
        for x, y in zip(default_logits[a.request_id], lever_logits[b.request_id], strict=True):
            torch.testing.assert_close(x, y, atol=2e-2, rtol=1e-2)
    engine = gpu_engine(tiny_llama_dir, max_slots=4, max_rank=16)
    requests = make_requests(refs, names, n=6)
    assert_match_peft_alone(tiny_llama_dir, tiny_adapters, requests, names, run_capturing(engine, requests)[0])


def test_gpu_merged_swap_restores_nf4_bit_exact(tiny_llama_dir, tiny_adapters):
    engine = gpu_engine(tiny_llama_dir, dtype="bfloat16", quantize=True, lora_mode="merged")
    refs = list(adapter_refs(tiny_llama_dir, tiny_adapters).values())
    for i in range(200):
        engine.swapper.swap((refs[i % 4].name, i), refs[i % 4].weights)
    assert not engine.swapper.is_pristine()
    engine.swapper.swap(None)
    assert engine.swapper.is_pristine()


def test_eager_prefill_queues_without_a_stream_sync(tiny_llama_dir, tiny_adapters):
    """An eager prefill step (a cached prefix, then a chunk with an adapter) sends its inputs without
    syncing the stream: a sync lets the GPU run dry while the host queues the next kernels."""
    import warnings

    refs = adapter_refs(tiny_llama_dir, tiny_adapters)
    engine = gpu_engine(tiny_llama_dir, dtype="bfloat16", quantize=True, graphs=False, max_slots=4, max_rank=16)
    prompt = list(range(3, 40))
    for tail in ([50], [51]):  # the second finds the first's blocks cached; both compile what they need
        run_capturing(engine, [Request(prompt + tail, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True),
                                       adapter=refs["all-r8"])])
    engine.add_request(Request(prompt + [52, 53], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True),
                               adapter=refs["all-r8"]))
    batch = engine.scheduler.schedule()
    assert batch.prefill and batch.prefill[0][0].num_prefix_hit_tokens == 32
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine.runner.prefill(batch.prefill)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    assert not syncs, f"{len(syncs)} syncs, at {syncs}"


def test_steps_launched_ahead_on_cuda_graphs_match_the_serial_engine_and_do_not_wait(tiny_llama_dir, tiny_adapters):
    """Async scheduling on CUDA (graph replays, device input ids, NF4): the serial engine's tokens, and each
    step ahead is launched while its predecessor still runs (a 20 ms GPU sleep in every decode step)."""
    from server.engine import overlap
    from tests.unit.test_async_scheduling import requests, run, same

    refs = adapter_refs(tiny_llama_dir, tiny_adapters)
    adapters = [None, refs["attn-r4"], refs["all-r8"], refs["ko-r16"]]
    summaries = []
    for async_scheduling in (False, True):
        engine = gpu_engine(tiny_llama_dir, dtype="bfloat16", quantize=True, max_slots=4, max_rank=16,
                            async_scheduling=async_scheduling)
        batch = requests(adapters)
        summary, ahead = run(engine, batch)
        summaries.append([summary[r.request_id] for r in batch])
        assert bool(ahead) == async_scheduling
    same(summaries[1], summaries[0])

    engine = gpu_engine(tiny_llama_dir, dtype="bfloat16", quantize=True, max_slots=4, max_rank=16)
    decode, still_running, launch_ahead = engine.runner.decode, overlap.still_running, overlap.launch_ahead
    previous, busy = [], []

    def slow_decode(*args, **kwargs):
        torch.cuda._sleep(40_000_000)  # ~20 ms of GPU time before the step's own work
        return decode(*args, **kwargs)

    def remember(launched):
        previous.append(launched)
        return still_running(launched)

    def check(*args):
        busy.append(not previous[-1].pending.copy.done.query())  # the step before has not finished
        return launch_ahead(*args)

    engine.runner.decode = slow_decode
    overlap.still_running, overlap.launch_ahead = remember, check
    try:
        run(engine, requests(adapters))
    finally:
        overlap.still_running, overlap.launch_ahead = still_running, launch_ahead
    # The first launches of a run find their step done: two on the H200 in the ninth session, three in both runs
    # of the tenth (with the LoRA side stream; a warm-up run before did not change it, so it is not first-use
    # cost; the first follows an eager prefill step, which the sleep does not slow). Every later one was busy.
    assert len(busy) >= 8 and all(busy[3:])


def test_prompts_in_tiled_lora_replays_match_peft_alone(tiny_llama_dir, tiny_adapters):
    """Prompts of 50-70 tokens with adapters join running decode rows: they ride replays of 64 rows and more through
    the tiled graphs (LoRA segments of LORA_TILE rows, cuda_graphs.lora_tiles), and every sampled row matches PEFT
    with each adapter alone."""
    from tests.unit.test_graph_prefill import assert_matches_peft, greedy, run_arrivals, sampled_logits

    refs = adapter_refs(tiny_llama_dir, tiny_adapters)
    names = ["attn-r4", None, "all-r8", "mlp-r2-rs", "ko-r16"]
    prompts = [[5, 17, 33], [40, 41], list(range(60, 110)), list(range(200, 270)), list(range(250, 307))]
    engine = gpu_engine(tiny_llama_dir, max_slots=4, max_rank=16, cuda_graph_max_rows=128)
    graphs, keys = engine.runner.graphs, []
    replay = graphs._replay
    graphs._replay = lambda key: keys.append(key) or replay(key)
    rows = sampled_logits(engine)
    requests = [greedy(p, 6, None if n is None else refs[n]) for p, n in zip(prompts, names, strict=True)]
    run_arrivals(engine, requests, {0: [0, 1], 2: [2], 3: [3, 4]})
    assert sum(1 for key in keys if key[2]) >= 2, keys
    assert_matches_peft(tiny_llama_dir, tiny_adapters, requests, names, rows, atol=1e-3)


@pytest.mark.parametrize("graphs", [True, False])
def test_decode_attention_of_64_wide_heads_matches_peft(tmp_path, graphs):
    """A Llama of 64-wide heads, which the fused decode kernel serves (rotary_attention.rotary_decode_attention: rotary,
    cache write, attention and the splits' merge in one kernel; the tiny model's 16-wide heads take the unfused
    path): prompts join running decode rows, so replays of decode rows alone and chunk graphs alternate, and every
    sampled row matches transformers on the same weights. Eager steps (graphs off) take the fused kernel too."""
    from tests.conftest import build_tiny_model
    from tests.unit.test_graph_prefill import assert_matches_peft, greedy, run_arrivals, sampled_logits

    model_dir = build_tiny_model(tmp_path / "d64", hidden_size=256, intermediate_size=256, seed=7)
    prompts = [[5, 17, 33], list(range(40, 100)), [200, 201], list(range(100, 190)), [7] * 20]
    engine = gpu_engine(model_dir, graphs=graphs, cuda_graph_max_rows=128 if graphs else 0)
    keys = []
    if graphs:
        replay = engine.runner.graphs._replay
        engine.runner.graphs._replay = lambda key: keys.append(key) or replay(key)
    rows = sampled_logits(engine)
    requests = [greedy(p, 12) for p in prompts]
    run_arrivals(engine, requests, {0: [0, 1], 3: [2], 5: [3, 4]})
    if graphs:
        assert any(key[2] for key in keys) and any(not key[2] for key in keys), keys
    assert_matches_peft(model_dir, {}, requests, [None] * len(prompts), rows, atol=1e-3)


def test_replays_filled_by_the_kernel_equal_the_torch_fill(tiny_llama_dir, tiny_adapters):
    """The same requests (prompts joining running rows: decode and chunk graphs, LoRA tiles) through graphs whose
    static inputs the fill kernel writes (triton_step_inputs, the default) and through the torch fill:
    the same tokens, and logits equal but for the order of the LoRA shrink's atomic adds."""
    from tests.unit.test_graph_prefill import greedy, run_arrivals, sampled_logits

    refs = adapter_refs(tiny_llama_dir, tiny_adapters)
    names = ["attn-r4", None, "all-r8", "mlp-r2-rs", "ko-r16"]
    prompts = [[5, 17, 33], [40, 41], list(range(60, 110)), list(range(200, 270)), [9] * 7]
    results = []
    for fill_kernel in (False, True):
        engine = gpu_engine(tiny_llama_dir, max_slots=4, max_rank=16, cuda_graph_max_rows=128)
        engine.runner.graphs.fill_kernel = fill_kernel
        rows = sampled_logits(engine)
        requests = [greedy(p, 6, None if n is None else refs[n]) for p, n in zip(prompts, names, strict=True)]
        run_arrivals(engine, requests, {0: [0, 1], 2: [2], 3: [3, 4]})
        results.append(([r.output_token_ids for r in requests], [rows[r.request_id] for r in requests]))
    assert results[0][0] == results[1][0]
    for torch_rows, kernel_rows in zip(results[0][1], results[1][1], strict=True):
        for a, b in zip(torch_rows, kernel_rows, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
