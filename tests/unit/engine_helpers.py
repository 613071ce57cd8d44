"""Test helpers: run our model directly on a batch of sequences, build engines on tiny models."""

from __future__ import annotations

from pathlib import Path

import torch

from server.config import Settings
from server.engine.engine import LLMEngine
from server.engine.kv_cache import KVCache
from server.model.llama import PrefillSeq, StepContext
from server.model.loader import load_hf_dir


def load_tiny(model_dir: Path, quantize: bool = False, dtype=torch.float32):
    return load_hf_dir(model_dir, device=torch.device("cpu"), dtype=dtype, quantize=quantize)


def attach_cache(model, num_blocks: int = 64) -> KVCache:
    cfg = model.config
    cache = KVCache(cfg.num_layers, num_blocks, cfg.num_kv_heads, cfg.head_dim, model.dtype, model.device)
    model.kv_cache = cache.layer_caches()
    return cache


@torch.inference_mode()
def prefill_logits(model, cache: KVCache, token_ids: list[int], lora=None) -> tuple[torch.Tensor, list[int]]:
    """All-position logits [len, vocab] of one sequence prefilled in one chunk; returns its blocks."""
    n = len(token_ids)
    blocks = cache.allocate(cache.blocks_needed(n))
    slots = [blocks[p // cache.block_size] * cache.block_size + p % cache.block_size for p in range(n)]
    ctx = StepContext(
        is_prefill=True,
        slot_mapping=torch.tensor(slots),
        prefill_seqs=[PrefillSeq(0, n, n, torch.tensor(blocks))],
        lora=lora,
    )
    hidden = model(torch.tensor(token_ids), torch.arange(n), ctx)
    return model.compute_logits(hidden), blocks


def make_engine(model_dir: Path, **overrides) -> LLMEngine:
    settings = Settings(model=str(model_dir), device="cpu", quantization=overrides.pop("quantization", "none"),
                        dtype="float32", cuda_graphs=False, **overrides)
    loaded = load_hf_dir(model_dir, device=torch.device("cpu"), dtype=torch.float32,
                         quantize=settings.quantization == "nf4")
    return LLMEngine(loaded, settings)


def record_preemptions(engine: LLMEngine) -> list:
    """From now on, collect every request the engine's scheduler preempts (the list fills as it runs)."""
    preempted = []
    schedule = engine.scheduler.schedule

    def recording(*args):
        batch = schedule(*args)
        preempted.extend(batch.preempted)
        return batch

    engine.scheduler.schedule = recording
    return preempted
