"""What the engine derives from its Settings and model when it is built: adapter slot count, adapter
bytes on the device, fair-scheduling state, end-of-sequence ids."""

from __future__ import annotations

import torch

from server.api.auth import tenant_policies
from server.config import Settings
from server.engine.fairness import TenantCounters, TenantPolicy
from server.model.lora import LoraSlots

MAX_ADAPTER_SLOTS = 256


def num_adapter_slots(model, settings: Settings) -> int:
    """GPU adapter slots: max_slots, or as many max_rank slots as adapter_gpu_memory_bytes holds."""
    budget = settings.adapter_gpu_memory_bytes
    if budget is None:
        return settings.max_slots
    per_slot = LoraSlots.slot_nbytes(model, settings.max_rank)
    if budget < per_slot:
        raise ValueError(f"adapter_gpu_memory_bytes ({budget}) holds no adapter slot: one slot of max_rank "
                         f"{settings.max_rank} takes {per_slot} bytes; raise it or lower max_rank")
    return min(MAX_ADAPTER_SLOTS, budget // per_slot)


def adapter_device_nbytes(weights, dtype: torch.dtype) -> int:
    """Bytes an adapter's A and B take on the device in the model's dtype (before slot padding)."""
    element = torch.tensor([], dtype=dtype).element_size()
    return sum((a.numel() + b.numel()) * element for a, b in weights.tensors.values())


def tenant_counters(settings: Settings) -> TenantCounters:
    """Fair-scheduling state: weights and default caps from Settings, per-tenant ones from the keys file."""
    default = TenantPolicy(max_running_requests=settings.tenant_max_running_requests,
                           max_queued_requests=settings.tenant_max_queued_requests)
    return TenantCounters(settings.fair_prompt_token_weight, settings.fair_output_token_weight,
                          tenant_policies(settings.auth_file, default), default,
                          is_fair=settings.scheduling_policy == "fair")


def eos_ids(tokenizer, hf_config) -> set[int]:
    """End-of-sequence token ids from the tokenizer and the model config (either may hold a list)."""
    ids = set()
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(hf_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(value)
    return ids
