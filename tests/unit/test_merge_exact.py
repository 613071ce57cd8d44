"""Merged hot-swap on an NF4 base never drifts: after 1,000 random swaps, the base is bit-identical."""

from __future__ import annotations

import random
import time

import torch

from server.model.merge import MergedSwapper
from server.model.quant import NF4Linear
from tests.unit.engine_helpers import attach_cache, load_tiny, prefill_logits
from tests.unit.test_mixed_batch_oracle import adapter_refs

PROMPT = [5, 17, 33, 100, 7, 9, 250, 3]


def test_thousand_swaps_restore_nf4_codes_and_absmax_bit_for_bit(tiny_llama_dir, tiny_adapters):
    loaded = load_tiny(tiny_llama_dir, quantize=True)
    model = loaded.model
    assert all(isinstance(lin.base, NF4Linear) for _, lin in model.lora_linears())
    original = [{k: t.clone() for k, t in lin.base.state_tensors().items()} for _, lin in model.lora_linears()]
    assert {"codes", "absmax", "absmax2", "offset"} <= set(original[0])
    refs = list(adapter_refs(tiny_llama_dir, tiny_adapters).values())
    swapper = MergedSwapper(model)
    rng = random.Random(0)
    changed_once = False
    start = time.perf_counter()
    for i in range(1000):
        ref = rng.choice(refs)
        swapper.swap((ref.name, i), ref.weights)  # a fresh key each time: always a real swap
        if i == 0:
            changed_once = not swapper.is_pristine()
    elapsed = time.perf_counter() - start
    assert changed_once  # merging really modified the NF4 codes
    swapper.swap(None)
    for (_, lin), saved in zip(model.lora_linears(), original, strict=True):
        for name, live in lin.base.state_tensors().items():
            assert torch.equal(live, saved[name]), name
    print(f"1000 NF4 swaps on the tiny model: {elapsed * 1e3 / 1000:.2f} ms/swap")


def test_merged_logits_follow_the_adapter_and_return_to_base(tiny_llama_dir, tiny_adapters):
    loaded = load_tiny(tiny_llama_dir, quantize=True)
    model = loaded.model
    cache = attach_cache(model)
    base_logits, blocks = prefill_logits(model, cache, PROMPT)
    cache.free(blocks)
    ref = adapter_refs(tiny_llama_dir, tiny_adapters)["all-r8"]
    swapper = MergedSwapper(model)
    swapper.swap(("all-r8", 1), ref.weights)
    merged_logits, blocks = prefill_logits(model, cache, PROMPT)
    cache.free(blocks)
    assert (merged_logits - base_logits).abs().max() > 1e-2
    swapper.swap(None)
    again, _ = prefill_logits(model, cache, PROMPT)
    assert torch.equal(again, base_logits)


def test_dense_base_swap_is_exact_too(tiny_llama_dir, tiny_adapters):
    loaded = load_tiny(tiny_llama_dir, quantize=False, dtype=torch.bfloat16)
    model = loaded.model
    before = [lin.base.weight.clone() for _, lin in model.lora_linears()]
    refs = list(adapter_refs(tiny_llama_dir, tiny_adapters).values())
    swapper = MergedSwapper(model)
    for i in range(50):
        swapper.swap((refs[i % len(refs)].name, i), refs[i % len(refs)].weights)
    swapper.swap(None)
    assert all(torch.equal(lin.base.weight, b) for (_, lin), b in zip(model.lora_linears(), before, strict=True))
