"""The heart of the suite: a batch mixing the base model and several adapters (different ranks and
target modules) gives, row by row, the logits PEFT gives with that adapter alone."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from adapters_store import BaseModelSpec, load_adapter_dir
from server.engine.auto_mode import AutoModePolicy
from server.engine.request import AdapterRef, Request, SamplingParams
from tests.unit.engine_helpers import make_engine

PROMPTS = [
    [5, 17, 33, 100, 7, 9, 250, 3],
    [44, 55, 66, 77, 88, 99, 11, 12, 13, 14, 15],
    [200, 201, 202],
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13],
    [300, 30, 3, 31, 301, 32],
]
NEW_TOKENS = 6


def adapter_refs(model_dir, adapter_dirs, max_rank=16):
    from transformers import AutoConfig

    spec = BaseModelSpec.from_hf_config(AutoConfig.from_pretrained(model_dir))
    return {
        name: AdapterRef(name=name, version=1, weights=load_adapter_dir(path, spec, max_rank))
        for name, path in adapter_dirs.items()
    }


def capture_sampled(engine, captured: dict[str, list[torch.Tensor]]) -> None:
    """From now on, append to captured[request_id] the logits row each of its tokens is sampled from
    (whichever forward produced it: eager prefill, decode, or a graph replay of both)."""
    if not hasattr(engine, "_unwrapped_sample"):
        engine._unwrapped_sample = engine.sampler.sample_async
    sample = engine._unwrapped_sample

    def capturing(logits, requests):
        for row, request in enumerate(requests):
            # a copy (graph buffers are reused), in float32 like the references (decode hands over bf16 on a GPU)
            captured.setdefault(request.request_id, []).append(logits[row].to(torch.float32, copy=True))
        return sample(logits, requests)

    engine.sampler.sample_async = capturing


def run_capturing(engine, requests):
    """Run requests to completion; return request_id -> list of logits rows (one per sampled token)."""
    captured: dict[str, list[torch.Tensor]] = {r.request_id: [] for r in requests}
    capture_sampled(engine, captured)
    for r in requests:
        engine.add_request(r)
    distinct_per_step = []
    while engine.has_unfinished():
        distinct_per_step.append(len({r.adapter_key for r in engine.scheduler.running}))
        engine.step()
    return captured, distinct_per_step


def peft_logits(model_dir, adapter_dir, token_ids):
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = base if adapter_dir is None else PeftModel.from_pretrained(base, adapter_dir)
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0]


@pytest.mark.parametrize("mode", ["unmerged", "merged", "auto"])
def test_mixed_batch_matches_peft_alone(mode, tiny_llama_dir, tiny_adapters):
    refs = adapter_refs(tiny_llama_dir, tiny_adapters)
    names = [None, "attn-r4", "all-r8", "mlp-r2-rs", "ko-r16"]
    engine = make_engine(tiny_llama_dir, lora_mode=mode, max_slots=4, max_rank=16, kv_cache_blocks=128)
    requests = [
        Request(list(p), SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True),
                adapter=None if n is None else refs[n])
        for p, n in zip(PROMPTS, names, strict=True)
    ]
    captured, distinct = run_capturing(engine, requests)
    if mode == "merged":
        assert max(distinct) == 1  # merged: one adapter at a time
    else:
        assert max(distinct) == 5  # base + 4 adapters really ran in one batch (auto: mixed traffic)
    for request, name in zip(requests, names, strict=True):
        full = request.prompt_token_ids + request.output_token_ids
        reference = peft_logits(tiny_llama_dir, None if name is None else tiny_adapters[name], full)
        rows = captured[request.request_id]
        assert len(rows) == NEW_TOKENS
        start = len(request.prompt_token_ids) - 1
        for step, row in enumerate(rows):
            torch.testing.assert_close(row, reference[start + step], atol=2e-4, rtol=2e-4,
                                       msg=f"{mode} {name} step {step}")


def test_adapters_really_change_outputs(tiny_llama_dir, tiny_adapters):
    """Guard against a vacuous oracle: each adapter's logits differ from the base and from each other."""
    prompt = PROMPTS[0]
    base = peft_logits(tiny_llama_dir, None, prompt)
    seen = [base]
    for path in tiny_adapters.values():
        logits = peft_logits(tiny_llama_dir, path, prompt)
        for other in seen:
            assert (logits - other).abs().max() > 1e-2
        seen.append(logits)


def test_nf4_mixed_batch_matches_each_adapter_alone(tiny_llama_dir, tiny_adapters):
    """On an NF4 base, the mixed batch equals our own engine running each adapter alone."""
    refs = adapter_refs(tiny_llama_dir, tiny_adapters)
    names = [None, "attn-r4", "all-r8", "mlp-r2-rs", "ko-r16"]

    def make_requests(subset):
        return [
            Request(list(PROMPTS[i]), SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True),
                    adapter=None if names[i] is None else refs[names[i]])
            for i in subset
        ]

    mixed_engine = make_engine(tiny_llama_dir, quantization="nf4", max_slots=4, max_rank=16, kv_cache_blocks=128)
    mixed = make_requests(range(5))
    mixed_logits, _ = run_capturing(mixed_engine, mixed)
    for i in range(5):
        alone_engine = make_engine(tiny_llama_dir, quantization="nf4", max_slots=4, max_rank=16,
                                   kv_cache_blocks=128)
        (alone,) = make_requests([i])
        alone_logits, _ = run_capturing(alone_engine, [alone])
        assert alone.output_token_ids == mixed[i].output_token_ids
        for a, b in zip(alone_logits[alone.request_id], mixed_logits[mixed[i].request_id], strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_auto_mode_merges_when_one_adapter_dominates(tiny_llama_dir, tiny_adapters):
    refs = adapter_refs(tiny_llama_dir, tiny_adapters)
    engine = make_engine(tiny_llama_dir, lora_mode="auto", max_slots=4, max_rank=16, kv_cache_blocks=128)
    # Fixed costs (2 ms saved a step, 1 ms a swap): the decision does not depend on this machine's timings.
    engine.auto_policy = AutoModePolicy(unmerged_step_s=0.006, merged_step_s=0.004, swap_s=0.001)
    engine.auto_policy.record_step = lambda merged, seconds, rows=0: None
    engine.auto_policy.record_swap = lambda seconds: None
    requests = [
        Request(list(p), SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True),
                adapter=refs["all-r8"])
        for p in PROMPTS[:3]
    ]
    captured, _ = run_capturing(engine, requests)
    assert engine.merged_active and engine.swapper.current == ("all-r8", 1)
    assert engine.slot_table.num_loads == 0  # served merged, no slot was used
    for request in requests:
        full = request.prompt_token_ids + request.output_token_ids
        reference = peft_logits(tiny_llama_dir, tiny_adapters["all-r8"], full)
        start = len(request.prompt_token_ids) - 1
        for step, row in enumerate(captured[request.request_id]):
            torch.testing.assert_close(row, reference[start + step], atol=2e-4, rtol=2e-4)
    # Mixed traffic afterwards switches back to unmerged and restores the pristine base.
    mixed = [Request(list(PROMPTS[0]), SamplingParams(max_tokens=2, temperature=0), adapter=refs[n])
             for n in ("attn-r4", "ko-r16")]
    run_capturing(engine, mixed)
    assert not engine.merged_active and engine.swapper.current is None and engine.swapper.is_pristine()
