"""Fair scheduling inside the real engine: merged mode swaps to the adapter of the request fair
scheduling admits next."""

from __future__ import annotations

from tests.unit.engine_helpers import make_engine
from tests.unit.test_continuous_batching import PROMPTS, greedy
from tests.unit.test_mixed_batch_oracle import adapter_refs


def test_merged_mode_swaps_to_the_fair_head_of_the_queue(tiny_llama_dir, tiny_adapters):
    """Merged mode admits one adapter at a time; the next swap goes to the request fair scheduling picks,
    so a light tenant's adapter is merged after one heavy request, not after the heavy tenant's whole queue."""
    refs = adapter_refs(tiny_llama_dir, tiny_adapters)
    engine = make_engine(tiny_llama_dir, kv_cache_blocks=128, lora_mode="merged", max_batch_size=2)
    heavy = [greedy(PROMPTS[0], 4, refs["attn-r4"]) for _ in range(6)]
    for request in heavy:
        request.tenant = "heavy"
        engine.add_request(request)
    light = greedy(PROMPTS[1], 4, refs["ko-r16"])
    light.tenant = "light"
    engine.add_request(light)
    order = []
    while engine.has_unfinished():
        for output in engine.step():
            if output.finished:
                order.append("light" if output.request_id == light.request_id else "heavy")
    assert order.index("light") <= 2  # FCFS would finish it last, after all six heavy requests
    assert order.count("heavy") == 6
