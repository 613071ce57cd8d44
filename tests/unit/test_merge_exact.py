"""Merged hot-swap on an NF4 base never drifts: after 1,000 random swaps, the base is bit-identical."""

from __future__ import annotations

import random
import time

import pytest
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


def _record_loads(monkeypatch) -> list[tuple[int, bool]]:
    """From now on, (id of the NF4Linear, derive) of every load_state_tensors call, in order."""
    calls: list[tuple[int, bool]] = []
    original = NF4Linear.load_state_tensors

    def recording(self, tensors, derive=True):
        calls.append((id(self), derive))
        return original(self, tensors, derive=derive)

    monkeypatch.setattr(NF4Linear, "load_state_tensors", recording)
    return calls


def test_a_swap_leaves_every_layer_with_fresh_forward_copies(tiny_llama_dir, tiny_adapters, monkeypatch):
    """A layer restored and then requantized in the same swap skips the restore's rebuild of its forward copies
    (NF4 absmax_f and tile layout, on CUDA); the last load of every layer a swap touches must still rebuild them."""
    loaded = load_tiny(tiny_llama_dir, quantize=True)
    refs = adapter_refs(tiny_llama_dir, tiny_adapters)
    swapper = MergedSwapper(loaded.model)
    calls = _record_loads(monkeypatch)
    skipped = 0
    for key in ("all-r8", "attn-r4", "ko-r16", None, "mlp-r2-rs", None):
        calls.clear()
        swapper.swap(None if key is None else (key, 1), None if key is None else refs[key].weights)
        last = {}
        for layer, derive in calls:
            last[layer] = derive
        skipped += sum(not derive for _, derive in calls)
        assert all(last.values()), key  # no layer ends a swap with stale forward copies
    assert skipped > 0  # the restores of requantized layers really skipped the rebuild
    assert swapper.is_pristine()


def test_a_swap_that_fails_midway_leaves_the_next_swap_a_full_restore(tiny_llama_dir, tiny_adapters, monkeypatch):
    """A layer restored without its forward copies stays dirty until requantized: if the swap fails in between,
    the next swap restores it whole."""
    loaded = load_tiny(tiny_llama_dir, quantize=True)
    refs = adapter_refs(tiny_llama_dir, tiny_adapters)
    swapper = MergedSwapper(loaded.model)
    swapper.swap(("all-r8", 1), refs["all-r8"].weights)
    ko = refs["ko-r16"].weights
    failing = next(linear for layer, linear in swapper._linears if linear.targets(layer, ko))
    monkeypatch.setattr(failing, "add_delta_", lambda *args: (_ for _ in ()).throw(RuntimeError("out of memory")))
    with pytest.raises(RuntimeError, match="out of memory"):
        swapper.swap(("ko-r16", 1), ko)
    monkeypatch.undo()
    calls = _record_loads(monkeypatch)
    swapper.swap(None)
    assert (id(failing.base), True) in calls  # restored whole, forward copies rebuilt
    assert swapper.is_pristine()


def test_requantizing_without_bitsandbytes_table_build_gives_its_bits(monkeypatch):
    """load_weight's quantization (no per-call code table, so no host sync on CUDA) equals quantize_4bit's."""
    import bitsandbytes.functional as bnb_functional

    from server.model import quant

    torch.manual_seed(0)
    for shape, dtype in (((96, 128), torch.float32), ((64, 320), torch.bfloat16)):
        weight = torch.randn(shape) * torch.rand(shape[0], 1) * 3
        codes, state = quant._quantize(weight, dtype)
        want = quant._state_tensors(codes, state)
        monkeypatch.setattr(bnb_functional, "get_4bit_type", lambda *a, **k: pytest.fail("the table was built"))
        got = quant._quantized_state_tensors(weight, dtype)
        monkeypatch.undo()
        assert set(got) == set(want)
        for name, tensor in want.items():
            assert torch.equal(got[name], tensor), name
