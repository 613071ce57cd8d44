"""What an adapter must fit (BaseModelSpec) and what parsing yields (AdapterWeights)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LINEAR_MODULES = ATTENTION_MODULES + MLP_MODULES


@dataclass(frozen=True)
class BaseModelSpec:
    """Description of the base model an adapter must fit."""

    architecture: str  # e.g. "LlamaForCausalLM"
    model_type: str  # e.g. "llama", "qwen2"
    num_layers: int
    module_shapes: dict[str, tuple[int, int]]  # short module name -> (in_features, out_features)

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any] | Any) -> BaseModelSpec:
        """Build a spec from a Llama-family transformers config (object or config.json dict)."""

        def get(key: str, default: Any = None) -> Any:
            if isinstance(config, Mapping):
                return config.get(key, default)
            return getattr(config, key, default)

        hidden, intermediate = int(get("hidden_size")), int(get("intermediate_size"))
        num_heads = int(get("num_attention_heads"))
        num_kv_heads = int(get("num_key_value_heads") or num_heads)
        head_dim = int(get("head_dim") or hidden // num_heads)
        architectures = get("architectures") or ["LlamaForCausalLM"]
        return cls(
            architecture=architectures[0],
            model_type=str(get("model_type", "llama")),
            num_layers=int(get("num_hidden_layers")),
            module_shapes={
                "q_proj": (hidden, num_heads * head_dim),
                "k_proj": (hidden, num_kv_heads * head_dim),
                "v_proj": (hidden, num_kv_heads * head_dim),
                "o_proj": (num_heads * head_dim, hidden),
                "gate_proj": (hidden, intermediate),
                "up_proj": (hidden, intermediate),
                "down_proj": (intermediate, hidden),
            },
        )


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's scaling: alpha / rank, or alpha / sqrt(rank) with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@dataclass
class AdapterWeights:
    """Parsed LoRA tensors, ready for the engine; B is NOT pre-scaled. Tensors keep the file's dtype
    (float32, float16 or bfloat16): the engine casts them on the device, so a bf16 adapter takes half the
    CPU memory and copy time of a float32 one."""

    rank: int
    alpha: float
    use_rslora: bool
    scaling: float  # alpha / rank, or alpha / sqrt(rank) with rsLoRA
    # (layer_index, module short name) -> (A [rank, in], B [out, rank])
    tensors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def target_modules(self) -> list[str]:
        """Sorted short names of the modules that carry tensors."""
        return sorted({module for _, module in self.tensors})


def weights_nbytes(weights: AdapterWeights) -> int:
    """Bytes held by all A and B tensors (what a CPU cache or GPU slot must budget for)."""
    return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in weights.tensors.values())
