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
