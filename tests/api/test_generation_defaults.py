"""The model's generation_config.json sets the OpenAI routes' sampling defaults (vLLM's --generation-config auto);
a request's own values win, the TGI routes keep TGI's, and --generation-config none leaves them out."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.api.helpers import BASE_ID, api_settings, live_server

BODY = {"model": BASE_ID, "prompt": "Hello world", "max_tokens": 12, "ignore_eos": True}


@pytest.fixture(scope="module")
def greedy_by_default_dir(tiny_llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("greedy-model") / "model"
    shutil.copytree(tiny_llama_dir, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, "temperature": 0.0}))
    return folder


@pytest.mark.parametrize("generation_config", ["auto", "none"])
def test_the_model_s_temperature_is_the_default(greedy_by_default_dir, tmp_path, generation_config):
    settings = api_settings(greedy_by_default_dir, tmp_path / "store", generation_config=generation_config)
    with live_server(settings) as live, live.client() as client:
        def text(**body):
            return client.post("/v1/completions", json={**BODY, **body}).json()["choices"][0]["text"]

        greedy = text(temperature=0)
        unset = [text(seed=seed) for seed in range(3)]
        if generation_config == "auto":
            assert live.state.sampling_defaults == {"temperature": 0.0} and unset == [greedy] * 3
        else:
            assert live.state.sampling_defaults == {} and unset != [greedy] * 3  # sampled at temperature 1
        assert text(temperature=1.5, seed=0) != greedy  # the request's own value wins
