"""Copies between the host and the device that neither sync the stream nor hold the GIL while waiting."""

from __future__ import annotations

import torch


def host_list(tensor: torch.Tensor) -> list:
    """`tensor.tolist()`, but on CUDA the wait for the GPU does not hold the GIL.

    `Tensor.tolist()` on a CUDA tensor copies and synchronizes while holding the GIL, so with the engine in
    a thread of the HTTP process, streaming stalls for the whole GPU time of each step. Here the copy goes
    into pinned memory asynchronously and the wait is `Event.synchronize()`, which releases the GIL: the
    HTTP loop runs while the GPU works."""
    if tensor.device.type != "cuda":
        return tensor.tolist()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    done.synchronize()
    return host.tolist()


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host list -> device tensor without a sync (pinned staging, asynchronous copy on CUDA)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
