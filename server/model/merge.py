"""Merged mode: one adapter's B·A·scale lives inside the base weights; swapping is exact.

Naive dequantize -> add -> requantize -> subtract drifts on an NF4 base (the subtraction works on
requantized codes). We never subtract: a pristine copy of every base layer's exact stored tensors
(NF4 codes + absmax, or the 16-bit weight) is kept, and every swap rebuilds the live tensors from it:
`live = quantize(dequantize(pristine) + delta_new)`, or `live = pristine` to return to the base. Live
tensors are written in place, so the model (and any captured CUDA graph) keeps its buffers.
Cost: one extra copy of the base linears (0.53 byte/param for NF4), allocated only in merged mode.
"""

from __future__ import annotations

import dataclasses
import time

import torch


class MergedSwapper:
    """Holds the pristine base tensors and which adapter is currently merged."""

    def __init__(self, model):
        self.model = model
        self._linears = model.lora_linears()
        self._pristine = [
            {name: t.clone() for name, t in linear.base.state_tensors().items()} for _, linear in self._linears
        ]
        self._dirty = [False] * len(self._linears)
        self.current: tuple[str, int] | None = None  # (adapter name, version) merged now; None = base
        # The merged sum is formed in the compute dtype (bf16 on GPU): NF4 requantization error is
        # orders of magnitude above bf16 rounding, and it halves the bytes a swap moves vs float32.
        self.merge_dtype = model.dtype
        self.last_swap_seconds = 0.0

    @torch.no_grad()
    def swap(self, key: tuple[str, int] | None, adapter=None) -> float:
        """Make `adapter` (None = base) the merged one; return the seconds it took."""
        if key == self.current:
            return 0.0
        start = time.perf_counter()
        if adapter is not None:
            adapter = _on_device(adapter, self.model.device)
        for i, (layer, linear) in enumerate(self._linears):
            targeted = adapter is not None and linear.targets(layer, adapter)
            if self._dirty[i]:
                # A layer requantized next skips rebuilding its forward copies (NF4: absmax_f and the tile
                # layout), which load_weight rebuilds; it stays dirty until then, so a swap that fails between
                # the two leaves it to the next swap's full restore.
                linear.base.load_state_tensors(self._pristine[i], derive=not targeted)
                self._dirty[i] = targeted
            if targeted:
                weight = linear.base.dequantize(self.merge_dtype)
                linear.add_delta_(weight, layer, adapter)
                linear.base.load_weight(weight)
                self._dirty[i] = True
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
        self.current = key
        self.last_swap_seconds = time.perf_counter() - start
        return self.last_swap_seconds

    def warm_up(self) -> float:
        """Swap a zero rank-1 adapter on every linear in and back out, twice: the first round builds the
        kernels (seconds on a fresh GPU, which would otherwise stall the first real swap and skew auto
        mode's cost estimate), the second is timed. Returns its mean swap time; the weights end pristine."""
        from adapters_store import AdapterWeights

        tensors = {}
        for layer, linear in self._linears:
            for i, name in enumerate(linear.slice_names):
                width = linear.slice_offsets[i + 1] - linear.slice_offsets[i]
                tensors[(layer, name)] = (torch.zeros(1, linear.in_features), torch.zeros(width, 1))
        zero = AdapterWeights(rank=1, alpha=1.0, use_rslora=False, scaling=1.0, tensors=tensors)
        times = []
        for _ in range(2):
            times = [self.swap(("warm-up", 0), zero), self.swap(None)]
        return sum(times) / len(times)

    def is_pristine(self) -> bool:
        """True when every live base tensor equals its pristine copy bit for bit."""
        for (_, linear), saved in zip(self._linears, self._pristine, strict=True):
            for name, live in linear.base.state_tensors().items():
                if not torch.equal(live, saved[name]):
                    return False
        return True

    @property
    def pristine_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for saved in self._pristine for t in saved.values())


def _on_device(adapter, device: torch.device):
    """The adapter with all A/B tensors moved in one burst of async copies (one sync, not hundreds)."""
    if device.type != "cuda":
        return adapter
    moved = {
        key: (a.to(device, non_blocking=True), b.to(device, non_blocking=True))
        for key, (a, b) in adapter.tensors.items()
    }
    return dataclasses.replace(adapter, tensors=moved)
