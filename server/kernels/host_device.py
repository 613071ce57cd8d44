"""Copies between the host and the device that neither sync the stream nor hold the GIL while waiting."""

from __future__ import annotations

import torch


class HostCopy:
    """A device tensor's copy to the host, queued now and read later: on CUDA an asynchronous copy into
    pinned memory and an event, so that work queued after it (the next step) does not delay the read."""

    def __init__(self, tensor: torch.Tensor):
        self.done = None
        if tensor.device.type != "cuda":
            self.host = tensor
            return
        self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self.host.copy_(tensor, non_blocking=True)
        self.done = torch.cuda.Event()
        self.done.record()

    def wait(self) -> list:
        """The values as a list; on CUDA the wait is `Event.synchronize()`, which releases the GIL."""
        if self.done is not None:
            self.done.synchronize()
        return self.host.tolist()


def host_list(tensor: torch.Tensor) -> list:
    """`tensor.tolist()`, but on CUDA the wait for the GPU does not hold the GIL.

    `Tensor.tolist()` on a CUDA tensor copies and synchronizes while holding the GIL, so with the engine in
    a thread of the HTTP process, streaming stalls for the whole GPU time of each step. Here the copy goes
    into pinned memory asynchronously and the wait is `Event.synchronize()`, which releases the GIL: the
    HTTP loop runs while the GPU works."""
    return HostCopy(tensor).wait()


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host list -> device tensor without a sync (pinned staging, asynchronous copy on CUDA)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
