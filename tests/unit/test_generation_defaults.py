"""The OpenAI routes' sampling defaults from the model's generation_config.json (vLLM's --generation-config auto)."""

from __future__ import annotations

import json

from server.api.generation_defaults import generation_defaults
from server.api.openai import _sampling_params
from server.api.schemas import CompletionRequest


def _write(folder, **values):
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, **values}))


def test_only_values_that_differ_from_transformers_defaults_count(tmp_path):
    assert generation_defaults(tmp_path) == {}  # no file
    _write(tmp_path, temperature=0.6, top_p=0.9, top_k=50, repetition_penalty=1.0, do_sample=True)
    assert generation_defaults(tmp_path) == {"temperature": 0.6, "top_p": 0.9}
    _write(tmp_path, top_k=20, min_p=0.05, repetition_penalty=1.05)
    assert generation_defaults(tmp_path) == {"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.05}
    _write(tmp_path, temperature=-1, top_p="high", top_k=2.5, min_p=True)  # invalid: left out
    assert generation_defaults(tmp_path) == {}
    (tmp_path / "generation_config.json").write_text("{not json")
    assert generation_defaults(tmp_path) == {}


def test_a_request_s_own_values_win_over_the_model_s():
    defaults = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.05}

    def params(defaults, **body):
        request = CompletionRequest(model="m", prompt="x", **body)
        return _sampling_params(request, 8, False, 0, None, None, None, defaults)

    unset = params(defaults)
    assert (unset.temperature, unset.top_p, unset.top_k, unset.min_p, unset.repetition_penalty) == (
        0.6, 0.9, 20, 0.05, 1.05)
    given = params(defaults, temperature=0, top_p=1.0, top_k=-1, min_p=0, repetition_penalty=1.0)
    assert (given.temperature, given.top_p, given.top_k, given.min_p, given.repetition_penalty) == (0, 1.0, 0, 0, 1.0)
    plain = params({})
    assert (plain.temperature, plain.top_p, plain.top_k, plain.min_p, plain.repetition_penalty) == (
        1.0, 1.0, 0, 0.0, 1.0)
