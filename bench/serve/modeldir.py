"""A random-weight Llama model directory for the server: config.json, safetensors weights and a
byte-level BPE tokenizer of the model's vocabulary size, all made in code (nothing downloaded).

Directories are cached under `cache_dir/<shape>-<dtype>` and reused when complete (a `.complete`
marker is written last), since the 8B shape takes tens of seconds to write.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bench.shapes import ATTENTION_MODULES, LINEAR_MODULES, SHAPES, llama_config, module_dims, shape_facts

FORMAT_VERSION = 1  # bump when the directory layout changes, so stale caches are rebuilt
MARKER = ".complete"
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>")
TINY_SPECIALS = ("<unk>", "<s>", "</s>")
# Printable byte-level characters first, so early merges make readable tokens.
_PRINTABLE_FIRST = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]


def special_token_ids(shape: str) -> dict[int, str]:
    """id -> text of the special tokens: Llama 3's 256 reserved ids at the top, or <unk>/<s>/</s> at 0-2."""
    config = SHAPES[shape]
    if config["bos_token_id"] < 3:
        return dict(enumerate(TINY_SPECIALS))
    first = config["bos_token_id"]
    names = list(LLAMA3_SPECIALS) + [f"<|reserved_special_token_{i}|>" for i in range(256 - len(LLAMA3_SPECIALS))]
    return {first + i: name for i, name in enumerate(names)}


def _merge_plan(num_merges: int, alphabet: list[str]) -> list[tuple[str, str]]:
    """`num_merges` BPE merges (left, right), each of two tokens that exist before it: every token
    grows by one alphabet character, breadth first (two-character tokens, then three, ...)."""
    order = [c for c in _PRINTABLE_FIRST if c in alphabet] + [c for c in alphabet if c not in _PRINTABLE_FIRST]
    merges: list[tuple[str, str]] = []
    frontier, seen = list(order), set(order)
    while len(merges) < num_merges:
        grown = []
        for left in frontier:
            for right in order:
                token = left + right
                if token in seen:
                    continue
                seen.add(token)
                merges.append((left, right))
                grown.append(token)
                if len(merges) == num_merges:
                    return merges
        frontier = grown
    return merges


def build_tokenizer(shape: str, target: Path):
    """A byte-level BPE tokenizer with exactly the model's vocab size, saved in `target`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab_size = SHAPES[shape]["vocab_size"]
    specials = special_token_ids(shape)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    free_ids = iter(i for i in range(vocab_size) if i not in specials)
    vocab = {char: next(free_ids) for char in alphabet}
    merges = _merge_plan(vocab_size - len(specials) - len(alphabet), alphabet)
    for left, right in merges:
        vocab[left + right] = next(free_ids)
    vocab.update({name: index for index, name in specials.items()})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(name, special=True) for name in specials.values()])
    config = SHAPES[shape]
    bos, eos = specials[config["bos_token_id"]], specials[config["eos_token_id"]]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos)
    fast.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    fast.save_pretrained(target)
    if len(fast) != vocab_size:
        raise RuntimeError(f"tokenizer has {len(fast)} tokens, the model {vocab_size}")
    return fast


def _write_weights(shape: str, target: Path, device: str, dtype_name: str, seed: int) -> int:
    """Random N(0, 0.02) matrices and unit norms in HF Llama names, one safetensors file per few layers.
    Returns the number of parameters."""
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, dtype_name)
    facts = shape_facts(llama_config(shape))
    generator = torch.Generator(device=device).manual_seed(seed)

    def matrix(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, device=device, generator=generator) * 0.02).to(dtype).cpu()

    def norm() -> torch.Tensor:
        return torch.ones(facts["hidden_size"], dtype=dtype)

    hidden, vocab = facts["hidden_size"], facts["vocab_size"]
    shard: dict[str, torch.Tensor] = {"model.embed_tokens.weight": matrix(vocab, hidden), "model.norm.weight": norm()}
    if not facts["tie_word_embeddings"]:
        shard["lm_head.weight"] = matrix(vocab, hidden)
    num_params, num_files = 0, 0
    dims = module_dims(facts)
    for layer in range(facts["num_layers"]):
        prefix = f"model.layers.{layer}"
        shard[f"{prefix}.input_layernorm.weight"] = norm()
        shard[f"{prefix}.post_attention_layernorm.weight"] = norm()
        for name in LINEAR_MODULES:
            parent = "self_attn" if name in ATTENTION_MODULES else "mlp"
            fan_in, fan_out = dims[name]
            shard[f"{prefix}.{parent}.{name}.weight"] = matrix(fan_out, fan_in)
        if sum(t.numel() for t in shard.values()) > 1 << 30 or layer == facts["num_layers"] - 1:
            num_params += sum(t.numel() for t in shard.values())
            save_file(shard, str(target / f"model-{num_files:05d}.safetensors"), metadata={"format": "pt"})
            num_files += 1
            shard = {}
    return num_params


def build_model_dir(shape: str, cache_dir: Path, device: str = "cpu", dtype: str = "bfloat16",
                    seed: int = 0) -> tuple[Path, dict]:
    """The cached model dir for `shape` (built on `device` if missing); returns (dir, facts)."""
    import time

    target = Path(cache_dir) / f"{shape}-{dtype}-v{FORMAT_VERSION}"
    facts = {"shape": shape, "dtype": dtype, "path": str(target), "cached": True}
    if (target / MARKER).is_file():
        facts.update(json.loads((target / MARKER).read_text()))
        return target, facts
    start = time.perf_counter()
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    config = llama_config(shape).to_dict()
    config["torch_dtype"] = dtype
    (target / "config.json").write_text(json.dumps(config, indent=2))
    build_tokenizer(shape, target)
    num_params = _write_weights(shape, target, device, dtype, seed)
    built = {"num_params": num_params, "build_s": round(time.perf_counter() - start, 1)}
    (target / MARKER).write_text(json.dumps(built))
    facts.update(built, cached=False)
    return target, facts
