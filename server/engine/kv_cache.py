"""Paged KV cache: fixed-size blocks preallocated at start, handed out to sequences on demand."""

from __future__ import annotations

import logging
from collections import deque

import torch

log = logging.getLogger(__name__)

BLOCK_SIZE = 16


class KVCache:
    """Per-layer key/value tensors `[num_blocks, block_size, kv_heads, head_dim]` and a free list."""

    def __init__(self, num_layers: int, num_blocks: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, block_size: int = BLOCK_SIZE):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least 1 block")
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks in use, 0..1."""
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        if not self.can_allocate(num_blocks):
            raise RuntimeError(f"KV cache out of blocks ({num_blocks} asked, {len(self._free)} free)")
        return [self._free.popleft() for _ in range(num_blocks)]

    def free(self, block_ids: list[int]) -> None:
        self._free.extend(block_ids)

    def layer_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(zip(self.keys, self.values, strict=True))


def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                    block_size: int = BLOCK_SIZE) -> int:
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()


CPU_KV_CACHE_BYTES = 512 << 20  # default KV cache cap on the CPU


def choose_num_blocks(requested: int | None, memory_fraction: float, per_block: int, device: torch.device,
                      max_batch_size: int, max_model_len: int, block_size: int = BLOCK_SIZE) -> int:
    """Blocks to preallocate: the flag if given, else a fraction of free GPU memory, else (CPU) enough for
    a full batch of max-length sequences but at most CPU_KV_CACHE_BYTES (never less than one sequence):
    uncapped, the embedded model's default batch took 2.9 GB of RAM for a cache the CPU never fills."""
    if requested is not None:
        return requested
    full_batch = max_batch_size * -(-max_model_len // block_size)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(1, int(free * memory_fraction) // per_block)
    one_sequence = -(-max_model_len // block_size)
    return min(full_batch, max(one_sequence, CPU_KV_CACHE_BYTES // per_block))
