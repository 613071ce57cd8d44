"""The engine's sampler and detokenizer wiring: seeded requests are batch-independent end to end,
token ids named by logit_bias are checked, token-count rows are freed, text equals full decoding."""

from __future__ import annotations

import pytest

from server.engine.request import Request, SamplingError, SamplingParams
from tests.unit.engine_helpers import make_engine

PROMPTS = [[5, 17, 33, 100, 7], [44, 55, 66, 77, 88, 99], [200, 201], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
MIXED = [
    dict(temperature=0.9, top_p=0.9, seed=11, frequency_penalty=0.5),
    dict(temperature=0.0, repetition_penalty=1.3),
    dict(temperature=1.2, top_k=20, min_p=0.05, seed=12, presence_penalty=-0.5, logit_bias={7: 2.0}),
    dict(temperature=0.7, seed=13),
]


def run(engine, requests):
    for request in requests:
        engine.add_request(request)
    while engine.has_unfinished():
        engine.step()
    return [r.output_token_ids for r in requests]


def make(prompt, **params):
    return Request(list(prompt), SamplingParams(max_tokens=12, ignore_eos=True, **params))


def test_seeded_requests_give_the_same_tokens_alone_and_in_a_mixed_batch(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, kv_cache_blocks=128)
    alone = [run(engine, [make(p, **params)])[0] for p, params in zip(PROMPTS, MIXED, strict=True)]
    together = run(engine, [make(p, **params) for p, params in zip(PROMPTS, MIXED, strict=True)])
    assert together == alone  # every sampled request above brings a seed; the greedy one needs none
    table = engine.sampler.counts
    assert len(table.free_rows) == table.output_counts.shape[0]  # every penalty row was released


def test_logit_bias_token_ids_outside_the_vocabulary_are_refused(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, kv_cache_blocks=32)
    vocab = engine.model.config.vocab_size
    with pytest.raises(SamplingError, match="logit_bias"):
        engine.add_request(make([1, 2], logit_bias={vocab: 1.0}))
    forced = make([1, 2], temperature=1.0, logit_bias={vocab - 1: 100.0})
    assert run(engine, [forced])[0] == [vocab - 1] * 12


def test_streamed_text_equals_decoding_the_output(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, kv_cache_blocks=64)
    request = make(PROMPTS[0], temperature=1.0, seed=5)
    engine.add_request(request)
    streamed = ""
    while engine.has_unfinished():
        streamed += "".join(o.new_text for o in engine.step())
    assert streamed == request.text == engine.tokenizer.decode(request.output_token_ids, skip_special_tokens=True)
