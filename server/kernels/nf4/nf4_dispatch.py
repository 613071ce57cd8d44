"""Which kernel multiplies by an NF4 weight on CUDA, chosen by the rows (tokens) in the batch.

- ``fused``: few rows, the fused dequantize-in-registers Triton matmul (server.kernels.nf4.triton_nf4);
- ``dequant``: prefill-sized batches, dequantize into one reused 16-bit scratch buffer and let cuBLAS
  multiply (server.kernels.nf4.triton_nf4_dequant); the buffer holds one layer, never the whole model;
- ``tile``: 1-11 rows, the CUDA tensor-core kernel compiled at first use (server.kernels.nf4.cuda_nf4) over
  the layer's forward-only tile layout (nf4_layout.tile_pack; NF4Linear keeps it), ``mma`` when a
  caller has no tile copy: the same kernel reading bitsandbytes' codes as stored; ``wide``: 12-128 rows
  (large weights only past 32; on Hopper wgmma takes most of them from 17), the same mapping with x staged in
  shared memory once a block; ``gemv``: up to
  ``GEMV_ROWS`` rows (LORAPLEX_NF4_GEMV_ROWS) in place of ``tile``, the same loop with K split among a block's
  warps and summed in shared memory instead of by a second kernel; ``gemm``: the rows of ``GEMM_ROWS``
  (LORAPLEX_NF4_GEMM_ROWS, none by default) that the table gives ``wide`` or ``dequant``, x as the MMA's A operand;
  ``wgmma``: on Hopper (sm_90a builds), the wide and dequant rows from 17 to 256 where it measured faster
  (``WGMMA_ROWS``, ``WGMMA_MIN_WEIGHTS``), the tile layout's fragments as a warpgroup MMA's A (past 64 rows its
  128-token block with x brought by the TMA unit, ``BULK_X``); ``gemv_pairs``: the
  ``gemv`` and ``tile`` calls of 1-8 rows on weights of at least ``PAIRS_MIN_WEIGHTS`` (``PAIRS``,
  LORAPLEX_NF4_PAIRS), the weights dequantized from a table of all 256 byte values on a persistent grid;
- ``bnb``: bitsandbytes' own ``matmul_4bit`` (``gemv_4bit`` at one row), kept as a measured fallback.

The crossovers come from ``python -m bench.kernels`` on an H200 (see bench/RESULTS.md);
``LORAPLEX_NF4_KERNEL=triton`` skips the CUDA extension, ``=bnb`` sends every call to bitsandbytes.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from server.kernels.nf4 import cuda_nf4, cuda_nf4_gemv, cuda_nf4_wgmma
from server.kernels.nf4.nf4_layout import codes_as_words
from server.kernels.split_sums import SplitSums

# (largest row count, kernel), scanned in order; None = any count. From the H200 runs of 2026-12-01
# (bench/results/2026-12-01-nvidia-h200-kernels*.json; 8B layer shapes, µs): the CUDA tile kernel takes
# 1-64 rows (gate_up: 40 µs at 1 row vs 47 for the same kernel on bnb's layout ("mma"), bnb 53, bf16 61;
# at 64 rows 125-134 vs dequant + cuBLAS 157, qkv 29 vs 34 with the wider split), dequant + cuBLAS beyond.
# Without the CUDA extension (no nvcc, pre-Ampere, or LORAPLEX_NF4_KERNEL=triton): bnb at 1-2 rows
# (0.92 / 1.41 of bf16; fused 1.72), fused Triton to 32 rows, dequant beyond. bnb's one-row GEMV is not
# exact to the fp32 semantics (max error 4.9e-3 of the output's range against 3.3e-3 for ours).
WITH_CUDA_KERNEL: tuple[tuple[int | None, str], ...] = ((11, "tile"), (128, "wide"), (None, "dequant"))
# 12-128 rows: the wide kernel (x staged in shared memory once a block), except on small weights past 32 rows.
# H200 (bench/results/2026-12-02-nvidia-h200-kernels-wide2.json, µs, wide against the register tile kernel): at
# 32 rows 8B qkv 16.0 vs 18.4, o 12.0 vs 14.1, gate_up 65.6 vs 71.8, down 29.2 vs 35.8, and every 1B layer too;
# at 16 rows within 4% either way and at 1 row the tile kernel wins (gate_up 36.8 vs 66.3). Twelfth session (8B,
# -kernels-s12-pdl.json and -kernels-s12-rows8-12.json, µs, wide against tile): at 16 rows qkv 13.1 vs 16.0, o 10.4
# vs 10.5, gate_up 46.6 vs 47.7, down 25.0 vs 25.5; at 12 rows 12.8 vs 15.5, 10.1 vs 10.4, 45.4 vs 45.4, 24.2 vs
# 24.7; at 8 rows tile wins gate_up 42.3 vs 50.0 and down 22.4 vs 24.3: the tile kernel keeps 1-11 rows.
# At 64 rows 8B gate_up 91.5 vs 124.7 and dequant + cuBLAS 153.3, but 1B qkv and o lose to dequant (14.3 vs
# 11.0, 14.1 vs 9.4: too few row tiles to fill the GPU); at 128 rows gate_up 142.6 vs dequant 157.8, down 67.1
# vs 85.3, 8B qkv 42.1 vs 35.6 (dequant); 1B gate_up (33.5M weights) 37.9 vs 46.6 (-kernels-s16-m64-256.json),
# 1B down (16.8M) 32.5 vs 28.9. Weights below the bound for the row count go to dequant + cuBLAS.
WIDE_MIN_WEIGHTS = ((32, 0), (64, 16_000_000), (128, 30_000_000))  # (up to this many rows, least out x in)
TRITON_ONLY: tuple[tuple[int | None, str], ...] = ((2, "bnb"), (32, "fused"), (None, "dequant"))
BNB_ONLY: tuple[tuple[int | None, str], ...] = ((None, "bnb"),)
# Rows up to which `gemv` replaces `tile` on weights whose row tiles take 8+ warps each in one wave
# (cuda_nf4_gemv.gemv_warps; 0: never). H200, 8B, 1-8 rows (bench/results/2026-12-04-nvidia-h200-kernels-s20-gemv.json):
# qkv 10.8-11.2 µs against tile 12.0-12.6, o 8.7-8.9 against 9.9-10.6, down 20.4-20.8 against 21.9-22.4; gate_up
# stays on tile.
GEMV_ROWS = int(os.environ.get("LORAPLEX_NF4_GEMV_ROWS", "8"))
# The rows (lo-hi) whose `wide` or `dequant` calls `gemm` (x as the MMA's A operand) takes instead; unset: none, the
# default until the H200 measures it (LORAPLEX_NF4_GEMM_ROWS=65-512 for an engine A/B). It dequantizes each weight
# twice a 128 tokens, so at prefill sizes of thousands of rows dequant + cuBLAS must keep them.
GEMM_ROWS = tuple(int(v) for v in os.environ.get("LORAPLEX_NF4_GEMM_ROWS", "0-0").split("-"))
# nf4_gemv_pairs (csrc/nf4_pairs.cuh: the byte-pair table, 5 instructions a weight pair where the 16-entry table takes
# 8, the same bits) takes 1-8 rows of the weights of at least PAIRS_MIN_WEIGHTS (out x in) on devices that give a
# block its 128 KB of shared memory (A100, H100, H200; not sm_86/89). H100, 2026-12-05
# (bench/results/2026-12-05-nvidia-h100-80gb-hbm3-kernels-s34-xnext.json, µs, 8B, gemv_pairs against the dispatch
# before it, at 1 / 4 / 8 rows): gate_up (117M weights) 32.8 / 33.4 / 36.6 vs 38.8 / 41.2 / 45.6, down (58.7M) 17.1 /
# 18.2 / 19.2 vs 20.6 / 20.6 / 20.8; the small ones lose: qkv (25.2M) 11.5 / 12.0 / 12.4 vs 11.0 / 11.1 / 11.3, o
# (16.8M) 8.6 / 9.2 / 9.4 vs 8.9 / 9.0 / 9.1 (a row tile's few steps a warp leave its loads little to overlap). The
# bound sits between qkv and down. Then (-kernels-s35.json, gemv_pairs and nf4_gemv both with x one block ahead) 1B
# gate_up (33.5M) 12.7 / 13.2 / 14.1 against the tile kernel's 13.8 / 14.0 / 15.1, 8B qkv 11.8 / 12.7 / 12.9 against
# nf4_gemv's 10.7 / 10.9 / 11.2: the bound moved to 30M. With one wait for a step's loads (cuda_nf4.one_wait_for;
# H200, -2026-12-06-nvidia-h200-kernels-s38-onewait.json, 1 / 4 / 8 rows) 8B o (16.8M) 7.4 / 7.6 / 7.8 against
# nf4_gemv's 7.7 / 7.9 / 8.3 and 1B down (16.8M) 7.4 / 7.6 / 8.1 against 7.9 / 7.9 / 8.0 win; 8B qkv (25.2M) 10.6 /
# 10.8 / 11.5 against 10.7 / 10.8 / 10.7 ties but at 8 rows, 1B qkv (6.3M) 5.4 against 5.2 and o (4.2M) 5.0 against
# 4.0 still lose: the bound is 16M. LORAPLEX_NF4_PAIRS: auto (that rule, the default), 1 (every weight's 1-8 rows),
# 0 (never).
PAIRS = os.environ.get("LORAPLEX_NF4_PAIRS", "auto")
PAIRS_MIN_WEIGHTS = 16_000_000
# Hopper's warpgroup MMA (`wgmma`, the tile layout's A fragments in registers, x from shared memory; sm_90a builds only)
# takes the wide and dequant rows within WGMMA_ROWS (LORAPLEX_NF4_WGMMA_ROWS=lo-hi; 0-0 turns it off) on weights of at
# least WGMMA_MIN_WEIGHTS (out x in) for the row count. H200, 2026-12-04
# (bench/results/2026-12-04-nvidia-h200-kernels-s24-wgmma.json, µs, wgmma against the dispatch before it): at 32 rows 8B
# o 11.1 vs 12.1, gate_up 51.5 vs 67.7, down 26.5 vs 28.8, 1B qkv 7.7 vs 8.8, o 6.2 vs 7.7, gate_up 20.3 vs 21.2, down
# 10.9 vs 11.7 (8B qkv 17.7 vs 16.2 before its splits filled the wave, cuda_nf4_wgmma.wgmma_split_k, 15.5 vs 16.4 after;
# at 16 rows the wide kernel still wins: 8B gate_up 47.5 vs 51.8, qkv 13.0 vs 14.5, -kernels-s24-dispatch.json); at 64
# rows every layer (8B gate_up 62.8 vs 95.8, down 32.6 vs 49.2, qkv 22.2 vs 23.4, 1B qkv 9.7 vs 10.8); at 128 rows
# weights from 16M (8B gate_up 108 vs 157, down 57 vs 68, o 22.3 vs 26.1, 1B gate_up 32.1 vs 38.3, 1B down 20.6 vs 29.2;
# 8B qkv 38.7 vs 35.0 loses, 1B qkv 14.4 vs 11.3 and o 10.1 vs 10.0 stay on dequant); at 192-256 rows only the largest
# (8B gate_up 159-162 vs 171-194, down 80-84 vs 93-97; 8B o 34-38 vs 27-31 and 1B gate_up 53-58 vs 50-52 lose: too few
# row groups to fill the GPU at one wgmma block an SM); from 512 rows dequant + cuBLAS wins everywhere (8B gate_up 323
# vs 264). Rows past the table's last entry (a range asked for past 256) take every weight.
WGMMA_ROWS = tuple(int(v) for v in os.environ.get("LORAPLEX_NF4_WGMMA_ROWS", "17-256").split("-"))
WGMMA_MIN_WEIGHTS = ((64, 0), (128, 16_000_000), (256, 50_000_000))  # (up to this many rows, least out x in)
# The rules' wgmma calls of 65-256 rows on weights of at least 4,096 inputs run the 128-token block with x brought
# by the TMA unit (nf4_wgmma(bulk_x=True): 127 registers, two blocks an SM). H200, forty-eighth session
# (bench/results/2026-12-07-nvidia-h200-kernels-s48-bulk-x.json, us, bulk_x against the dispatch's pick then): 8B at
# 128 rows qkv 24.6 vs 32.6, o 18.2 vs 21.1, gate_up 70.3 vs 113.9, down 38.4 vs 55.5, 1B down (8,192 inputs) 17.0
# vs 19.3; at 256 rows gate_up 136.0 vs 178.1, down 69.7 vs 98.1. H100 at 96 rows, against the default block
# (2026-12-07-nvidia-h100-80gb-hbm3-kernels-s48-bulk-x-tuned.json): 8B qkv 22.6 vs 34.8, o 17.1 vs 19.9, gate_up
# 68.3 vs 106.4, down 35.9 vs 52.8, 1B down 16.4 vs 19.2. On 2,048 inputs (32 quant blocks) it loses: 1B gate_up 36.2 vs
# 31.2 at 128 rows on the H200, 1B qkv 11.2 vs 10.9 at 96 on the H100. Where WGMMA_MIN_WEIGHTS leaves dequant +
# cuBLAS it may also win (1B gate_up at 256 rows 37.4 vs 52.7) or lose (8B qkv 47.5 vs 41.6): start-up tuning times
# it against the others at every bucket (nf4_autotune), these rules cover the other row counts (prefill chunks).
# At 64 rows the 64-token block wins (8B gate_up 60.5 vs 66.9). LORAPLEX_NF4_BULK_X=0: the default block (A/B runs).
BULK_X = os.environ.get("LORAPLEX_NF4_BULK_X", "1") != "0"
BULK_X_MIN_INPUTS = 4096


@dataclass(frozen=True)
class Choice:
    """A kernel start-up tuning chose (server.kernels.nf4.nf4_autotune)."""

    kernel: str  # a name nf4_linear_cuda runs
    options: tuple[tuple[str, int], ...] = ()  # keyword arguments of cuda_nf4_wgmma.nf4_wgmma

    def __str__(self) -> str:
        return self.kernel + "".join(f" {name}={value}" for name, value in self.options)


# (weight shape (out, in), rows) -> the kernel timed fastest at start-up (nf4_autotune.tune); run instead of
# the rules for exactly those shapes and row counts. Empty: the rules alone.
TUNED: dict[tuple[tuple[int, int], int], Choice] = {}


@functools.cache
def kernel_table() -> tuple[tuple[int | None, str], ...]:
    """The table in force: LORAPLEX_NF4_KERNEL=auto (default: the CUDA kernel if it builds), triton, bnb."""
    choice = os.environ.get("LORAPLEX_NF4_KERNEL", "auto")
    if choice == "bnb":
        return BNB_ONLY
    if choice == "auto" and cuda_nf4.is_available():
        return WITH_CUDA_KERNEL
    return TRITON_ONLY


def prepare() -> str:
    """Settle the kernel table (building the CUDA extension once, ~90 s on a fresh machine) and whether the build has
    the wgmma kernels (a probe launch and a host sync, which a graph capture must not meet) before any CUDA graph is
    captured; returns a one-line description for the log."""
    table = kernel_table()
    wgmma = ""
    if WGMMA_ROWS[0] > 0 and table == WITH_CUDA_KERNEL:
        wgmma = f" {WGMMA_ROWS[0]}-{WGMMA_ROWS[1]}:wgmma" if cuda_nf4_wgmma.wgmma_supported() else " (no wgmma build)"
    return " ".join(f"<={rows}:{name}" if rows else f"rest:{name}" for rows, name in table) + wgmma


def wgmma_takes(num_rows: int, shape) -> bool:
    """Whether wgmma runs a wide or dequant call of `num_rows` rows on an (out, in) weight (WGMMA_ROWS,
    WGMMA_MIN_WEIGHTS, an sm_90a build)."""
    if not 0 < WGMMA_ROWS[0] <= num_rows <= WGMMA_ROWS[1]:
        return False
    least = next((weights for rows, weights in WGMMA_MIN_WEIGHTS if num_rows <= rows), 0)
    return shape[0] * shape[1] >= least and cuda_nf4_wgmma.wgmma_supported()


def rule_options(name: str, num_rows: int, shape) -> dict:
    """nf4_wgmma's keyword arguments for a call the rules give `name` (kernel_for): bulk_x past 64 rows on weights of
    at least BULK_X_MIN_INPUTS inputs (BULK_X), else none."""
    if name == "wgmma" and BULK_X and num_rows > 64 and shape[1] >= BULK_X_MIN_INPUTS:
        return {"bulk_x": True}
    return {}


def pairs_takes(shape) -> bool:
    """Whether gemv_pairs runs the 1-8 row calls of an (out, in) weight on the current device (PAIRS,
    PAIRS_MIN_WEIGHTS, cuda_nf4_gemv.pairs_supported)."""
    if PAIRS == "0" or (PAIRS != "1" and shape[0] * shape[1] < PAIRS_MIN_WEIGHTS):
        return False
    return pairs_device()


def pairs_device() -> bool:
    """Whether the current CUDA device gives nf4_gemv_pairs its shared memory (False without CUDA)."""
    return torch.cuda.is_available() and cuda_nf4_gemv.pairs_supported(torch.cuda.current_device())


def kernel_for_rows(num_rows: int, table=None) -> str:
    """The kernel name the table gives a batch of `num_rows` rows."""
    return next(name for max_rows, name in table or kernel_table() if max_rows is None or num_rows <= max_rows)


def kernel_for(num_rows: int, shape, table=None, num_sms: int = 132) -> str:
    """The kernel the dispatch runs for `num_rows` rows of an (out, in) weight: the table's, except that
    the gemv kernel takes the tile kernel's rows up to GEMV_ROWS where it fills a wave, wgmma the wide and dequant
    rows where wgmma_takes, the gemm kernel those in GEMM_ROWS (when set), and the wide kernel leaves weights below
    WIDE_MIN_WEIGHTS to dequant + cuBLAS."""
    name = kernel_for_rows(num_rows, table)
    in_gemm_rows = 0 < GEMM_ROWS[0] <= num_rows <= GEMM_ROWS[1]
    with_cuda = (table or kernel_table()) == WITH_CUDA_KERNEL
    if name in ("wide", "dequant") and with_cuda and wgmma_takes(num_rows, shape):
        return "wgmma"
    if name in ("wide", "dequant") and in_gemm_rows and with_cuda:
        return "gemm"
    if name == "tile" and num_rows <= 8 and with_cuda and pairs_takes(shape):
        return "gemv_pairs"
    if name == "tile" and num_rows <= min(GEMV_ROWS, 8) and cuda_nf4_gemv.gemv_warps(tuple(shape), num_sms) is not None:
        return "gemv"
    if name == "wide":
        least = next((weights for rows, weights in WIDE_MIN_WEIGHTS if num_rows <= rows), None)
        if least is None or shape[0] * shape[1] < least:  # a table that sends more rows to wide: unmeasured
            return "dequant"
    return name


class DequantScratch:
    """One 16-bit buffer per (device, dtype), grown to the largest layer it has held; never shrunk.

    A CUDA graph captures the buffer's address, so a buffer that is outgrown is kept, not freed: freed, its memory
    went back to the caching allocator, whose next owner (an eager prefill's activations, or the driver after
    `empty_cache`) the older graphs' replays then wrote over. On the H200 that was an illegal memory access at the
    first 128-row replay of a fresh 1B server (the 96-128 row graphs dequantized `down` into the buffer that
    `gate_up` at 160 rows had outgrown). The engine reserves the largest layer before capturing
    (`reserve_scratch`), so in serving nothing is outgrown at all."""

    def __init__(self):
        self._buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._outgrown: list[torch.Tensor] = []  # alive for the graphs that captured them

    def get(self, numel: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (device, dtype)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            if buffer is not None:
                self._outgrown.append(buffer)
            buffer = self._buffers[key] = torch.empty(numel, device=device, dtype=dtype)
        return buffer


def reserve_scratch(model: torch.nn.Module) -> int:
    """Size the scratch for the model's largest NF4 weight now (before any CUDA graph is captured), so that every
    captured dequantization shares one buffer; returns its elements (0: no NF4 layer)."""
    largest: dict[tuple[torch.device, torch.dtype], int] = {}
    for module in model.modules():
        if getattr(module, "is_quantized", False):
            key = (module.codes.device, module.compute_dtype)
            largest[key] = max(largest.get(key, 0), module.out_features * module.in_features)
    for (device, dtype), numel in largest.items():
        SCRATCH.get(numel, device, dtype)
    return max(largest.values(), default=0)


SCRATCH = DequantScratch()  # process-wide: layers run one at a time, so one buffer serves them all


def dequant_linear(x, codes, absmax_f, shape, code_table, bias) -> torch.Tensor:
    """y = x @ dequant(W)^T (+ bias) through the 16-bit scratch and cuBLAS.

    Measured against pieces of output rows small enough (4-32 MB) for each piece's 16-bit copy to stay in L2
    between the dequantization and the matmul (H200, 2026-12-03-nvidia-h200-dequant-pieces-s16.json): every
    piece size was slower (8B at 128 rows: 2.40-7.46x bf16 against 2.13x whole), so the whole weight it is."""
    from server.kernels.nf4.triton_nf4_dequant import nf4_dequantize_triton

    out_features, in_features = shape
    scratch = SCRATCH.get(out_features * in_features, x.device, x.dtype)
    weight = nf4_dequantize_triton(codes_as_words(codes), absmax_f, code_table, scratch)
    return torch.nn.functional.linear(x, weight.view(out_features, in_features), bias)


def nf4_linear_cuda(
    x: torch.Tensor,  # [T, in] bf16 / fp16, CUDA
    codes: torch.Tensor,  # [out * in / 2, 1] uint8
    absmax_f: torch.Tensor,  # [out * in / 64] float32
    shape,  # (out, in)
    code_table: torch.Tensor,  # [16] float32
    bias: torch.Tensor | None,  # [out]
    quant_state=None,  # bnb QuantState, for the bnb fallback
    kernel: str | None = None,  # force one kernel (benchmarks, tests)
    tiled: tuple[torch.Tensor, torch.Tensor] | None = None,  # nf4_layout.tile_pack of (codes, absmax_f)
    defer_sum: bool = False,  # the tile and wide kernels may return split_sums.SplitSums
    options: dict | None = None,  # with kernel="wgmma": cuda_nf4_wgmma.nf4_wgmma's keyword arguments (nf4_autotune)
) -> torch.Tensor | SplitSums:
    """y = x @ dequant(W)^T (+ bias), semantics of nf4_ops.nf4_matmul_reference, by the fastest kernel: the one
    start-up tuning chose for this shape and row count (TUNED), else the rules (kernel_for, rule_options)."""
    from server.kernels.nf4.triton_nf4 import device_num_sms

    num_sms = device_num_sms(x.device.index or 0)
    if kernel is None and TUNED:
        key = (tuple(shape), x.shape[0])
        choice = TUNED.get(key)
        if choice is not None:
            kernel, options = choice.kernel, dict(choice.options)
    if kernel is None:
        kernel = kernel_for(x.shape[0], shape, num_sms=num_sms)
        options = rule_options(kernel, x.shape[0], shape)
    name = kernel
    if name in ("gemv", "gemv_pairs", "tile", "wide", "gemm", "wgmma") and tiled is None:
        name = "mma" if x.shape[0] <= 64 else "dequant"
    if name == "fused":
        from server.kernels.nf4.triton_nf4 import nf4_matmul_triton

        return nf4_matmul_triton(x, codes, absmax_f, shape, code_table, bias=bias)
    if name == "mma":
        # Two warps a block measured faster up to 8 rows (gate_up 47 vs 48.5 µs, down 25 vs 30), four above.
        return cuda_nf4.nf4_mma(x, codes, absmax_f, shape, code_table, bias, warps=2 if x.shape[0] <= 8 else 4,
                                num_sms=num_sms)
    if name == "gemv":
        return cuda_nf4_gemv.nf4_gemv(x, tiled, shape, code_table, bias, num_sms=num_sms)
    if name == "gemv_pairs":
        return cuda_nf4_gemv.nf4_gemv_pairs(x, tiled, shape, code_table, bias, num_sms=num_sms)
    if name == "tile":
        return cuda_nf4.nf4_tile(x, tiled, shape, code_table, bias, num_sms=num_sms, defer_sum=defer_sum)
    if name == "wide":
        return cuda_nf4.nf4_wide(x, tiled, shape, code_table, bias, num_sms=num_sms, defer_sum=defer_sum)
    if name == "gemm":
        return cuda_nf4.nf4_gemm(x, tiled, shape, code_table, bias, num_sms=num_sms, defer_sum=defer_sum)
    if name == "wgmma":
        return cuda_nf4_wgmma.nf4_wgmma(x, tiled, shape, code_table, bias, num_sms=num_sms, defer_sum=defer_sum,
                                        **dict(options or {}))
    if name == "dequant":
        return dequant_linear(x, codes, absmax_f, shape, code_table, bias)
    if name == "bnb":
        import bitsandbytes as bnb

        return bnb.matmul_4bit(x, codes.t(), quant_state, bias=bias)
    raise ValueError(f"unknown NF4 kernel {name!r}")
