"""Paged KV cache: fixed-size blocks preallocated at start, handed out to sequences on demand.

Automatic prefix caching: a block whose 16 tokens are all computed can be registered under the hash
of its content and everything before it (server.engine.prefix_cache). When its last user frees it,
it keeps its contents and its hash, on an LRU list of evictable blocks; a later request whose prompt
starts with the same blocks (same tokens, same adapter version) takes them instead of recomputing.
Allocation takes never-cached blocks first, then evicts the least recently freed cached block.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque

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
        self._free: deque[int] = deque(range(num_blocks))  # hold nothing anyone may ask for
        self._refs = [0] * num_blocks  # users of each block
        self._hash_of: dict[int, bytes] = {}  # registered blocks -> content hash
        self._block_of: dict[bytes, int] = {}  # content hash -> block
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody uses, LRU first

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: never-cached ones plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._block_of)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks in use, 0..1."""
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def allocate(self, num_blocks: int) -> list[int]:
        if not self.can_allocate(num_blocks):
            raise RuntimeError(f"KV cache out of blocks ({num_blocks} asked, {self.num_free_blocks} free)")
        blocks = []
        for _ in range(num_blocks):
            if self._free:
                block = self._free.popleft()
            else:  # evict the least recently freed cached block
                block, _ = self._evictable.popitem(last=False)
                del self._block_of[self._hash_of.pop(block)]
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def free(self, block_ids: list[int]) -> None:
        for block in block_ids:
            self._refs[block] -= 1
            if self._refs[block] > 0:
                continue
            if block in self._hash_of:
                self._evictable[block] = None  # most recently freed: evicted last
            else:
                self._free.append(block)

    def match_prefix(self, hashes: list[bytes]) -> list[int]:
        """The cached blocks for the longest prefix of `hashes`, each taken for one more user."""
        blocks = []
        for content in hashes:
            block = self._block_of.get(content)
            if block is None:
                break
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
            blocks.append(block)
        return blocks

    def register(self, block: int, content: bytes) -> None:
        """Offer a fully computed block for reuse under `content` (first registration of a hash wins)."""
        if content in self._block_of or block in self._hash_of:
            return
        self._block_of[content] = block
        self._hash_of[block] = content

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
