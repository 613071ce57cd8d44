"""The baseline: HF transformers `generate` and PEFT LoRA on the same NF4 weights."""

from __future__ import annotations

import time

import torch

from bench.build import sync
from bench.shapes import ATTENTION_MODULES, LINEAR_MODULES
from server.engine.request import AdapterRef

PROMPT_SEED = 0


def prompts(vocab_size: int, batch: int, prompt_len: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(PROMPT_SEED)
    return torch.randint(0, vocab_size, (batch, prompt_len), generator=generator).to(device)  # [batch, len]


@torch.inference_mode()
def _generate(model, input_ids: torch.Tensor, new_tokens: int, **kwargs) -> torch.Tensor:
    return model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs,
    )


def measure_generate(model, input_ids: torch.Tensor, new_tokens: int, device: torch.device,
                     warmup_tokens: int = 2, **kwargs) -> dict:
    """Greedy `generate` of exactly `new_tokens` per row after a short warm-up of the same batch;
    tokens/s = generated tokens / wall time (prefill included)."""
    _generate(model, input_ids, warmup_tokens, **kwargs)
    sync(device)
    start = time.perf_counter()
    out = _generate(model, input_ids, new_tokens, **kwargs)
    sync(device)
    wall = time.perf_counter() - start
    generated = (out.shape[1] - input_ids.shape[1]) * input_ids.shape[0]
    return {
        "batch": input_ids.shape[0], "prompt_len": input_ids.shape[1], "new_tokens": new_tokens,
        "generated_tokens": generated, "wall_s": wall, "tokens_per_s": generated / wall,
        "ms_per_step": wall / max(1, out.shape[1] - input_ids.shape[1]) * 1e3,
    }


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(LINEAR_MODULES),
                      init_lora_weights=False, bias="none")


def wrap_peft(hf_model, first: AdapterRef):
    """PEFT model with one adapter holding exactly `first`'s A and B (so the same values as ours)."""
    from peft import get_peft_model

    peft_model = get_peft_model(hf_model, lora_config(), adapter_name=first.name)
    copy_adapter(peft_model, first)
    return peft_model.eval()


def add_adapters(peft_model, refs: list[AdapterRef]) -> int:
    """Add the adapters PEFT does not hold yet; returns how many were added."""
    added = 0
    for ref in refs:
        if ref.name in peft_model.peft_config:
            continue
        peft_model.add_adapter(ref.name, lora_config())
        copy_adapter(peft_model, ref)
        added += 1
    return added


@torch.no_grad()
def copy_adapter(peft_model, ref: AdapterRef) -> None:
    layers = peft_model.base_model.model.model.layers
    for (layer, module), (a, b) in ref.weights.tensors.items():
        parent = layers[layer].self_attn if module in ATTENTION_MODULES else layers[layer].mlp
        lora_layer = getattr(parent, module)
        lora_layer.lora_A[ref.name].weight.copy_(a)  # [r, in]
        lora_layer.lora_B[ref.name].weight.copy_(b)  # [out, r]


def measure_peft_merged(peft_model, ref: AdapterRef, input_ids: torch.Tensor, new_tokens: int,
                        device: torch.device) -> dict:
    """PEFT merge_adapter into the NF4 weights (timed), generate on the merged model, unmerge (timed)."""
    peft_model.base_model.set_adapter(ref.name)
    sync(device)
    start = time.perf_counter()
    peft_model.base_model.merge_adapter()
    sync(device)
    merge_s = time.perf_counter() - start
    result: dict = {"merge_s": merge_s}
    try:
        result.update(measure_generate(peft_model, input_ids, new_tokens, device))
    except Exception as err:  # still unmerge, and keep the merge time
        result["generate_error"] = f"{type(err).__name__}: {err}"
    finally:
        sync(device)
        start = time.perf_counter()
        peft_model.base_model.unmerge_adapter()
        sync(device)
        result["unmerge_s"] = time.perf_counter() - start
    result["merge_unmerge_s"] = result["merge_s"] + result["unmerge_s"]
    return result


def measure_peft_unmerged(peft_model, ref: AdapterRef, input_ids: torch.Tensor, new_tokens: int,
                          device: torch.device) -> dict:
    """One adapter applied unmerged (PEFT's LoRA forward on every linear) for the whole batch."""
    peft_model.base_model.set_adapter(ref.name)
    return measure_generate(peft_model, input_ids, new_tokens, device)


def measure_peft_mixed(peft_model, refs: list[AdapterRef], input_ids: torch.Tensor, new_tokens: int,
                       device: torch.device) -> dict:
    """PEFT mixed batch: row i uses refs[i % len(refs)] via `adapter_names`."""
    names = [refs[row % len(refs)].name for row in range(input_ids.shape[0])]
    result = measure_generate(peft_model, input_ids, new_tokens, device, warmup_tokens=1, adapter_names=names)
    result["distinct_adapters"] = len(set(names))
    return result
