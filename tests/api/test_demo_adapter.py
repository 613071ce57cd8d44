"""`make demo`: the generated dataset, a PEFT training run that changes the model, upload and comparison."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from adapters_store import BaseModelSpec, load_adapter_dir
from server import demo_adapter
from tests.api.helpers import BASE_ID, api_settings, live_server


def test_dataset_is_json_of_one_shape_and_holds_out_the_demo_questions():
    import random

    examples = demo_adapter.training_examples(random.Random(0), 400)
    assert len(examples) == 400
    questions = {q for q, _ in examples}
    assert not questions & set(demo_adapter.DEMO_QUESTIONS)
    assert not any(country in q for q in questions for country in demo_adapter.HELD_OUT_COUNTRIES)
    answers = [json.loads(a) for _, a in examples]
    assert all(set(a) == {"topic", "answer"} and a["topic"] in ("geography", "math") for a in answers)


def test_labels_score_only_the_answer(tiny_llama_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids, labels = demo_adapter.encode(tokenizer, "What is 1 + 2?", '{"topic": "math", "answer": "3"}')
    scored = [t for t, label in zip(ids, labels, strict=True) if label != -100]
    assert tokenizer.decode(scored) == '{"topic": "math", "answer": "3"}' + tokenizer.eos_token


def test_trained_adapter_is_valid_peft_changes_the_model_and_is_served(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "demo-adapter"
    demo_adapter.train(out, tiny_llama_dir, steps=3, seed=0)
    lora_b = [t for name, t in load_file(out / "adapter_model.safetensors").items() if "lora_B" in name]
    assert lora_b and all(torch.count_nonzero(t) > 0 for t in lora_b)  # PEFT starts B at zero; training moved it
    from transformers import AutoConfig

    spec = BaseModelSpec.from_hf_config(AutoConfig.from_pretrained(tiny_llama_dir))
    weights = load_adapter_dir(out, spec, max_rank=16)
    assert weights is not None
    capsys.readouterr()
    with live_server(api_settings(tiny_llama_dir, tmp_path / "store", max_upload_bytes=2_000_000)) as live:
        assert demo_adapter.main(["--url", live.url, "--out", str(out), "--name", "demo"]) == 0
    printed = capsys.readouterr().out
    assert "using the adapter already in" in printed and "uploaded 'demo': version 1, rank 8" in printed
    for question in demo_adapter.DEMO_QUESTIONS:
        assert f"Q: {question}" in printed
    assert printed.count(f"base ({BASE_ID}):") == 3 and printed.count("adapter (demo):") == 3


def test_no_server_says_to_start_one(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "demo-adapter"
    out.mkdir()
    for name in demo_adapter.ADAPTER_FILES:
        (out / name).write_text("{}")
    assert demo_adapter.main(["--url", "http://127.0.0.1:9", "--out", str(out)]) == 1
    assert "make serve" in capsys.readouterr().err
