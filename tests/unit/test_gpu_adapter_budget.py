"""GPU adapter memory from a byte budget: a pool of rank units that never takes more bytes than the budget,
where mixed ranks do not each pay for max_rank."""

from __future__ import annotations

import pytest
import torch

from server.engine.rank_pool import block_size
from server.model.lora import LoraSlots, max_adapter_rank
from tests.unit.engine_helpers import load_tiny, make_engine
from tests.unit.test_continuous_batching import PROMPTS, greedy, run_alone
from tests.unit.test_mixed_batch_oracle import adapter_refs


def _per_unit(model_dir) -> int:
    return LoraSlots.rank_nbytes(load_tiny(model_dir).model)


def test_budget_sizes_the_pool_and_is_never_exceeded(tiny_llama_dir):
    per_unit = _per_unit(tiny_llama_dir)
    budget = 50 * per_unit + per_unit // 2
    engine = make_engine(tiny_llama_dir, kv_cache_blocks=64, max_rank=16, adapter_gpu_memory_bytes=budget)
    assert engine.slot_table.pool.capacity == 50
    assert engine.lora_slots.nbytes == 50 * per_unit <= budget
    assert engine.num_slots == 3  # adapters of max_rank 16 that fit: reported as max_lora


def test_without_a_budget_max_slots_of_max_rank_decide(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, kv_cache_blocks=64, max_rank=16, max_slots=5)
    assert engine.slot_table.pool.capacity == 80
    assert engine.lora_slots.nbytes == 80 * _per_unit(tiny_llama_dir)


def test_budget_below_one_adapter_of_max_rank_is_refused_with_the_numbers(tiny_llama_dir):
    with pytest.raises(ValueError, match="holds no adapter of max_rank 16"):
        make_engine(tiny_llama_dir, kv_cache_blocks=64, max_rank=16, adapter_gpu_memory_bytes=1000)


def test_mixed_ranks_share_the_pool_unpadded_and_stay_exact(tiny_llama_dir, tiny_adapters):
    """A 32-unit pool with max_rank 16 would hold two padded slots; it holds all four adapters (ranks 4, 8, 2,
    16: blocks of 8, 8, 8 and 16) at once, and each request's tokens equal its adapter run alone."""
    refs = adapter_refs(tiny_llama_dir, tiny_adapters)
    per_unit = _per_unit(tiny_llama_dir)
    engine = make_engine(tiny_llama_dir, kv_cache_blocks=128, max_rank=16, adapter_gpu_memory_bytes=40 * per_unit)
    assert engine.slot_table.pool.capacity == 40
    requests = [greedy(PROMPTS[i], 6, ref) for i, ref in enumerate(refs.values())]
    for r in requests:
        engine.add_request(r)
    engine.step()
    assert len({r.adapter_key for r in engine.scheduler.running}) == 4  # all four in one batch
    assert sum(block_size(max_adapter_rank(r.adapter.weights)) for r in requests) == 40
    assert engine.slot_table.pool.used == 40 and engine.lora_slots.nbytes == 40 * per_unit
    while engine.has_unfinished():
        engine.step()
    for i, (r, ref) in enumerate(zip(requests, refs.values(), strict=True)):
        assert r.output_token_ids == run_alone(tiny_llama_dir, greedy(PROMPTS[i], 6, ref)), ref.name


def test_a_half_precision_adapter_fills_the_pool_exactly_as_its_float32_values_do(tiny_llama_dir, tiny_adapters):
    """Adapters keep the file's dtype until the device: an fp16 file and the same values in float32 give the
    same bf16 pool contents (B is scaled in float32 either way and rounded once into the slot; casting the
    fp16 values to bf16 before scaling would round twice)."""
    from dataclasses import replace

    weights = adapter_refs(tiny_llama_dir, tiny_adapters)["all-r8"].weights
    weights = replace(weights, scaling=0.3)  # a scale that does not keep bf16 values exact
    as_f16 = replace(weights, tensors={k: (a.half(), b.half()) for k, (a, b) in weights.tensors.items()})
    as_f32 = replace(weights, tensors={k: (a.float(), b.float()) for k, (a, b) in as_f16.tensors.items()})
    pools = []
    for w in (as_f16, as_f32):
        model = load_tiny(tiny_llama_dir, dtype=torch.bfloat16).model
        LoraSlots(model, 16, 16, num_slots=2).load(1, 8, w)
        pools.append([(lin.lora_a.clone(), lin.lora_b.clone()) for _, lin in model.lora_linears()])
    for (a1, b1), (a2, b2) in zip(*pools, strict=True):
        assert torch.equal(a1, a2) and torch.equal(b1, b2)
    layer, linear = load_tiny(tiny_llama_dir, dtype=torch.bfloat16).model.lora_linears()[0]
    _, b = as_f16.tensors[layer, linear.slice_names[0]]  # [out_0, 8]
    width = linear.slice_offsets[1]
    expected = (b.float() * 0.3).t().to(torch.bfloat16)  # one rounding, from float32
    assert torch.equal(pools[0][0][1][8:16, :width], expected)


