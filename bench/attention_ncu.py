"""Launch the decode step's attention kernel at the 8B batch-32 engine shape for Nsight Compute (run under ``ncu``;
times nothing itself):

    ncu --clock-control none --kernel-name regex:_decode_kernel --launch-skip 1 --launch-count 1 \
        --section SpeedOfLight --section WarpStateStats ... python -m bench.attention_ncu

The shape is the engine bench's merged batch-32 step: 32 rows of 192 positions (the new token's included), Hq 32,
Hkv 8, head dim 128, blocks of 16 positions, qkv as two split-K partials (rotary_decode_attention_triton, the
step's path). The first launch compiles (skip it); the cache is flushed before each profiled one by ncu's default
cache control, as a step meets each layer's cache cold."""

from __future__ import annotations

import argparse

import torch

from server.kernels.split_sums import SplitSums


def decode_inputs(rows: int, context: int, num_q_heads: int = 32, num_kv_heads: int = 8, head_dim: int = 128,
                  block_size: int = 16, splits: int = 2, seed: int = 0, device: str = "cuda"):
    """(qkv partials, rope, slots, k_cache, v_cache, block_tables, context_lens) on `device`: each row's blocks
    shuffled over the cache, its new token's slot at its last position."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_row = -(-context // block_size)
    num_blocks = rows * blocks_per_row + 8
    order = torch.randperm(num_blocks, generator=gen)[: rows * blocks_per_row].view(rows, blocks_per_row)
    tables = torch.zeros(rows, max(16, blocks_per_row), dtype=torch.int32)
    tables[:, :blocks_per_row] = order.int()
    lens = torch.full((rows,), context, dtype=torch.int32)
    slots = (order[:, (context - 1) // block_size] * block_size + (context - 1) % block_size).long()
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).bfloat16()
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).bfloat16()
    width = (num_q_heads + 2 * num_kv_heads) * head_dim
    partials = torch.randn(splits, rows, width, generator=gen) / splits
    angles = torch.rand(rows, head_dim // 2, generator=gen) * 6.28
    angles = torch.cat([angles, angles], dim=-1)
    rope = torch.stack([angles.cos(), angles.sin()], dim=1)
    qkv = SplitSums(partials.to(device), None, torch.bfloat16)
    return qkv, *(t.to(device) for t in (rope, slots, k_cache, v_cache, tables, lens))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--context", type=int, default=192)
    parser.add_argument("--launches", type=int, default=2, help="the first compiles")
    args = parser.parse_args()
    from server.kernels.attention.triton_attention import rotary_decode_attention_triton

    qkv, rope, slots, k_cache, v_cache, tables, lens = decode_inputs(args.rows, args.context)
    for _ in range(args.launches):
        rotary_decode_attention_triton(qkv, 32, rope, k_cache, v_cache, slots, tables, lens, 128**-0.5)
    torch.cuda.synchronize()
    print(f"launched the decode kernel {args.launches} times: {args.rows} rows of {args.context} positions")


if __name__ == "__main__":
    main()
