"""Slot images: an adapter laid out as its pool block on the loader thread, so a slot load is only copies.

The reference is the per-tensor load the image replaced, written out here: zero the slot, then per
slice copy A (cast) and B scaled in float32, transposed, rounded once."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from adapters_store import weights_nbytes
from server.model.lora import LoraSlots
from server.model.slot_image import SlotImage, adapter_rank, build_slot_image, linear_specs
from tests.unit.engine_helpers import load_tiny, make_engine
from tests.unit.test_mixed_batch_oracle import adapter_refs


def reference_fill(model, offset: int, adapter) -> None:
    """What loading `adapter` at `offset` must leave in every pool."""
    rank = adapter_rank(adapter)
    for layer, linear in model.lora_linears():
        n = len(linear.slice_names)
        a_slot, b_slot = linear.lora_a[n * offset : n * (offset + rank)], linear.lora_b[offset : offset + rank]
        a_slot.zero_()
        b_slot.zero_()
        for i, name in enumerate(linear.slice_names):
            pair = adapter.tensors.get((layer, name))
            if pair is None:
                continue
            a, b = pair
            lo, hi = linear.slice_offsets[i], linear.slice_offsets[i + 1]
            a_slot[i * rank : i * rank + a.shape[0]].copy_(a)
            b_slot[: a.shape[0], lo:hi].copy_((b.float() * adapter.scaling).t())


def uneven(weights, generator):
    """The adapter with random values, one slice of each layer at a smaller rank and one dropped."""
    tensors = {}
    for index, ((layer, name), (a, b)) in enumerate(sorted(weights.tensors.items())):
        if index % 5 == 3:
            continue  # not targeted
        r = a.shape[0] if index % 5 != 1 else max(1, a.shape[0] // 2)
        tensors[layer, name] = (torch.randn(r, a.shape[1], generator=generator).to(a.dtype),
                                torch.randn(b.shape[0], r, generator=generator).to(b.dtype))
    return replace(weights, tensors=tensors, scaling=0.37)


@pytest.mark.parametrize("file_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_slot_loaded_from_its_image_equals_the_per_tensor_load(tiny_llama_dir, tiny_adapters, file_dtype):
    generator = torch.Generator().manual_seed(7)
    refs = adapter_refs(tiny_llama_dir, tiny_adapters)
    pools = {}
    for how in ("reference", "image"):
        model = load_tiny(tiny_llama_dir, dtype=torch.bfloat16).model
        slots = LoraSlots(model, 64, 16, num_slots=4)
        for _, linear in model.lora_linears():  # NaN everywhere first: every unit a load owns must be written
            linear.lora_a.fill_(float("nan"))
            linear.lora_b.fill_(float("nan"))
        generator.manual_seed(7)
        for offset, name in ((0, "all-r8"), (16, "ko-r16"), (32, "attn-r4")):
            weights = refs[name].weights
            weights = uneven(replace(weights, tensors={k: (a.to(file_dtype), b.to(file_dtype))
                                                       for k, (a, b) in weights.tensors.items()}), generator)
            if how == "reference":
                reference_fill(model, offset, weights)
            else:
                slots.prepare(weights)
                assert isinstance(weights.slot_image, SlotImage)
                slots.load(1, offset, weights)
        pools[how] = [(lin.lora_a.clone(), lin.lora_b.clone()) for _, lin in model.lora_linears()]
    for (a1, b1), (a2, b2) in zip(pools["reference"], pools["image"], strict=True):
        assert torch.equal(a1.nan_to_num(7.0), a2.nan_to_num(7.0)) and torch.equal(b1.nan_to_num(7.0),
                                                                                   b2.nan_to_num(7.0))


def test_an_image_made_ahead_is_used_as_is_and_one_for_another_model_is_not(tiny_llama_dir, tiny_adapters):
    weights = adapter_refs(tiny_llama_dir, tiny_adapters)["all-r8"].weights
    model = load_tiny(tiny_llama_dir, dtype=torch.bfloat16).model
    slots = LoraSlots(model, 16, 16, num_slots=2)
    slots.prepare(weights)
    assert slots._image(weights) is weights.slot_image
    assert weights.slot_image.nbytes == adapter_rank(weights) * slots.unit_nbytes  # targets every linear
    other = replace(weights, slot_image=build_slot_image(linear_specs(model)[:-1], weights, torch.bfloat16, False))
    assert slots._image(other) is not other.slot_image  # made for other linears: rebuilt
    as_f32 = replace(weights, slot_image=build_slot_image(slots.specs, weights, torch.float32, False))
    assert slots._image(as_f32).dtype == torch.bfloat16


def test_the_adapter_tier_prepares_images_on_its_own_thread_and_counts_their_bytes(tiny_llama_dir, tiny_adapters,
                                                                                   tmp_path):
    """The engine's hook runs where the registry reads the adapter (not on the engine's thread), and the CPU
    tier's byte budget counts the image beside the parsed tensors."""
    import threading

    from transformers import AutoConfig

    from adapters_store import AdapterStore, BaseModelSpec
    from server.registry import AdapterRegistry

    engine = make_engine(tiny_llama_dir, max_slots=4, max_rank=16, kv_cache_blocks=64)
    spec = BaseModelSpec.from_hf_config(AutoConfig.from_pretrained(tiny_llama_dir))
    store = AdapterStore(tmp_path / "store", spec, max_rank=16, max_bytes=1 << 26)
    store.put_dir("all-r8", tiny_adapters["all-r8"])
    threads = []

    def prepare(weights):
        threads.append(threading.current_thread())
        engine.prepare_adapter(weights)

    registry = AdapterRegistry(store)
    registry.prepare = prepare
    ref = registry.resolve("all-r8")
    assert threads == [threading.current_thread()] and isinstance(ref.weights.slot_image, SlotImage)
    raw = sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in ref.weights.tensors.values())
    assert registry.nbytes == weights_nbytes(ref.weights) == raw + ref.weights.slot_image.nbytes
