"""Our forward equals transformers on the same unquantized weights: prefill and step-by-step decode."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.engine.request import Request, SamplingParams
from tests.unit.engine_helpers import attach_cache, load_tiny, make_engine, prefill_logits

PROMPT = [5, 17, 33, 100, 7, 9, 250, 3, 2, 1, 0, 44, 55, 66, 77, 88, 99, 11, 12, 13]


@pytest.fixture(params=["llama", "qwen2"])
def model_dir(request, tiny_llama_dir, tiny_qwen2_dir):
    return tiny_llama_dir if request.param == "llama" else tiny_qwen2_dir


def hf_logits(model_dir, token_ids):
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return hf(torch.tensor([token_ids])).logits[0]


def test_prefill_logits_match_transformers(model_dir):
    loaded = load_tiny(model_dir)
    cache = attach_cache(loaded.model)
    ours, _ = prefill_logits(loaded.model, cache, PROMPT)
    torch.testing.assert_close(ours, hf_logits(model_dir, PROMPT), atol=1e-4, rtol=1e-4)


def test_decode_logits_match_transformers_step_by_step(model_dir):
    engine = make_engine(model_dir, kv_cache_blocks=64)
    captured = []
    prefill, decode = engine.runner.prefill, engine.runner.decode
    engine.runner.prefill = lambda chunks: captured.append(prefill(chunks)) or captured[-1]
    engine.runner.decode = lambda reqs, **kw: captured.append(decode(reqs, **kw)) or captured[-1]
    request = Request(list(PROMPT), SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    engine.add_request(request)
    while engine.has_unfinished():
        engine.step()
    full = request.prompt_token_ids + request.output_token_ids
    reference = hf_logits(model_dir, full)
    assert len(captured) == 12
    for step, logits in enumerate(captured):
        torch.testing.assert_close(logits[0], reference[len(PROMPT) - 1 + step], atol=1e-4, rtol=1e-4)


def test_chunked_prefill_matches_single_chunk(tiny_llama_dir):
    long_prompt = (PROMPT * 4)[:70]
    outputs = []
    for budget in (16, 2048):
        engine = make_engine(tiny_llama_dir, kv_cache_blocks=64, max_num_batched_tokens=budget)
        request = Request(list(long_prompt), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        engine.add_request(request)
        steps = 0
        while engine.has_unfinished():
            engine.step()
            steps += 1
        outputs.append((request.output_token_ids, steps))
    (chunked, chunked_steps), (whole, whole_steps) = outputs
    assert chunked == whole
    assert chunked_steps > whole_steps  # the 70-token prompt really took several 16-token chunks


def test_nf4_forward_close_to_dense(tiny_llama_dir):
    dense = load_tiny(tiny_llama_dir)
    nf4 = load_tiny(tiny_llama_dir, quantize=True)
    a, _ = prefill_logits(dense.model, attach_cache(dense.model), PROMPT)
    b, _ = prefill_logits(nf4.model, attach_cache(nf4.model), PROMPT)
    assert not torch.equal(a, b)  # quantization really happened
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert cos.min() > 0.95
