"""GPU adapter memory from a byte budget: as many max_rank slots as fit, never more bytes than the budget."""

from __future__ import annotations

import pytest

from server.model.lora import LoraSlots
from tests.unit.engine_helpers import load_tiny, make_engine


def _per_slot(model_dir, max_rank=16) -> int:
    return LoraSlots.slot_nbytes(load_tiny(model_dir).model, max_rank)


def test_budget_sizes_the_slots_and_is_never_exceeded(tiny_llama_dir):
    per_slot = _per_slot(tiny_llama_dir)
    budget = int(3.5 * per_slot)
    engine = make_engine(tiny_llama_dir, kv_cache_blocks=64, max_rank=16, adapter_gpu_memory_bytes=budget)
    assert engine.num_slots == 3 and engine.slot_table.max_slots == 3
    assert engine.lora_slots.nbytes == 3 * per_slot <= budget


def test_without_a_budget_max_slots_decides(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, kv_cache_blocks=64, max_rank=16, max_slots=5)
    assert engine.num_slots == 5 and engine.lora_slots.nbytes == 5 * _per_slot(tiny_llama_dir)


def test_budget_below_one_slot_is_refused_with_the_numbers(tiny_llama_dir):
    with pytest.raises(ValueError, match="holds no adapter slot"):
        make_engine(tiny_llama_dir, kv_cache_blocks=64, max_rank=16, adapter_gpu_memory_bytes=1000)
