"""Steps 8-9 of the sampler on integer probability masses (see server.engine.sampler): exact in any
summation order, so the batched pass needs no sort for top-p and CUDA agrees with the CPU bit for bit."""

from __future__ import annotations

import functools
import os

import torch

from server.kernels.backends import triton_available

MASS_BITS = 40  # steps 8-9 count probability in integer units of 2**-MASS_BITS
NO_TOP_P = 2.0  # the top_p a row without top-p carries to the fused draw (triton_top_p): it keeps every token
_COUNT_SHIFT = 44  # histogram cells pack (count << 44) + mass: mass <= 2**41, count <= 2**17 per row
_MASS_MASK = (1 << _COUNT_SHIFT) - 1


@functools.lru_cache(maxsize=1)
def fused_top_p_available() -> bool:
    """Whether CUDA draws (steps 8-9, with or without top-p) use the fused kernels (`triton_top_p`, each row over
    32 programs): the default where Triton imports (top-p: 399 us against 1,241 us for the sorting torch steps at
    32 x 128256 on the H200, tests/gpu/test_sampler_gpu.py, 2026-12-02); LORAPLEX_TOP_P_KERNEL=torch keeps the
    torch steps."""
    return os.environ.get("LORAPLEX_TOP_P_KERNEL", "triton") == "triton" and triton_available()


def integer_masses(probs: torch.Tensor) -> torch.Tensor:
    """floor(p * 2**40) as int64 (exact: float32 -> float64 scaling loses nothing)."""
    return (probs.double() * 2.0**MASS_BITS).floor_().long()


def top_p_threshold(top_p: torch.Tensor) -> torch.Tensor:
    """The kept mass a row needs, in mass units: ceil(top_p * 2**40), top_p float32 [R]."""
    return (top_p.double() * 2.0**MASS_BITS).ceil_().long()


def _crossing(masses: torch.Tensor, base: torch.Tensor, need: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Histogram masses [R, B] (bucket b: keys b); scanning buckets from the highest down with `base`
    mass already above them, the first bucket at which the running mass reaches `need` [R], and the
    mass strictly above that bucket. Rows that never reach it get bucket -1."""
    num_buckets = masses.shape[1]
    running = masses.flip(-1).cumsum(-1) + base[:, None]  # running[j]: mass of buckets >= B - 1 - j
    j = torch.searchsorted(running, need[:, None]).squeeze(1)  # first j with running[j] >= need
    above = torch.where(j > 0, running.gather(1, (j - 1).clamp(min=0)[:, None]).squeeze(1), base)
    return num_buckets - 1 - j, above


def top_p_keep(probs: torch.Tensor, top_p: torch.Tensor, method: str = "sort") -> torch.Tensor:
    """Step 8 on probabilities [R, vocab] (float32, rows sum to ~1) with top_p [R]: the kept tokens as a
    bool mask. `method` "sort" or "radix"; both exact, so they agree bit for bit. Sort is the default:
    on the H200 (32 x 128256, flat rows) a sampler step with the radix select as torch ops took 1.80 ms
    against 1.21 ms for the sorting sampler before it (bench/results/2026-12-01-nvidia-h200-sampler.txt:
    the first histogram's atomics pile onto the few buckets a flat row's probabilities share). A fused
    kernel would be needed for the radix path to win."""
    masses = integer_masses(probs)
    need = top_p_threshold(top_p)
    if method == "sort":
        ordered = masses.gather(1, order := torch.sort(probs, dim=-1, descending=True, stable=True).indices)
        kept = (ordered.cumsum(-1) - ordered) < need[:, None]  # mass before each token, ties by id
        return torch.zeros_like(kept).scatter_(1, order, kept)
    return _top_p_keep_radix(probs, masses, need)


def _top_p_keep_radix(probs: torch.Tensor, masses: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
    """top_p_keep without sorting. The cut value v is found by a radix select over the probabilities'
    float bits (non-negative floats order as their bit patterns): a mass histogram over the top 16
    bits locates v's bucket, a second over the low 15 bits inside that bucket gives v exactly. Kept:
    every p > v, and of the ties p == v the lowest ids, as many as the mass still needed takes."""
    num_rows = probs.shape[0]
    bits = probs.view(torch.int32)
    packed = masses + (1 << _COUNT_SHIFT)
    high = (bits >> 15).long()  # [R, vocab] in [0, 2**16)
    hist = torch.zeros(num_rows, 1 << 16, dtype=torch.long, device=probs.device).scatter_add_(1, high, packed)
    zero = torch.zeros(num_rows, dtype=torch.long, device=probs.device)
    bucket, above_bucket = _crossing(hist & _MASS_MASK, zero, need)
    in_bucket = high == bucket[:, None]
    low = (bits & 0x7FFF).long()
    hist = torch.zeros(num_rows, 1 << 15, dtype=torch.long, device=probs.device).scatter_add_(
        1, low, torch.where(in_bucket, packed, 0))
    low_cut, above = _crossing(hist & _MASS_MASK, above_bucket, need)
    low_cut = low_cut.clamp(min=0)
    cell = hist.gather(1, low_cut[:, None]).squeeze(1)
    count, tie_mass = cell >> _COUNT_SHIFT, cell & _MASS_MASK
    unit = tie_mass // count.clamp(min=1)  # every tie has the same probability, so the same mass
    ties = torch.where(unit > 0, (need - above + unit - 1) // unit.clamp(min=1), count)
    cut = ((bucket.clamp(min=0) << 15) | low_cut).int().view(torch.float32)
    is_tie = probs == cut[:, None]
    keep = (probs > cut[:, None]) | (is_tie & (is_tie.cumsum(-1) <= ties[:, None]))
    return keep | (bucket < 0)[:, None]  # a row whose whole mass stays under top_p keeps everything


def draw_from_masses(masses: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Step 9: integer masses [S, vocab] (0 = dropped), uniform [S] in (0, 1) -> token ids [S] int64:
    the first token whose cumulative mass exceeds floor(u * total)."""
    cdf = masses.cumsum(dim=-1)
    target = (uniform.double() * cdf[:, -1].double()).floor_().long()
    return torch.searchsorted(cdf, target[:, None], right=True).squeeze(1).clamp_(max=masses.shape[-1] - 1)
