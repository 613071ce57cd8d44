"""What the engine derives from its Settings and model when it is built: the adapter pool's size
(in rank units), fair-scheduling state, end-of-sequence ids."""

from __future__ import annotations

from pathlib import Path

import torch

from server.api.auth import tenant_policies
from server.config import Settings
from server.engine.fairness import TenantCounters, TenantPolicy
from server.engine.rank_pool import block_size
from server.kernels.backends import triton_available
from server.kernels.lora import lora_ops
from server.model.loader import load_phase, read_generation_config
from server.model.lora import LoraSlots


def adapter_pool_units(model, settings: Settings) -> int:
    """Rank units of the GPU adapter pool (`rank_pool`): adapter_gpu_memory_bytes over the bytes of one
    unit, or, unset, room for max_slots adapters of max_rank, or (CUDA) adapter_gpu_memory_fraction of
    the free device memory if that is more. Raises if it cannot hold one adapter of max_rank."""
    per_unit = LoraSlots.rank_nbytes(model)
    budget = settings.adapter_gpu_memory_bytes
    if budget is None:
        budget = settings.max_slots * settings.max_rank * per_unit
        if model.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(model.device)
            budget = max(budget, int(free * settings.adapter_gpu_memory_fraction))
    units = budget // per_unit
    while units > 0 and LoraSlots.pool_nbytes(model, units) > budget:  # alignment padding (odd shapes only)
        units -= 1
    if units < block_size(settings.max_rank):
        raise ValueError(f"adapter_gpu_memory_bytes ({budget}) holds no adapter of max_rank {settings.max_rank}: "
                         f"that takes {block_size(settings.max_rank) * per_unit} bytes; raise it or lower max_rank")
    return units


def allocate_adapter_pool(model, units: int, max_rank: int, num_slot_ids: int) -> LoraSlots:
    """The rank pools of every LoRA linear, allocated once (a load phase: it can take seconds on a GPU)."""
    with load_phase("adapter pool", f"{units} rank units, {units * LoraSlots.rank_nbytes(model) / 2**20:.0f} MiB"):
        slots = LoraSlots(model, units, max_rank, num_slot_ids)
        slots.warm_up_copies()
    if model.device.type == "cuda" and lora_ops.USE_TRITON_LORA and triton_available():
        from server.kernels.lora import triton_lora

        with load_phase("lora kernels", "every Triton LoRA variant a prefill can meet, built before serving"):
            triton_lora.warm_up([linear for _, linear in model.lora_linears()], slots.layout, model.device)
    if slots.use_scatter:
        # Whatever the LoRA kernels: a float32 engine loads slots with the scatter kernel too, and would
        # otherwise build it (about a second) inside its first load.
        from server.kernels.lora import triton_slot_load

        with load_phase("slot load kernel", "the scatter kernel for every source dtype"):
            triton_slot_load.warm_up(slots.flat)
    return slots


def tenant_counters(settings: Settings) -> TenantCounters:
    """Fair-scheduling state: weights and default caps from Settings, per-tenant ones from the keys file."""
    default = TenantPolicy(max_running_requests=settings.tenant_max_running_requests,
                           max_queued_requests=settings.tenant_max_queued_requests)
    return TenantCounters(settings.fair_prompt_token_weight, settings.fair_output_token_weight,
                          tenant_policies(settings.auth_file, default), default,
                          is_fair=settings.scheduling_policy == "fair")


def eos_ids(tokenizer, hf_config, hf_dir: Path | None = None) -> set[int]:
    """End-of-sequence token ids from the tokenizer, the model config and, as vLLM takes them, the model's
    generation_config.json (instruct models list their end-of-turn tokens there; any may hold a list)."""
    generation_eos = None if hf_dir is None else read_generation_config(hf_dir).get("eos_token_id")
    ids = set()
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(hf_config, "eos_token_id", None), generation_eos):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(value)
    return ids
