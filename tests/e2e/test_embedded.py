"""The embedded SmolLM2-135M-Instruct, quantized to NF4 on the CPU, answers through our engine."""

from __future__ import annotations

from server.config import Settings
from server.engine.engine import LLMEngine
from server.engine.request import Request, SamplingParams
from server.model.quant import NF4Linear


def chat_ids(tokenizer, text):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_embedded_model_is_nf4_and_answers_a_factual_question(embedded_model):
    linears = [lin.base for _, lin in embedded_model.model.lora_linears()]
    assert linears and all(isinstance(lin, NF4Linear) for lin in linears)
    nf4_bytes = sum(lin.nbytes for lin in linears)
    dense_bytes = sum(lin.out_features * lin.in_features * 4 for lin in linears)
    assert nf4_bytes < dense_bytes / 6  # ~0.53 byte/param against 4 bytes/param float32
    engine = LLMEngine(embedded_model, Settings(device="cpu", cuda_graphs=False, max_model_len=512))
    questions = {"What is the capital of France?": "Paris", "What is the capital of Italy?": "Rome"}
    requests = {q: Request(chat_ids(embedded_model.tokenizer, q), SamplingParams(max_tokens=12, temperature=0))
                for q in questions}
    for r in requests.values():
        engine.add_request(r)
    while engine.has_unfinished():
        engine.step()
    for question, answer in questions.items():
        assert answer in requests[question].text, requests[question].text


def test_structured_output_in_a_mixed_batch_is_schema_valid(embedded_model):
    """JSON-schema, regex and free-text rows decode in one batch: the constrained rows follow their
    grammars and the free row gives what it gives alone."""
    import json
    import re

    from server.engine.grammar import Grammar

    engine = LLMEngine(embedded_model, Settings(device="cpu", cuda_graphs=False, max_model_len=512))
    tokenizer = embedded_model.tokenizer
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "population_millions": {"type": "integer", "minimum": 0,
                                                                       "maximum": 99}},
              "required": ["city", "population_millions"], "additionalProperties": False}
    json_rows = [Request(chat_ids(tokenizer, f"Describe {c} as JSON with city and population_millions."),
                         SamplingParams(max_tokens=48, temperature=t, seed=1,
                                        grammar=Grammar("json_schema", json.dumps(schema))))
                 for c, t in (("Paris", 0.0), ("Rome", 0.8))]
    regex_row = Request(chat_ids(tokenizer, "What is 6 times 7?"),
                        SamplingParams(max_tokens=8, temperature=0, grammar=Grammar("regex", r"[0-9]{1,3}")))
    free = Request(chat_ids(tokenizer, "What is the capital of France?"), SamplingParams(max_tokens=12, temperature=0))
    for r in (*json_rows, regex_row, free):
        engine.add_request(r)
    while engine.has_unfinished():
        engine.step()
    for row in json_rows:
        assert row.finish_reason is not None and row.finish_reason.value == "stop", (row.finish_reason, row.text)
        value = json.loads(row.text)
        assert set(value) == {"city", "population_millions"} and isinstance(value["city"], str), row.text
        assert isinstance(value["population_millions"], int) and 0 <= value["population_millions"] <= 99
    assert re.fullmatch(r"[0-9]{1,3}", regex_row.text), regex_row.text
    alone = Request(list(free.prompt_token_ids), SamplingParams(max_tokens=12, temperature=0))
    engine.add_request(alone)
    while engine.has_unfinished():
        engine.step()
    assert free.output_token_ids == alone.output_token_ids and "Paris" in free.text
