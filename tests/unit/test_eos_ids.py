"""The engine's end-of-sequence ids: the tokenizer's, the model config's and generation_config.json's (vLLM's)."""

from __future__ import annotations

import json
from types import SimpleNamespace

from server.engine.setup import eos_ids


def test_generation_config_adds_its_eos_ids(tmp_path):
    tokenizer, config = SimpleNamespace(eos_token_id=2), SimpleNamespace(eos_token_id=[2, 5])
    assert eos_ids(tokenizer, config, tmp_path) == {2, 5}  # no generation_config.json
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 77], "temperature": 0.6}))
    assert eos_ids(tokenizer, config, tmp_path) == {2, 5, 77}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    assert eos_ids(tokenizer, config, tmp_path) == {2, 5, 9}
    (tmp_path / "generation_config.json").write_text("{not json")  # unreadable: the other two sources only
    assert eos_ids(tokenizer, config, tmp_path) == {2, 5}
