"""One zeroed buffer for every split-K LoRA shrink of a captured decode step.

A shrink that splits `in` across programs adds their fp32 sums into a zeroed h (`triton_lora.lora_shrink`). Each
call zeroing its own h put a fill kernel before every LoRA linear's shrink: 128 launches in an 8B decode step (four
LoRA linears a layer), each a node that the shrink waits on. While a decode graph is captured, the shrinks instead
take their h from one buffer that the step zeroes once, at its start:

    workspace = ShrinkWorkspace()
    with workspace.sizing():            # an uncaptured warm-up forward: each shrink records what it needs
        forward()
    with torch.cuda.graph(graph):
        with workspace.serving(device):  # one zero fill, then each shrink takes its slice in call order
            forward()

Outside both (eager steps, prefills, tests) `take` returns None and the shrink allocates its own zeroed h, as before.
The buffer is an intermediate of the graph like any other (allocated from its pool inside the capture, zeroed by
each replay before any shrink reads it; the side stream that runs the shrinks waits on the capturing stream first).
"""

from __future__ import annotations

import contextlib
import math
import threading

import torch

# Slices start on 64-byte boundaries: Triton specializes pointer arguments on their 16-byte alignment, and a slice
# at an odd offset would build another variant of the shrink and expand kernels.
_ALIGN_ELEMENTS = 16

_active = threading.local()


def _rounded(numel: int) -> int:
    return -(-numel // _ALIGN_ELEMENTS) * _ALIGN_ELEMENTS


class ShrinkWorkspace:
    """The fp32 elements every split-K shrink of one captured forward takes, sized by a warm-up forward."""

    def __init__(self) -> None:
        self.needed = 0
        self.buffer: torch.Tensor | None = None
        self._cursor = 0

    @contextlib.contextmanager
    def sizing(self):
        """Shrinks run in this block only record their sizes (and allocate their own h as usual)."""
        self.needed, self.buffer = 0, None
        with _activated(self):
            yield self

    @contextlib.contextmanager
    def serving(self, device: torch.device | str):
        """Zero one buffer of the recorded size, then hand it out to the shrinks of this block in call order. The
        captured forward may take less than the warm-up did, never more: a shrink that the capture hands to another
        kernel (act_shrink: down_proj's, computed by the activation only while a graph is captured) takes nothing,
        and the slices after it start earlier in the same zeroed buffer."""
        self.buffer = torch.zeros(self.needed, dtype=torch.float32, device=device)
        self._cursor = 0
        with _activated(self):
            yield self

    def take(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor | None:
        numel = _rounded(math.prod(shape))
        if self.buffer is None:
            self.needed += numel
            return None
        if self.buffer.device != torch.device(device):
            raise RuntimeError(f"a shrink on {device} asked the workspace on {self.buffer.device}")
        if self._cursor + numel > self.needed:
            raise RuntimeError(f"a shrink asked for {numel} elements past the workspace's {self.needed}: the "
                               "captured forward differs from the sized one")
        taken = self.buffer[self._cursor:self._cursor + math.prod(shape)].view(shape)
        self._cursor += numel
        return taken


@contextlib.contextmanager
def _activated(workspace: ShrinkWorkspace):
    previous = getattr(_active, "workspace", None)
    _active.workspace = workspace
    try:
        yield
    finally:
        _active.workspace = previous


def take_zeroed(shape: tuple[int, ...], device: torch.device) -> torch.Tensor | None:
    """A zeroed fp32 h of `shape` from the active workspace, or None: no workspace is active, or it is sizing (the
    caller then allocates one)."""
    workspace = getattr(_active, "workspace", None)
    return None if workspace is None else workspace.take(shape, device)
