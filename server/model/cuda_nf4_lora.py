"""The x-resident NF4 kernel that also computes a LoRA shrink (csrc/nf4_wgmma_resident.cuh's LoRA units), for the
decode graphs under LORAPLEX_LORA_FUSED_SHRINK=1 (lora_ops.linear_with_lora; off until bench.fused_shrink and an engine
A/B time it).

In a mixed-adapter decode step the shrink h = A_slot(t) x[t] of every token is one dense product over the pool: x
against every row of the linear's lora_a, of which each token keeps its own slot's. The resident kernel already holds
x in shared memory for its weight's units; it takes lora_a's 64-row groups (of 4 quant blocks of K each) as more
units, bf16 rows straight into the warpgroup MMA's registers, in the warpgroups that the weight leaves free (8B
qkv_proj at 32 rows: 192 weight units a step over 132 SMs of 6 warpgroups), skipping the groups that no token of a
block reads. Why: a separate shrink beside a one-wave resident base kernel finds no SM until the base's blocks retire
(bench/NOTES.md, forty-sixth session), so it runs after the base, on the step's critical path.
"""

from __future__ import annotations

import torch

from server.model import cuda_nf4_wgmma, nf4_dispatch
from server.model.cuda_nf4 import extension
from server.model.cuda_nf4_wgmma import RESIDENT_BLOCK_TOKENS, resident_split_k
from server.model.lora_meta import LoraBatchMeta, SlotLayout
from server.model.shrink_workspace import take_zeroed
from server.model.split_sums import SplitSums

# The most tokens a step takes the fused shrink at: one 32-token block (more would read the pool once a block)
MAX_ROWS = 32
DEFAULT_WARPGROUPS = 6  # where start-up tuning chose no x-resident kernel for the shape and rows
# At 32 block tokens 7 warpgroups (72 registers a thread) leave the LoRA units too few: ptxas serializes every wgmma
# of that instance (C7512), so it is not built, and a linear tuned to 7 there (8B gate_up) keeps its side-stream shrink
MAX_WARPGROUPS_32 = 6


def shrink_in_base(base, x: torch.Tensor, lora_a: torch.Tensor, layout: SlotLayout, meta: LoraBatchMeta,
                   num_slices: int, defer_sum: bool = False) -> tuple[torch.Tensor | SplitSums, torch.Tensor] | None:
    """(base(x) or its partials with `defer_sum`, h) from one x-resident kernel (nf4_wgmma_lora) for an NF4 base
    (quant.NF4Linear with its tile layout) of up to MAX_ROWS tokens a step on an sm_90a build; else None, and the
    caller runs the shrink itself. The kernel's warpgroups, block tokens and splits are start-up tuning's where it
    chose the x-resident kernel for this shape and row count, with its splits (so y has the base's bits), else
    DEFAULT_WARPGROUPS; h comes zeroed from the step's workspace (shrink_workspace, kind "fused") or is allocated.
    Declines, rather than fail in a capture, whatever the kernel's checks refuse (not bf16, misaligned, too large)."""
    tiled, rows = getattr(base, "tiled", None), x.shape[0]
    if (tiled is None or not x.is_cuda or rows > MAX_ROWS or x.shape[1] % 64 or x.dtype != torch.bfloat16
            or lora_a.dtype != x.dtype or not lora_a.is_contiguous() or lora_a.numel() >= 1 << 31
            or (x.data_ptr() | lora_a.data_ptr()) % 16 or not cuda_nf4_wgmma.wgmma_supported()):
        return None
    from server.model.triton_nf4 import device_num_sms

    shape, num_sms = (base.out_features, base.in_features), device_num_sms(x.device.index or 0)
    choice = nf4_dispatch.TUNED.get((shape, rows))
    options = dict(choice.options) if choice is not None and choice.kernel == "wgmma" else {}
    if options.get("resident_warpgroups"):  # the base's own splits: the same sums in the same order, the same bits
        warpgroups, block_tokens = options["resident_warpgroups"], options.get("block_tokens", 32)
        split_k = options.get("split_k") or resident_split_k(rows, shape, num_sms, warpgroups,
                                                             options.get("pairs", False), block_tokens)
    else:
        warpgroups, block_tokens, split_k = DEFAULT_WARPGROUPS, 16 if rows <= 16 else 32, None
    if block_tokens == 32 and warpgroups > MAX_WARPGROUPS_32:
        return None  # 6 would slow the base itself (H200, 8B gate_up at 32 rows: 45.3 us against 40.2 at 7)
    columns = num_slices * layout.max_rank
    h = take_zeroed((rows, columns), x.device, kind="fused")
    if h is None:
        h = torch.zeros(rows, columns, dtype=torch.float32, device=x.device)
    return nf4_wgmma_lora(x, tiled, shape, base.quant_state.code, lora_a, layout, meta, num_slices, h=h,
                          bias=base.bias, warpgroups=warpgroups, block_tokens=block_tokens, split_k=split_k,
                          num_sms=num_sms, defer_sum=defer_sum)


def nf4_wgmma_lora(
    x: torch.Tensor,  # [T, in] bf16
    tiled: tuple[torch.Tensor, torch.Tensor],  # nf4_layout.tile_pack(codes, absmax_f, shape)
    shape,  # (out, in)
    code_table: torch.Tensor,  # [16] float32
    lora_a: torch.Tensor,  # [num_slices * capacity, in], x's dtype, contiguous: a LoRA linear's pool
    layout: SlotLayout,
    meta: LoraBatchMeta,
    num_slices: int,
    h: torch.Tensor | None = None,  # [T, >= num_slices * max_rank] float32, zeroed; None: allocated here
    bias: torch.Tensor | None = None,
    warpgroups: int = 6,
    block_tokens: int = 32,
    split_k: int | None = None,
    num_sms: int = 132,
    defer_sum: bool = False,
) -> tuple[torch.Tensor | SplitSums, torch.Tensor]:
    """(y, h): y = x @ dequant(W)^T (+ bias) as cuda_nf4_wgmma.nf4_wgmma(resident_warpgroups=warpgroups, pairs=True)
    computes it, bit for bit, and h[t, :num_slices * r] = the token's slot's A @ x[t] in fp32, as
    triton_lora.lora_shrink lays it out (zeros past a token's columns and for a token without a slot; its sums added
    in a varying order)."""
    if block_tokens not in RESIDENT_BLOCK_TOKENS:
        raise ValueError(f"the x-resident kernel takes {RESIDENT_BLOCK_TOKENS} block tokens, got {block_tokens}")
    x = x.contiguous()
    out = torch.empty(x.shape[0], shape[0], device=x.device, dtype=x.dtype)
    if h is None:
        h = torch.zeros(x.shape[0], num_slices * layout.max_rank, dtype=torch.float32, device=x.device)
    if split_k is None:
        split_k = resident_split_k(x.shape[0], shape, num_sms, warpgroups, True, block_tokens)
    partials = extension().nf4_wgmma_lora(x, tiled[0], tiled[1], code_table, bias, out, split_k, block_tokens,
                                          warpgroups, lora_a, meta.token_slots, layout.offsets, layout.ranks,
                                          num_slices, h, defer_sum)
    return (out if partials is None else SplitSums(partials, bias, x.dtype)), h
