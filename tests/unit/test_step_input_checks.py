"""LORAPLEX_CHECK_STEP_INPUTS: a step's indices are checked on the host and the bad one is named (a CUDA
device-side assert names nothing)."""

from __future__ import annotations

import pytest

from tests.unit.engine_helpers import make_engine
from tests.unit.test_continuous_batching import PROMPTS, greedy
from tests.unit.test_mixed_batch_oracle import adapter_refs


def test_checked_steps_pass_and_a_bad_block_id_is_named(tiny_llama_dir, tiny_adapters, monkeypatch):
    monkeypatch.setattr("server.engine.runner.CHECK_STEP_INPUTS", True)
    refs = adapter_refs(tiny_llama_dir, tiny_adapters)
    engine = make_engine(tiny_llama_dir, kv_cache_blocks=64, max_slots=2, max_rank=16)
    request = greedy(PROMPTS[1], 8, refs["all-r8"])
    engine.add_request(request)
    engine.step()  # a checked prefill
    engine.step()  # a checked decode
    assert len(request.output_token_ids) == 2
    request.block_ids[0] = engine.kv_cache.num_blocks  # one past the end
    with pytest.raises(RuntimeError, match=r"decode step: block id 64 outside \[0, 64\)"):
        engine.runner.decode_rows([request], 1)
    request.block_ids[0] = 0
    request.slot = 99
    with pytest.raises(RuntimeError, match=r"LoRA slot 99 outside \[-1, "):
        engine.runner.decode_rows([request], 1)
