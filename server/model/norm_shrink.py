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
from dataclasses import dataclass

import torch

from server.model import lora_ops
from server.model.act_shrink import ShrinkAhead

# Its first form lost 0.2 ms a 32-token step (H100, 8B: its norms took 12.7 and 9.5 us, the plain one 2.2; fifty-second
# session); the second loads A before the norm's wait (triton_norm_shrink).
NORM_SHRINK = int(os.environ.get("LORAPLEX_LORA_NORM_SHRINK", "0"))
_MEMO_KEY = "norm_shrink"
_ALIGN = 16  # elements: each h starts 64-byte aligned (Triton specializes pointers on their 16-byte alignment)


@dataclass
class StepBuffer:
    """Every norm's h of one decode step in one buffer, zeroed once on the side stream at the step's start: a zero
    fill a norm would wait on (an event edge after the kernel ahead) puts a fill between the two kernels and takes
    the programmatic launch's overlap from both. The first norm that takes an h joins the fill; the rest come after
    it on the stream."""

    buffer: torch.Tensor
    cursor: int = 0
    joined: bool = False

    def take(self, rows: int, cols: int) -> torch.Tensor:
        numel = rows * cols
        if self.cursor + numel > self.buffer.numel():
            raise RuntimeError(f"a norm's shrink asked for {numel} elements past the step's {self.buffer.numel()}")
        h = self.buffer[self.cursor : self.cursor + numel].view(rows, cols)
        self.cursor += -(-numel // _ALIGN) * _ALIGN
        if not self.joined:
            torch.cuda.current_stream(h.device).wait_stream(lora_ops.side_stream(h.device))
            self.joined = True
        return h


def begin_step(ctx, layers, num_tokens: int, device: torch.device) -> None:
    """At a decode step's start: one zeroed StepBuffer in ctx.memo for the h of each linear whose norm may take its
    shrink (every layer's gate_up_proj, and qkv_proj but the first layer's, whose norm gathers the embeddings: no
    residual add), where the norms may take them at all (on, enough tokens, adapters, one token a segment, a
    captured step on the Triton path)."""
    if (not NORM_SHRINK or num_tokens < NORM_SHRINK or ctx.is_prefill or ctx.lora is None
            or not lora_ops.forks_beside(device) or not ctx.lora.meta.one_token_segments(num_tokens)):
        return
    linears = [layer.self_attn.qkv_proj for layer in layers[1:]] + [layer.mlp.gate_up_proj for layer in layers]
    numel = sum(-(-num_tokens * len(linear.slice_names) * linear.layout.max_rank // _ALIGN) * _ALIGN
                for linear in linears if getattr(linear, "layout", None) is not None)
    if numel:
        buffer = torch.empty(numel, dtype=torch.float32, device=device)
        lora_ops.on_side_stream(device, buffer.zero_)
        ctx.memo[_MEMO_KEY] = StepBuffer(buffer)


def shrink_ahead(linear, ctx, delta, num_tokens: int) -> ShrinkAhead | None:
    """A ShrinkAhead for `linear` (a LoraLinear) computed by the residual add + norm of `delta` before it, or None
    where the linear keeps its own shrink: no StepBuffer this step (off, fewer tokens than NORM_SHRINK, no adapters,
    an eager step, the torch LoRA path), segments of several tokens, no adapter in the pool, or a delta that is not
    one plain tensor (split-K partials: the norm's chunks would each sum them again)."""
    step = ctx.memo.get(_MEMO_KEY)
    if step is None or getattr(linear, "lora_a", None) is None or not isinstance(delta, torch.Tensor):
        return None
    meta, layout = ctx.lora.meta, linear.layout
    if not meta.one_token_segments(num_tokens) or linear.lora_b.shape[0] == 0 or layout.num_slots == 0:
        return None
    num_slices = len(linear.slice_names)
    return ShrinkAhead(linear.lora_a, layout, meta, step.take(num_tokens, num_slices * layout.max_rank), num_slices)


def add_norm(norm, h: torch.Tensor, delta, linear, ctx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(h + delta, norm(h + delta), the next linear's h or None): norm.add_forward, and in a decode step under
    NORM_SHRINK the shrink of `linear` (which reads the norm) added by the norm's kernel."""
    shrink = shrink_ahead(linear, ctx, delta, h.shape[0])
    if shrink is None:
        return *norm.add_forward(h, delta), None
    from server.model.triton_norm_shrink import add_rmsnorm_shrink

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
