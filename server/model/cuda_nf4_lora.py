"""The x-resident NF4 kernel that also computes a LoRA shrink (csrc/nf4_wgmma_resident.cuh's LoRA units; not yet in
the engine: bench.fused_shrink times it against the base kernel and the Triton shrink first).

In a mixed-adapter decode step the shrink h = A_slot(t) x[t] of every token is one dense product over the pool: x
against every row of the linear's lora_a, the pairs of a token and another slot's rows left unread. The resident
kernel already holds x in shared memory for its weight's units; it takes lora_a's 64-row groups as more units, bf16
rows straight into the warpgroup MMA's registers, in the warpgroups that the weight leaves free (8B qkv_proj at 32
rows: 192 weight units a step over 132 SMs of 6 warpgroups). Why: a separate shrink beside a one-wave resident base
kernel finds no SM until the base's blocks retire (bench/NOTES.md, forty-sixth session), so it runs after the base, on
the step's critical path.
"""

from __future__ import annotations

import torch

from server.model.cuda_nf4 import extension
from server.model.cuda_nf4_wgmma import RESIDENT_BLOCK_TOKENS, resident_split_k
from server.model.split_sums import SplitSums


def nf4_wgmma_lora(
    x: torch.Tensor,  # [T, in] bf16 / fp16
    tiled: tuple[torch.Tensor, torch.Tensor],  # nf4_layout.tile_pack(codes, absmax_f, shape)
    shape,  # (out, in)
    code_table: torch.Tensor,  # [16] float32
    lora_a: torch.Tensor,  # [rows, in], x's dtype, contiguous: a LoRA linear's pool
    bias: torch.Tensor | None = None,
    warpgroups: int = 6,
    block_tokens: int = 32,
    split_k: int | None = None,
    num_sms: int = 132,
    defer_sum: bool = False,
) -> tuple[torch.Tensor | SplitSums, torch.Tensor]:
    """(y, h): y = x @ dequant(W)^T (+ bias) as cuda_nf4_wgmma.nf4_wgmma(resident_warpgroups=warpgroups, pairs=True)
    computes it, bit for bit, and h [T, rows] float32 = x @ lora_a^T (fp32 sums added in a varying order)."""
    if block_tokens not in RESIDENT_BLOCK_TOKENS:
        raise ValueError(f"the x-resident kernel takes {RESIDENT_BLOCK_TOKENS} block tokens, got {block_tokens}")
    x = x.contiguous()
    out = torch.empty(x.shape[0], shape[0], device=x.device, dtype=x.dtype)
    if split_k is None:
        split_k = resident_split_k(x.shape[0], shape, num_sms, warpgroups, True, block_tokens)
    partials, h = extension().nf4_wgmma_lora(x, tiled[0], tiled[1], code_table, bias, out, split_k, block_tokens,
                                             warpgroups, lora_a, defer_sum)
    return (out if partials is None else SplitSums(partials, bias, x.dtype)), h
