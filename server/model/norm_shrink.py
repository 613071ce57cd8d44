"""qkv_proj's and gate_up_proj's LoRA shrinks done by the residual add + norm before them (LORAPLEX_LORA_NORM_SHRINK:
from how many tokens; 0, the default, for never until an engine A/B on the GPU says otherwise).

In a decode graph each LoRA linear's shrink runs on the side stream beside its base matmul (lora_ops.linear_with_lora),
but every 32-row NF4 base is a resident one-wave grid, so the shrink's blocks get SMs only as the base's retire and
end after it, on the step's critical path: qkv's 5.3 us, gate_up's 4.4 us after their bases (H200, 8B, 32 adapters,
forty-sixth session's layer window). The activation already computes down_proj's shrink that way (act_shrink); here
the norm ahead of qkv and of gate_up does the same for its linear (triton_norm_shrink: the norm over a row's chunks,
each adding its chunk's share of the shrink into h), so those linears run the base and the expand from that h, with
no shrink and no fork. The estimate: each norm grows by its A's read at the bandwidth (qkv 12.6 MB, gate_up 8.4 MB
for 32 8B rank-16 adapters: ~3 and ~2 us on the H200) where the shrinks' tails were 5.3 and 4.4 us.
"""

from __future__ import annotations

import os

import torch

from server.model import act_shrink, lora_ops
from server.model.act_shrink import ShrinkAhead

NORM_SHRINK = int(os.environ.get("LORAPLEX_LORA_NORM_SHRINK", "0"))


def shrink_ahead(linear, lora, delta, num_tokens: int, device: torch.device) -> ShrinkAhead | None:
    """A ShrinkAhead for `linear` (a LoraLinear) computed by the residual add + norm of `delta` before it, or None
    where the linear keeps its own shrink: off, fewer tokens than NORM_SHRINK, no adapters, an eager step, segments
    of several tokens, the torch LoRA path, or a delta that is not one plain tensor (no residual add, or split-K
    partials: the norm's chunks would each sum them again). Its h is zeroed on the side stream."""
    if not NORM_SHRINK or num_tokens < NORM_SHRINK or lora is None or getattr(linear, "lora_a", None) is None:
        return None
    if not isinstance(delta, torch.Tensor) or not lora_ops.forks_beside(device):
        return None
    meta, layout = lora.meta, linear.layout
    if not meta.one_token_segments(num_tokens) or linear.lora_b.shape[0] == 0 or layout.num_slots == 0:
        return None
    num_slices = len(linear.slice_names)
    h = torch.empty(num_tokens, num_slices * layout.max_rank, dtype=torch.float32, device=device)
    lora_ops.on_side_stream(device, h.zero_)
    return ShrinkAhead(linear.lora_a, layout, meta, h, num_slices)


def add_norm(norm, h: torch.Tensor, delta, linear, lora,
             decode: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(h + delta, norm(h + delta), the next linear's h or None): norm.add_forward, and in a decode step under
    NORM_SHRINK the shrink of `linear` (which reads the norm) added by the norm's kernel."""
    shrink = shrink_ahead(linear, lora, delta, h.shape[0], h.device) if decode else None
    if shrink is None:
        return *norm.add_forward(h, delta), None
    from server.model.triton_norm_shrink import add_rmsnorm_shrink

    act_shrink.ready(shrink)
    return *add_rmsnorm_shrink(h, delta.contiguous(), norm.weight, norm.eps, shrink), shrink.h


def shrink_reference(x: torch.Tensor, shrink: ShrinkAhead) -> None:
    """Add each token's slot's A rows (num_slices x rank of them) @ x[t] (fp32) into shrink.h: what the norm's kernel
    adds."""
    n = shrink.num_slices
    offsets, ranks = shrink.layout.offsets.tolist(), shrink.layout.ranks.tolist()
    for t, s in enumerate(shrink.meta.token_slots.tolist()):
        if s >= 0:
            o, r = offsets[s], ranks[s]
            shrink.h[t, : n * r] += shrink.lora_a[n * o : n * (o + r)].float() @ x[t].float()
