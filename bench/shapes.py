"""The model shapes the benchmark builds: real Llama 3 configs (written here, nothing downloaded)."""

from __future__ import annotations

from typing import Any

LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def _llama3_rope(factor: float) -> dict[str, Any]:
    return {
        "rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


_COMMON = dict(
    vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
    bos_token_id=128000, eos_token_id=128001, hidden_act="silu", attention_bias=False, mlp_bias=False,
    initializer_range=0.02, architectures=["LlamaForCausalLM"],
)

# As in the published config.json files of meta-llama/Llama-3.2-1B and meta-llama/Llama-3.1-8B.
SHAPES: dict[str, dict[str, Any]] = {
    "1b": dict(
        _COMMON, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, tie_word_embeddings=True, rope_scaling=_llama3_rope(32.0),
    ),
    "8b": dict(
        _COMMON, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, tie_word_embeddings=False, rope_scaling=_llama3_rope(8.0),
    ),
    # Not a benchmark: a few-MB model that lets the harness itself run end to end on a CPU.
    "tiny": dict(
        vocab_size=1024, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        architectures=["LlamaForCausalLM"],
    ),
}


def llama_config(model: str):
    """transformers.LlamaConfig for one of SHAPES."""
    from transformers import LlamaConfig

    kwargs = dict(SHAPES[model])
    config = LlamaConfig(**kwargs)
    wanted = (kwargs.get("rope_scaling") or {}).get("rope_type")
    found = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if wanted and found.get("rope_type") != wanted:  # a transformers that only reads rope_parameters
        scaling, theta = kwargs.pop("rope_scaling"), kwargs.pop("rope_theta")
        config = LlamaConfig(**kwargs, rope_parameters={**scaling, "rope_theta": theta})
    return config


def shape_facts(config) -> dict[str, Any]:
    """The dimensions the roofline needs, as plain numbers for the result file."""
    return {
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_layers": config.num_hidden_layers,
        "num_heads": config.num_attention_heads,
        "num_kv_heads": config.num_key_value_heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": bool(config.tie_word_embeddings),
    }


def module_dims(shape: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each LoRA-targetable projection."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    q, kv = shape["num_heads"] * shape["head_dim"], shape["num_kv_heads"] * shape["head_dim"]
    return {
        "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
        "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
    }


def linear_params(shape: dict[str, Any]) -> int:
    """Parameters in all decoder linear layers (what NF4 quantizes)."""
    per_layer = sum(fan_in * fan_out for fan_in, fan_out in module_dims(shape).values())
    return shape["num_layers"] * per_layer


def adapter_params(shape: dict[str, Any], rank: int) -> int:
    """Parameters of one all-linear LoRA adapter of `rank`."""
    per_layer = sum(rank * (fan_in + fan_out) for fan_in, fan_out in module_dims(shape).values())
    return shape["num_layers"] * per_layer
