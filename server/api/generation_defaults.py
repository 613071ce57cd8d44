"""The OpenAI routes' sampling defaults from the model's generation_config.json, as vLLM's `--generation-config
auto` (its default) takes them: a request that leaves temperature, top_p, top_k, min_p or repetition_penalty unset
samples as the model's authors recommend (Llama-3.1-Instruct: temperature 0.6, top_p 0.9) instead of at
temperature 1.0. Like vLLM, only the values that differ from transformers' GenerationConfig defaults count (its top_k
of 50 is not a recommendation). The TGI routes keep TGI's own defaults (greedy unless asked)."""

from __future__ import annotations

import logging
from pathlib import Path

from server.model.loader import read_generation_config

log = logging.getLogger(__name__)

# name -> (transformers' default, which values are valid)
_KEYS = {
    "temperature": (1.0, lambda v: 0 <= v <= 2),
    "top_p": (1.0, lambda v: 0 < v <= 1),
    "top_k": (50, lambda v: v >= 0 and float(v).is_integer()),
    "min_p": (None, lambda v: 0 <= v <= 1),
    "repetition_penalty": (1.0, lambda v: 0 < v <= 10),
}


def generation_defaults(hf_dir: Path | str) -> dict[str, float]:
    """The sampling values of `hf_dir`/generation_config.json that differ from transformers' defaults; {} without
    the file. A value of the wrong type or range is left out, with a warning."""
    config = read_generation_config(hf_dir)
    defaults = {}
    for name, (transformers_default, is_valid) in _KEYS.items():
        value = config.get(name)
        if value is None or value == transformers_default:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not is_valid(value):
            log.warning("%s/generation_config.json: %s = %r is not a valid default; left out", hf_dir, name, value)
            continue
        defaults[name] = int(value) if name == "top_k" else float(value)
    if defaults:
        log.info("sampling defaults from the model's generation_config.json: %s (a request's own values win; "
                 "--generation-config none leaves them out)", defaults)
    return defaults