@pytest.mark.parametrize("model_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("file_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("in_pages", [False, True])
def test_batched_slot_load_fills_the_pool_as_the_per_linear_reference_does(tiny_llama_dir, tiny_adapters,
                                                                          model_dtype, file_dtype, in_pages):
    """`LoraSlots.load` (a handful of foreach calls for the whole adapter, its tensors possibly packed in
    the CPU tier's pages) leaves every pool exactly as `LoraLinear.load_slot`, linear by linear, does:
    zeros around the adapter, A copied, B scaled in float32 and rounded once, over a slot that held
    another adapter before."""
    from dataclasses import replace

    from server.pinned_pages import pin_packed

    refs = adapter_refs(tiny_llama_dir, tiny_adapters)
    pools = []
    for batched in (True, False):
        model = load_tiny(tiny_llama_dir, dtype=model_dtype).model
        slots = LoraSlots(model, 32, 16, num_slots=3)
        for name, offset in (("all-r8", 8), ("mlp-r2-rs", 8), ("ko-r16", 16)):  # mlp-r2-rs overwrites all-r8
            weights = refs[name].weights
            cast = {k: (a.to(file_dtype), b.to(file_dtype)) for k, (a, b) in weights.tensors.items()}
            weights = replace(weights, scaling=0.3 + offset / 100, tensors=cast)
            if in_pages:
                weights = replace(weights, tensors=pin_packed(weights.tensors,
                                                              lambda n: torch.empty(n, dtype=torch.uint8))[0])
            rank = max_adapter_rank(weights)
            if batched:
                slots.load(1, offset, weights)
            else:
                for layer, linear in model.lora_linears():
                    linear.load_slot(offset, rank, layer, weights)
        pools.append([(lin.lora_a.clone(), lin.lora_b.clone()) for _, lin in model.lora_linears()])
    for (a1, b1), (a2, b2) in zip(*pools, strict=True):
        assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert any(b.abs().sum() > 0 for _, b in pools[0])


def test_adapter_tensors_cross_to_the_device_as_the_spans_they_occupy():
    """`lora_staging.on_staging` (what `tensors_to_device` does on CUDA) copies the host memory the tensors
    occupy into one staging buffer, the tensors of a buffer merged into spans where they touch (pages packed by
    `pin_packed`; views scattered through one large slab, as the CPU tier's pages are: not the whole
    slab), and gives back equal tensors as views of it, a transposed (non-contiguous) one included, each
    at its host address's alignment modulo 256."""
    from server.model.lora_staging import on_staging
    from server.pinned_pages import PAGE_BYTES, pin_packed

    gen = torch.Generator().manual_seed(0)
    tensors = {(i, "q_proj"): (torch.randn(8, 300, generator=gen).to(torch.bfloat16),
                               torch.randn(500, 8, generator=gen)) for i in range(40)}
    packed, pinned = pin_packed(tensors, lambda n: torch.empty(n, dtype=torch.uint8))
    packed[(99, "o_proj")] = (torch.randn(300, 8, generator=gen).t(), torch.randn(4, 4, generator=gen))
    slab = torch.zeros(64 * PAGE_BYTES, dtype=torch.uint8)  # two tensors far apart in one large buffer
    for name, page, tensor in (("k_proj", 3, torch.randn(16, 64, generator=gen)),
                               ("v_proj", 60, torch.randn(64, 16, generator=gen))):
        view = slab[page * PAGE_BYTES + 512 : page * PAGE_BYTES + 512 + tensor.numel() * 4].view(torch.float32)
        view.copy_(tensor.reshape(-1))
        packed[(7, name)] = (view.view(tensor.shape), tensor.clone())
    moved = on_staging(packed, torch.device("cpu"))
    (staging,) = {t.untyped_storage().data_ptr(): t.untyped_storage() for p in moved.values() for t in p}.values()
    for key, pair in packed.items():
        for original, new in zip(pair, moved[key], strict=True):
            assert (new.dtype, new.shape, new.stride()) == (original.dtype, original.shape, original.stride())
            assert torch.equal(new, original) and new.data_ptr() != original.data_ptr()
            host_at = original.data_ptr() - original.untyped_storage().data_ptr()
            assert (new.data_ptr() - staging.data_ptr()) % 256 == host_at % 256
    occupied = sum(t.numel() * t.element_size() for pair in packed.values() for t in pair)
    num_spans = len(packed) * 2  # at most one span a tensor, each placed on its own 256-byte line at most
    assert occupied <= staging.nbytes() <= occupied + 256 * (num_spans + 1)
    assert staging.nbytes() < slab.numel() // 16 and pinned % PAGE_BYTES == 0


def test_a_budget_holds_the_flat_pool_with_its_alignment_padding_on_odd_shapes():
    """The pools are views of one flat buffer, each starting 64-element aligned: with widths that are not
    multiples of 64 that adds padding, and the unit count leaves room for it within the budget."""
    from types import SimpleNamespace

    from server.engine.setup import adapter_pool_units
    from server.model.lora import LoraLinear

    class Model:
        dtype, device = torch.float32, torch.device("cpu")

        def __init__(self):
            self.linears = [(layer, LoraLinear(torch.nn.Linear(40, 1), ("q_proj", "v_proj"), [40, 24]))
                            for layer in range(3)]

        def lora_linears(self):
            return self.linears

    model = Model()
    per_unit = LoraSlots.rank_nbytes(model)
    padded = []
    for budget in (20 * per_unit, 20 * per_unit + 100, 37 * per_unit, 37 * per_unit + per_unit // 2):
        settings = SimpleNamespace(adapter_gpu_memory_bytes=budget, max_rank=8, max_slots=1)
        units = adapter_pool_units(model, settings)
        assert LoraSlots(model, units, 8, num_slots=2).nbytes <= budget < LoraSlots.pool_nbytes(model, units + 1)
        padded.append(LoraSlots.pool_nbytes(model, units) > units * per_unit)
    assert any(padded) and not all(padded)  # some capacities pad on these widths, some do not
