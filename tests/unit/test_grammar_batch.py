"""Grammars, adapters and free text in one batch: each constrained row follows its grammar, each free
row gives exactly what it gives alone, and a preempted constrained row resumes its grammar."""

from __future__ import annotations

import json
import re

from server.engine.grammar import Grammar
from server.engine.request import Request, SamplingParams
from tests.unit.engine_helpers import make_engine
from tests.unit.test_mixed_batch_oracle import adapter_refs

PROMPT = [5, 17, 42, 99, 7, 3]


def _run(engine, requests):
    for request in requests:
        engine.add_request(request)
    while engine.has_unfinished():
        engine.step()


def test_grammars_adapters_and_free_rows_share_a_batch(tiny_llama_dir, tiny_adapters):
    refs = adapter_refs(tiny_llama_dir, tiny_adapters)
    engine = make_engine(tiny_llama_dir, max_slots=4, max_rank=16, kv_cache_blocks=128)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                          "maximum": 9}},
              "required": ["ok", "n"], "additionalProperties": False}
    json_row = Request(PROMPT, SamplingParams(max_tokens=40, temperature=1.0, seed=3,
                                              grammar=Grammar("json_schema", json.dumps(schema))),
                       adapter=refs["attn-r4"])
    regex_row = Request(PROMPT, SamplingParams(max_tokens=20, temperature=0.7, seed=4,
                                               grammar=Grammar("regex", r"[a-f]{2,5}-[0-9]")), adapter=refs["ko-r16"])
    choice_row = Request(PROMPT, SamplingParams(max_tokens=20, temperature=0,
                                                grammar=Grammar("choice", json.dumps(["alpha", "beta"]))))
    free_rows = [Request(PROMPT, SamplingParams(max_tokens=10, temperature=0), adapter=refs["ko-r16"]),
                 Request(PROMPT, SamplingParams(max_tokens=10, temperature=1.0, seed=9))]
    _run(engine, [json_row, regex_row, choice_row, *free_rows])
    value = json.loads(json_row.text)
    assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and 0 <= value["n"] <= 9, json_row.text
    assert re.fullmatch(r"[a-f]{2,5}-[0-9]", regex_row.text), regex_row.text
    assert choice_row.text in ("alpha", "beta")
    assert all(r.finish_reason.value == "stop" for r in (json_row, regex_row, choice_row))
    for free in free_rows:
        alone = Request(PROMPT, free.params, adapter=free.adapter)
        _run(make_engine(tiny_llama_dir, max_slots=4, max_rank=16, kv_cache_blocks=128), [alone])
        assert free.output_token_ids == alone.output_token_ids


def test_a_constrained_request_keeps_its_grammar_across_preemption(tiny_llama_dir):
    """With six KV blocks for three growing requests, rows are preempted and recomputed; the matcher keeps
    the tokens already taken, so each output still matches."""
    engine = make_engine(tiny_llama_dir, kv_cache_blocks=6, max_model_len=96)
    pattern = r"(ab|cd){8,14}z"
    rows = [Request(PROMPT * 5, SamplingParams(max_tokens=40, temperature=1.0, seed=s,
                                               grammar=Grammar("regex", pattern)))
            for s in range(3)]
    preempted = 0
    original = engine.metrics.record_iteration

    def count(num_tokens, num_preempted):
        nonlocal preempted
        preempted += num_preempted
        original(num_tokens, num_preempted)

    engine.metrics.record_iteration = count
    _run(engine, rows)
    assert preempted > 0
    for row in rows:
        assert re.fullmatch(pattern, row.text), row.text
