"""Prompt logprobs from the engine: one entry per prompt position, the same whether the prompt is
prefilled in one chunk or several, and computed in full even when its prefix is cached."""

from __future__ import annotations

import pytest

from server.engine.request import Request, SamplingParams
from tests.unit.engine_helpers import make_engine

PROMPT = [(7 * i + 3) % 250 + 1 for i in range(40)]


def _prompt_logprobs(engine, k=2):
    request = Request(list(PROMPT), SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=k))
    engine.add_request(request)
    first = None
    while engine.has_unfinished():
        for output in engine.step():
            if output.request_id == request.request_id and first is None:
                first = output
    return first.prompt_logprobs


def test_chunked_prefill_and_prefix_cache_give_the_same_prompt_logprobs(tiny_llama_dir):
    whole = _prompt_logprobs(make_engine(tiny_llama_dir, kv_cache_blocks=64))
    assert len(whole) == len(PROMPT) and whole[0] is None
    assert all(value <= 0 and rank >= 1 and len(top) == 2 for value, rank, top in whole[1:])
    chunked_engine = make_engine(tiny_llama_dir, kv_cache_blocks=64, max_num_batched_tokens=16)
    chunked = _prompt_logprobs(chunked_engine)
    cached = _prompt_logprobs(chunked_engine)  # the same prompt again: its blocks are in the prefix cache
    for got in (chunked, cached):
        assert len(got) == len(whole)
        for mine, theirs in zip(got[1:], whole[1:], strict=True):
            assert mine[0] == pytest.approx(theirs[0], abs=1e-5) and mine[1] == theirs[1]
            assert [t for t, _ in mine[2]] == [t for t, _ in theirs[2]]
