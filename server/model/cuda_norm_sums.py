"""The residual add + RMS norm over a linear's unsummed split-K partials with a thread-block cluster a row
(csrc/norm_sums.cu): glue_ops.add_rmsnorm's path on sm_90+ for o_proj's and down_proj's deferred sums
(llama.defer_norm_sums, LORAPLEX_NORM_SPLIT_SUMS=1). The same values as the sum kernel then the norm: the output summed
bit for bit, the norm up to the order of its sum of squares (the blocks' sums added in rank order: deterministic)."""

from __future__ import annotations

import functools

import torch

from server.model.split_sums import SplitSums

MAX_COLS = 8 * 512 * 2  # csrc's kNormCluster blocks x kNormThreads threads x kNormValues columns


@functools.cache
def _supported(device_index: int) -> bool:
    """Thread-block clusters (sm_90+) and the extension built."""
    if torch.cuda.get_device_capability(device_index) < (9, 0):
        return False
    from server.model import cuda_nf4

    return cuda_nf4.is_available()


def usable(h: torch.Tensor, delta) -> bool:
    """Whether split_sums_add_rmsnorm can take (h, delta): partials without a LoRA delta, on a Hopper GPU."""
    return (isinstance(delta, SplitSums) and delta.delta is None and h.is_cuda and h.is_contiguous()
            and h.dtype in (torch.bfloat16, torch.float16) and delta.dtype == h.dtype and h.shape[1] <= MAX_COLS
            and delta.partials.is_contiguous() and _supported(h.device.index or 0))


def split_sums_add_rmsnorm(h: torch.Tensor, sums: SplitSums, weight: torch.Tensor, eps: float):
    """(h + the summed output, its RMS norm times weight), as glue_ops.add_rmsnorm."""
    from server.model import cuda_nf4

    h_out, y = cuda_nf4.extension().split_sums_add_rmsnorm(sums.partials, sums.bias, h, weight.contiguous(), eps)
    return h_out, y
