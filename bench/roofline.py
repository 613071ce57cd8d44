"""Memory-bandwidth roofline of a decode step: the bytes it must read / the bandwidth measured here."""

from __future__ import annotations

import statistics
import time
from typing import Any

from bench.shapes import adapter_params, linear_params

NF4_BYTES_PER_PARAM = 0.52  # 4-bit codes (0.5) + double-quantized absmax per 64-block
HEAD_BYTES_PER_PARAM = 2  # 16-bit LM head
KV_BYTES_PER_VALUE = 2  # bf16 KV cache
ADAPTER_BYTES_PER_PARAM = 2  # bf16 slot tensors


def measure_bandwidth(device, num_bytes: int = 2 << 30, iters: int = 10) -> dict[str, Any]:
    """Device-to-device bandwidth of one large `copy_`: (bytes read + bytes written) / time."""
    import torch

    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    src.fill_(1)
    for _ in range(2):
        dst.copy_(src)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    del src, dst
    moved = 2 * num_bytes
    return {
        "copy_bytes": num_bytes, "iters": iters,
        "gbps_best": moved / min(times) / 1e9,
        "gbps_median": moved / statistics.median(times) / 1e9,
    }


def decode_step_bytes(shape: dict[str, Any], batch: int, context: float, num_adapters: int = 0,
                      rank: int = 16) -> dict[str, float]:
    """Bytes one decode step must read: NF4 linears, 16-bit LM head, the KV cache of every row at
    `context` tokens, and the slot tensors of `num_adapters` distinct adapters."""
    weights = linear_params(shape) * NF4_BYTES_PER_PARAM
    head = shape["vocab_size"] * shape["hidden_size"] * HEAD_BYTES_PER_PARAM
    kv = 2 * shape["num_layers"] * context * shape["num_kv_heads"] * shape["head_dim"] * KV_BYTES_PER_VALUE * batch
    adapters = num_adapters * adapter_params(shape, rank) * ADAPTER_BYTES_PER_PARAM
    return {"weights": weights, "lm_head": head, "kv_cache": kv, "adapters": adapters,
            "total": weights + head + kv + adapters}


def roofline(shape: dict[str, Any], measured: dict[str, Any] | None, bandwidth_gbps: float | None,
             num_adapters: int = 0) -> dict[str, Any] | None:
    """Roofline step time for a measured configuration and the fraction of it the engine reaches."""
    if not measured or "error" in measured or not bandwidth_gbps:
        return None
    step_ms = measured.get("decode_step_ms_median")
    context = measured.get("mean_context")
    if not step_ms or not context:
        return None
    parts = decode_step_bytes(shape, measured["batch"], context, num_adapters)
    roofline_ms = parts["total"] / (bandwidth_gbps * 1e9) * 1e3
    return {
        "batch": measured["batch"], "mean_context": context, "bytes": parts,
        "bandwidth_gbps": bandwidth_gbps, "roofline_step_ms": roofline_ms,
        "measured_step_ms": step_ms, "fraction": roofline_ms / step_ms,
    }
