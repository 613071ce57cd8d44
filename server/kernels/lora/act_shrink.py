"""down_proj's LoRA shrink done by the activation kernel before it (LORAPLEX_LORA_SILU_SHRINK: from how many tokens).

In a decode graph each LoRA linear's shrink runs on the side stream beside its base matmul (lora_ops.linear_with_lora).
down's is the one that cannot hide there: its input is the activation, so the shrink (14.7 MB of A for 32 8B
rank-16 adapters) becomes ready together with down's NF4 kernel, waits ~17 us for SMs that the kernel holds, and
ends ~8 us after it, on the step's critical path (forty-first session's layer window, H100). Here the activation
kernel (triton_glue.silu_mul), which already holds each token's rounded activation at its program's columns, also
multiplies it by those columns of the token's slot's A_down and adds the [rank] partial sums into h (fp32, zeroed
beforehand on the side stream, atomic adds across the programs of a row, as the split-K shrink adds its splits);
down_proj then runs its base matmul and the expand from that h, with no shrink and no fork. The estimate
(bench/NOTES.md, forty-fourth session): ~3 us a layer, the shrink's lag less the activation kernel's extra A loads.

The same for qkv_proj's and gate_up_proj's shrinks, done by the residual add + RMSNorm before each
(LORAPLEX_LORA_NORM_SHRINK, "norm_shrink"), was measured and removed. Its first form (A loaded after the norm) lost
0.2 ms a 32-token step (H100, 8B, fifty-second session). Its second (A loaded before the norm's PDL wait, one relaxed
atomic add a row) was neutral (H100, 8B engine, fifty-third session; ms a step, default / norm_shrink: one adapter at
batch 32 4.596 / 4.581, 8 adapters 4.703 / 4.684, 32 adapters 5.193 / 5.200, merged 3.723 / 3.737; the mixed32
profile's wall 5.232 / 5.221): a layer took 147.8 / 149.2 us, its norms 6.4-8.6 us against 2.0-2.7, the A reads
landing on the critical path as much as the side shrinks' tails they removed (qkv +4.3 us, gate_up +4.2). Designs in
git: 7b493e8 (first form), 1f2972b (second).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from server.kernels.lora import lora_ops
from server.kernels.lora.lora_meta import LoraBatchMeta, SlotLayout

# The fewest tokens a decode step has for the activation to take down's shrink (0: never). H200, 8B engine bench
# (bench/NOTES.md, forty-sixth session): batch 32 with one adapter 4.401 -> 4.291 ms a step, with 32 distinct
# 4.760 -> 4.706, but batch 1 3.057 -> 3.185 (one token's activation kernel then waits on A_down's loads that its
# own shrink would have hidden beside down's base matmul).
SILU_SHRINK = int(os.environ.get("LORAPLEX_LORA_SILU_SHRINK", "2"))


@dataclass(frozen=True)
class ShrinkAhead:
    """What the activation kernel needs to compute down_proj's h: down's A pool (one slice), the shared slot
    layout, the step's metadata (one-token segments), and h itself [T, max_rank] float32, zeroed."""

    lora_a: torch.Tensor  # [capacity, in]
    layout: SlotLayout
    meta: LoraBatchMeta
    h: torch.Tensor


def shrink_ahead(down, lora, num_tokens: int, device: torch.device) -> ShrinkAhead | None:
    """A ShrinkAhead for down_proj (a LoraLinear of one slice) in this step, or None where its own shrink runs:
    off, fewer tokens than SILU_SHRINK, no adapters, an eager step, segments of several tokens, or the torch LoRA
    path. Its h is zeroed on the side stream, which the capturing stream joins before the activation (`ready`)."""
    if not SILU_SHRINK or num_tokens < SILU_SHRINK or lora is None or getattr(down, "lora_a", None) is None:
        return None
    meta, layout = lora.meta, down.layout
    if not lora_ops.forks_beside(device):
        return None
    if (len(down.slice_names) != 1 or not meta.one_token_segments(num_tokens) or down.lora_b.shape[0] == 0
            or layout.num_slots == 0):
        return None
    h = torch.empty(num_tokens, layout.max_rank, dtype=torch.float32, device=device)
    lora_ops.on_side_stream(device, h.zero_)
    return ShrinkAhead(down.lora_a, layout, meta, h)


def ready(shrink: ShrinkAhead | None) -> None:
    """Order the capturing stream after the side stream's zero fill of shrink.h (already ordered when gate_up's
    LoRA join came after it, as it does in a decode layer; one more edge to the same node otherwise)."""
    if shrink is not None:
        torch.cuda.current_stream(shrink.h.device).wait_stream(lora_ops.side_stream(shrink.h.device))


def shrink_reference(act: torch.Tensor, shrink: ShrinkAhead) -> None:
    """Add each token's A_down @ act[t] (fp32) into shrink.h: what the activation kernel adds, for the paths
    without it."""
    offsets, ranks = shrink.layout.offsets.tolist(), shrink.layout.ranks.tolist()
    for t, s in enumerate(shrink.meta.token_slots.tolist()):
        if s >= 0:
            o, r = offsets[s], ranks[s]
            shrink.h[t, :r] += shrink.lora_a[o : o + r].float() @ act[t].float()
