"""Programmatic dependent launch (PDL) of a step's kernels, Hopper (sm_90+) and later; on by default, LORAPLEX_PDL=0
turns it off (A/B runs).

A kernel launched with the attribute may start while the kernel ahead of it in the stream finishes: its launch, and
what it does before it needs that kernel's output (the NF4 kernels: stage the code table, load their first weight
codes, which no kernel of a step writes), overlap the other's tail. Each such kernel waits for the kernel ahead
(`griddepcontrol.wait`) before it reads an activation or stores anything, then lets the kernel behind it launch
(`griddepcontrol.launch_dependents`), so at most one kernel runs ahead and a kernel's completion still implies every
earlier kernel's. Launches without the attribute (torch's own ops, cuBLAS, the LoRA kernels) keep plain stream order,
which is always safe beside these. The kernels that take part: the CUDA NF4 kernels and their split-K sum
(csrc/nf4_device.cuh, `wait_for_prior_grid`), and the decode step's Triton glue: the residual add + norm, silu * up,
the decode attention and its split merge (`triton_pdl.pdl_enter`); with LORA, the LoRA kernels.

Why: a decode step is ~10 kernels a layer, each short (2-47 us for the 8B shape at batch 32), with ~0.4 us between
them and a tail where part of the SMs idle (H100 profile, bench/results/2026-12-06-nvidia-h100-80gb-hbm3-8b-b32-
merged-profile-s40.json). The twelfth session's PDL (the tile kernel and its sum at one row, waiting but never
triggering its dependents, so each launch still waited for the whole kernel ahead) gained nothing; this one releases
the next kernel as soon as its own wait is over.

Measured (H100, forty-third session, 8B engine bench, one call each way: bench/results/2026-12-06-nvidia-h100-80gb-
hbm3-8b-s43-pdl-off.json against -8b-s43-pdl-ab.log): batch-1 decode 344.5 -> 369.3 tokens/s, the merged batch-32
step 3.859 -> 3.658 ms (roofline fraction 0.472 -> 0.496), 32 distinct adapters 5.430 -> 5.206 ms, context 2,048
6.578 -> 6.391 ms; swaps still bit-exact. The whole GPU suite passed with it on (882 tests, -gpu-tests-s43-pdl.log),
and the default-on engine bench gave the same again (-8b-s43.json: 369.1 tokens/s, 3.658 ms). The LoRA kernels do not
take part yet, so the adapters' share of a step grew (mixed32/merged 0.723 -> 0.710).
"""

from __future__ import annotations

import functools
import os

import torch

ENABLED = os.environ.get("LORAPLEX_PDL", "1") != "0"
# The LoRA kernels (shrink, expand, and the decode step's expand + sum, side delta and its add) take part too only with
# LORAPLEX_PDL_LORA=1. The GPU tests pass with it (forty-fourth session, H100); the 8B step with 32 distinct adapters
# took 5.150 ms against 5.241 in bench.profile_step's wall but 5.187 against 5.171 in the engine bench (with
# LORAPLEX_DECODE_FRESH_KV=1 beside it): within the spread, so off until a clean A/B says otherwise.
LORA = os.environ.get("LORAPLEX_PDL_LORA", "0") == "1"


@functools.cache
def _capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def supported(device: torch.device) -> bool:
    """Whether `device` can launch programmatically dependent kernels (CUDA, sm_90+)."""
    return device.type == "cuda" and _capable(device.index or 0)


def on(device: torch.device) -> bool:
    """Whether kernels launched on `device` launch programmatically dependent (not LORAPLEX_PDL=0, and supported)."""
    return ENABLED and supported(device)


def triton_launch(device: torch.device, lora: bool = False) -> dict:
    """The Triton launch options (and the kernels' PDL constexpr) for a kernel that calls triton_pdl.pdl_enter; a
    LoRA kernel's (`lora`) only with LORA."""
    return {"PDL": True, "launch_pdl": True} if on(device) and (LORA or not lora) else {"PDL": False}
