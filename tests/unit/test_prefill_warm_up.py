"""The start-up prefill warm-up (`ModelRunner.warm_up_prefill`, run on CUDA before serving) runs eager
forwards of the batch sizes a server meets, through both attention paths and the adapter kernels, and
leaves nothing behind: the KV cache is untouched and what the engine generates afterwards is the same."""

from __future__ import annotations

import torch

from server.engine.request import Request, SamplingParams
from tests.unit.engine_helpers import make_engine


def _generate(engine, prompts):
    requests = [Request(list(p), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)) for p in prompts]
    for request in requests:
        engine.add_request(request)
    while engine.has_unfinished():
        engine.step()
    return [r.output_token_ids for r in requests]


def test_warm_up_prefill_runs_every_size_and_leaves_the_cache_and_outputs_unchanged(tiny_llama_dir, monkeypatch):
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13]]
    expected = _generate(make_engine(tiny_llama_dir, kv_cache_blocks=64, lora_mode="unmerged"), prompts)
    engine = make_engine(tiny_llama_dir, kv_cache_blocks=64, lora_mode="unmerged")
    runner = engine.runner
    lengths_seen = []
    real_dummy = runner._dummy_prefill

    def recording(lengths, prefix):
        lengths_seen.append((sum(lengths), prefix))
        real_dummy(lengths, prefix)

    monkeypatch.setattr(runner, "_dummy_prefill", recording)
    lora_calls = []
    real_lora = runner._prefill_lora
    monkeypatch.setattr(runner, "_prefill_lora", lambda segments: lora_calls.append(segments) or real_lora(segments))
    before = [t.clone() for t in engine.kv_cache.layer_caches()[0]]
    assert runner.warm_up_prefill(1500) == 7
    # 512, 1,024 and 1,500 tokens (as many whole prompts as fit), each fresh and after a cached prefix; then two
    # fresh prompts of different lengths.
    length = min(128, runner.max_blocks * runner.block_size - runner.block_size)
    assert lengths_seen == [(length * (total // length), prefix) for total in (512, 1024, 1500)
                            for prefix in (0, runner.block_size)] + [(length + length // 2, 0)]
    assert all(segments and all(slot == 0 for _, _, slot in segments) for segments in lora_calls)
    assert all(torch.equal(a, b) for a, b in zip(before, engine.kv_cache.layer_caches()[0], strict=True))
    assert _generate(engine, prompts) == expected
