"""Build what the benchmark measures: one random-weight HF model, our NF4 model from the same weights,
the same weights as an HF NF4 model (bitsandbytes Linear4bit, what `from_pretrained` with a
BitsAndBytesConfig yields), random LoRA adapters, and engines."""

from __future__ import annotations

import gc
import math

import torch

from bench.shapes import ATTENTION_MODULES, LINEAR_MODULES
from server.config import LoraMode, Settings
from server.engine.engine import LLMEngine
from server.engine.request import AdapterRef
from server.model.llama import CausalLM, ModelConfig
from server.model.loader import LoadedModel

ADAPTER_RANK = 16
ADAPTER_ALPHA = 32.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """The GPU's name for result files, or "cpu"."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def gpu_mem_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.memory_allocated(device) / 2**30, 2)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@torch.no_grad()
def random_hf_model(config, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """LlamaForCausalLM with random weights, built directly on `device` in `dtype`."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    for param in model.parameters():
        if param.dtype != dtype:  # only if the default dtype was not honoured (buffers stay float32)
            param.data = param.data.to(dtype)
        if param.dim() == 1:
            param.fill_(1.0)  # RMSNorm weights
        else:
            param.normal_(0.0, 0.02)
    return model.eval()


def our_model(hf_model, device: torch.device, dtype: torch.dtype) -> CausalLM:
    """Our CausalLM (NF4 linears) from the HF model's state dict; the HF model keeps its weights."""
    config = ModelConfig.from_hf(hf_model.config)
    weights = dict(hf_model.state_dict())  # from_weights pops entries: hand it a shallow copy
    model = CausalLM.from_weights(config, weights, dtype=dtype, device=device, quantize=True)
    del weights
    return model


@torch.no_grad()
def hf_to_nf4(hf_model, compute_dtype: torch.dtype) -> int:
    """Swap every decoder nn.Linear for a bitsandbytes NF4 Linear4bit in place (double quant).

    Equivalent to `from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=...))` without
    a disk round trip: Params4bit.to(device) quantizes exactly as the HF quantizer does. The LM head
    and embeddings stay 16-bit, as HF leaves them. Returns the number of layers converted.
    """
    import bitsandbytes as bnb

    count = 0
    for layer in hf_model.model.layers:
        for name in LINEAR_MODULES:
            parent = layer.self_attn if name in ATTENTION_MODULES else layer.mlp
            old = getattr(parent, name)
            new = bnb.nn.Linear4bit(
                old.in_features, old.out_features, bias=old.bias is not None, compute_dtype=compute_dtype,
                compress_statistics=True, quant_type="nf4", device="meta",
            )
            weight = old.weight.data
            new.weight = bnb.nn.Params4bit(
                weight, requires_grad=False, compress_statistics=True, quant_type="nf4",
                quant_storage=torch.uint8, module=new,
            ).to(weight.device)
            if old.bias is not None:
                new.bias = torch.nn.Parameter(old.bias.data, requires_grad=False)
            setattr(parent, name, new)
            del old, weight
            count += 1
    hf_model.is_loaded_in_4bit = True  # what PEFT reads to pick its bnb 4-bit LoRA layer
    return count


class NullTokenizer:
    """The engine detokenizes every step; the benchmark has no tokenizer and wants no text."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return ""


def loaded_model(model: CausalLM, hf_config) -> LoadedModel:
    from pathlib import Path

    return LoadedModel(model, NullTokenizer(), ModelConfig.from_hf(hf_config), "bench-random", Path("."))


def kv_blocks_for(num_seqs: int, max_tokens_per_seq: int, block_size: int = 16) -> int:
    """KV blocks for `num_seqs` sequences of up to `max_tokens_per_seq`, plus slack and the pad block."""
    return num_seqs * (-(-max_tokens_per_seq // block_size) + 1) + 16


def build_engine(loaded: LoadedModel, mode: str, device: torch.device, kv_blocks: int,
                 graph_rows: int | None = None) -> LLMEngine:
    """`graph_rows`: Settings.cuda_graph_max_rows (None: its default)."""
    settings = Settings(
        model="embedded", device=device.type, lora_mode=LoraMode(mode), max_slots=32, max_rank=ADAPTER_RANK,
        max_batch_size=64, max_model_len=4096, max_num_batched_tokens=8192, kv_cache_memory_fraction=0.3,
        kv_cache_blocks=kv_blocks, cuda_graphs=device.type == "cuda",
        **({} if graph_rows is None else {"cuda_graph_max_rows": graph_rows}),
    )
    return LLMEngine(loaded, settings)


def release_engine(engine: LLMEngine, device: torch.device) -> None:
    """Drop an engine's KV cache, graphs, slot tensors and pristine copy so the next engine gets the
    memory (the engine object itself may stay referenced for a while)."""
    model = engine.model
    if engine.swapper is not None:
        engine.swapper.swap(None)  # leave the shared model's weights pristine for whoever comes next
        engine.swapper = None
    model.kv_cache = []
    engine.kv_cache.keys.clear()
    engine.kv_cache.values.clear()
    for _, linear in model.lora_linears():
        linear.lora_a = None
        linear.lora_b = None
    engine.lora_slots = None
    engine.runner.graphs = None
    from server import metrics

    metrics.remove_model_series(engine.model_name)
    free_memory(device)


def random_adapters(shape: dict, count: int, device: torch.device, seed: int = 1) -> list[AdapterRef]:
    """`count` all-linear rank-16 adapters: A ~ N(0, 1/in), B ~ N(0, 0.01^2), float32 on the CPU.

    With a GPU the values are drawn there and copied into one pinned host buffer per adapter (the
    server's CPU adapter cache keeps adapters pinned too); A and B are views into that buffer.
    """
    from adapters_store.spec import AdapterWeights, lora_scaling
    from bench.shapes import module_dims

    dims = module_dims(shape)
    layout = [(layer, name, fan_in, fan_out) for layer in range(shape["num_layers"])
              for name, (fan_in, fan_out) in dims.items()]
    total = sum(ADAPTER_RANK * (fan_in + fan_out) for _, _, fan_in, fan_out in layout)
    generator = torch.Generator(device=device).manual_seed(seed)
    refs = []
    for index in range(count):
        flat = torch.randn(total, device=device, generator=generator)  # [total] float32
        offset = 0
        for _, _, fan_in, fan_out in layout:
            flat[offset : offset + ADAPTER_RANK * fan_in].mul_(1.0 / math.sqrt(fan_in))
            offset += ADAPTER_RANK * fan_in
            flat[offset : offset + fan_out * ADAPTER_RANK].mul_(0.01)
            offset += fan_out * ADAPTER_RANK
        host = flat
        if device.type == "cuda":
            host = torch.empty(total, dtype=torch.float32, pin_memory=True)
            host.copy_(flat)
            del flat
        tensors, offset = {}, 0
        for layer, name, fan_in, fan_out in layout:
            a = host[offset : offset + ADAPTER_RANK * fan_in].view(ADAPTER_RANK, fan_in)  # [r, in]
            offset += ADAPTER_RANK * fan_in
            b = host[offset : offset + fan_out * ADAPTER_RANK].view(fan_out, ADAPTER_RANK)  # [out, r]
            offset += fan_out * ADAPTER_RANK
            tensors[(layer, name)] = (a, b)
        weights = AdapterWeights(
            rank=ADAPTER_RANK, alpha=ADAPTER_ALPHA, use_rslora=False,
            scaling=lora_scaling(ADAPTER_ALPHA, ADAPTER_RANK, False), tensors=tensors,
        )
        refs.append(AdapterRef(f"ad{index}", 1, weights))
    return refs
