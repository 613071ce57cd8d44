"""The NF4 kernel for each weight shape and decode row count, timed once at start-up (on by default).

The dispatch's rules (server.kernels.nf4.nf4_dispatch) come from kernel tables of two model shapes, and some shapes lose
under them: on the H200, 8B qkv at 65-128 rows ran wgmma at 38.7 us against dequant + cuBLAS's 35.0, and 1B down at
192 rows dequant + cuBLAS at 35.9 against wgmma's 64-token instance at 31.0
(bench/results/2026-12-04-nvidia-h200-kernels-s25-o3.json). The engine times every candidate for each distinct NF4
weight shape of the model at each decode-graph row count in ROWS, before any graph is captured (the replays then
run the chosen kernel), and `nf4_dispatch.nf4_linear_cuda` runs the winner for exactly those row counts; other
counts keep the rules. Every candidate computes the same semantics; they differ only in the order of fp32 sums, as
the rule-chosen kernels at different row counts already do. An H100 A/B in one call (2026-12-06,
bench/results/2026-12-06-nvidia-h100-80gb-hbm3-8b-s38.json and -8b-s38-autotune.log): the 8B merged batch-32 step
4.175 against 4.356 ms (roofline fraction 0.447 against 0.421), 32 distinct adapters 5.36 against 5.52, batch 1 the
same (2.85 ms); the kernel tables of the H100 and the H200 agree on the variants it picks (wgmma with two quant
blocks a stage wins 1-7% at 16-32 rows on every shape but 8B qkv on both). On since the thirty-ninth session, when
the GPU suite ran with it on; LORAPLEX_NF4_AUTOTUNE=0 keeps the rules alone (A/B runs).
"""

from __future__ import annotations

import logging
import os
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from server.kernels.nf4 import cuda_nf4_wgmma, nf4_dispatch, tuning_cache
from server.kernels.nf4.nf4_dispatch import Choice

log = logging.getLogger(__name__)

AUTOTUNE = os.environ.get("LORAPLEX_NF4_AUTOTUNE", "1") != "0"
# The decode-graph buckets (server.engine.cuda_graphs.DECODE_BUCKETS) up to prefill sizes; those under 16 rows only
# with LORAPLEX_NF4_TUNE_FEW_ROWS=1. Measured without gain (H100, forty-third session, one call: the engine tests
# passed with it on; bench/results/2026-12-06-nvidia-h100-80gb-hbm3-8b-s43-few-rows.json): 8B batch 1 at 347.3
# tokens/s against 347.6 without it (-8b-s42.json); its picks: the 16-token tile for gate_up at one row (30.14 us
# against the rules' 31.24), the rules at 4 and 8 rows though bench.kernels times the tile 2-3 us faster there
# (-kernels-s43-few-rows-tuned.json: the graph-timed tuning and the table's timing disagree at these sizes).
FEW_ROWS = (1, 2, 4, 8) if os.environ.get("LORAPLEX_NF4_TUNE_FEW_ROWS", "0") == "1" else ()
ROWS = FEW_ROWS + (16, 32, 48, 64, 96, 128, 192, 256)
# LORAPLEX_NF4_BULK_X_64=1: bulk_x's 64-token block among the candidates from 33 rows (bench.kernels' wgmma_bx_b64).
# Off: correct (GPU tests, H100, forty-ninth session) and slower than the 128-token block at every 96-256-row shape
# timed (8B gate_up at 128 rows 105.1 against 70.5 us; -kernels-s49-cluster.json); 33-64 rows not yet timed.
BULK_X_64 = os.environ.get("LORAPLEX_NF4_BULK_X_64", "0") == "1"
# The 128-token bulk_x block of 8 warps also with its splits of K summed in a thread-block cluster (nf4_wgmma's
# cluster_sum; its GPU tests passed on an H100 in the forty-ninth session; 18% faster on 1B gate_up at 96-128 rows,
# 10% on 8B qkv at 256: bench/results/2026-12-07-nvidia-h100-80gb-hbm3-kernels-s49-cluster.json).
# LORAPLEX_NF4_CLUSTER_SUM=0 leaves it out.
CLUSTER_SUM = os.environ.get("LORAPLEX_NF4_CLUSTER_SUM", "1") != "0"


def candidates(rows: int, shape: tuple[int, int], num_sms: int) -> list[Choice]:
    """What can run `rows` rows of an (out, in) weight: dequant + cuBLAS, the wide kernel, and on sm_90a builds
    wgmma with its default block, each other block size that holds the rows in at most two blocks, one
    warpgroup a block, and at 32 block tokens two quant blocks a stage (stage_blocks 2: 1-7% faster than the default
    at 16-32 rows on every 8B and 1B shape but 8B qkv, 6% slower there, on the H100 and the H200 alike:
    bench/results/2026-12-06-nvidia-h100-80gb-hbm3-kernels-s39-sk.json, 2026-12-06-nvidia-h200-kernels-s38-onewait.json;
    an older H200 run had it 1-2% slower on 8B gate_up, 2026-12-04-nvidia-h200-kernels-s26-w4.json), and there too
    the x-resident kernel at 4-7 warpgroups a block, with the 16-entry table or the byte-pair table (on an H100 the
    tuned pick took 8B gate_up from 46.0 to 37.2 us at 16 rows, down from 23.8 to 20.5:
    bench/results/2026-12-06-nvidia-h100-80gb-hbm3-kernels-s41-pairs.json), and at up to 16 rows its 16-token x tile
    (m64n16 wgmmas: half the shared-memory reads of x) with the byte-pair table (H100, 8B at 16 rows, us, against the
    32-token tile's best: gate_up 34.15 vs 37.63, down 18.79 vs 21.07, qkv 11.61 vs 12.42, o 9.51 vs 9.74;
    bench/results/2026-12-06-nvidia-h100-80gb-hbm3-kernels-s42-tiles.json); from 65 rows the 128-token block with x
    brought by the TMA unit in blocks of 8 and 16 warps, with BULK_X_64 its 64-token one (nf4_dispatch.BULK_X). Below 16
    rows: the rules' one-row kernel against that 16-token tile (H100, 8B, us, rules / best tile: gate_up 31.04 /
    30.43 at 1 row, 33.23 / 31.18 at 4, 35.54 / 31.97 at 8; qkv 11.34 / 10.58 at 8; down and o slower in the tile:
    bench/results/2026-12-06-nvidia-h100-80gb-hbm3-kernels-s42-few-rows.json)."""
    sixteen_token_tiles = [Choice("wgmma", (("resident_warpgroups", w), ("block_tokens", 16), ("pairs", True)))
                           for w in cuda_nf4_wgmma.RESIDENT_WARPGROUPS]
    if rows < 16:  # the one-row kernels' rule, and the x-resident kernel's 16-token tile
        return [Choice(nf4_dispatch.kernel_for(rows, shape, num_sms=num_sms))] + (
            sixteen_token_tiles if cuda_nf4_wgmma.wgmma_supported() else [])
    choices = [Choice("dequant"), Choice("wide")]
    if cuda_nf4_wgmma.wgmma_supported():
        default = cuda_nf4_wgmma.wgmma_block_tokens(rows, shape, num_sms)
        choices.append(Choice("wgmma"))
        choices += [Choice("wgmma", (("block_tokens", tokens),)) for tokens in cuda_nf4_wgmma.WGMMA_BLOCK_TOKENS
                    if tokens != default and tokens // 2 < rows]
        if default <= 128:
            choices.append(Choice("wgmma", (("block_warps", 4),)))
        if nf4_dispatch.BULK_X:  # x by the TMA unit: 128 tokens in 8 warps (also cluster-summed) or 16 from 65
            # rows, 64 tokens from 33 (BULK_X_64)
            bulk = []
            if rows > 64:
                bulk += [(), (("cluster_sum", True),)] if CLUSTER_SUM else [()]
                bulk.append((("block_warps", 16),))
            if rows > 32 and BULK_X_64:
                bulk.append((("block_tokens", 64),))
            choices += [Choice("wgmma", (("bulk_x", True),) + options) for options in bulk]
        if default == 32:
            choices.append(Choice("wgmma", (("stage_blocks", 2),)))
            choices += [Choice("wgmma", (("resident_warpgroups", w),) + ((("pairs", True),) if pairs else ()))
                        for pairs in (False, True) for w in cuda_nf4_wgmma.RESIDENT_WARPGROUPS]
            if rows <= 16:
                choices += sixteen_token_tiles
    return choices


def time_calls(calls: list[Callable[[], object]], repeats: int = 10) -> float:
    """Median device time in ms of one call of `calls` (one candidate on each of the model's weights of a shape), as
    a decode step runs them: captured in turn as one CUDA graph behind an L2 flush (a buffer twice the L2 zeroed) and
    replayed, less a graph of the flush alone. The graph times what the GPU does, not the host's launches: timed by
    events around one eager call each, a candidate of more kernels or a longer Python path (dequant + cuBLAS; a split
    K's sum) lost by its launch gaps. On a cold L2, as in a step (every layer's weights read once, the model many
    times the L2): timed warm, back to back on one weight of 2-13 MB, the picks favoured kernels that re-read their
    weight (H100: 1B qkv at 64 rows the wide kernel, 14.5 us in bench.kernels against the rules' wgmma 9.3;
    bench/results/2026-12-06-nvidia-h100-80gb-hbm3-kernels-s39-tuned-warm.json). Still timed one eager call at a time
    after a flush, two picks lost to the table's best (8B qkv at 32 rows two quant blocks a stage, 15.2 against
    14.5 us; 1B qkv at 128 wgmma, 13.2 against dequant + cuBLAS 12.1: -kernels-s40-wx.json); timed so, every pick
    at 16-128 rows of both models came within 1.5% of the table's best (H100, -kernels-s40-graphtune.json)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # build, warm and allocate (the dequant scratch) before the capture
        for _ in range(2):
            for call in calls:
                call()
    torch.cuda.current_stream().wait_stream(side)
    flush = _l2_flush_buffer()
    passes, flushes = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(passes):
        flush.zero_()
        for call in calls:
            call()
    with torch.cuda.graph(flushes):
        flush.zero_()
    ms = _median_replay(passes, repeats) - _median_replay(flushes, repeats)
    return max(ms, 0.0) / len(calls)


def _median_replay(graph: torch.cuda.CUDAGraph, repeats: int) -> float:
    """Median ms of `repeats` replays of `graph`, after two untimed."""
    times = []
    for i in range(repeats + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


_flush: torch.Tensor | None = None


def _l2_flush_buffer() -> torch.Tensor:
    """Twice the current GPU's L2 in bytes (held until release_l2_flush_buffer); where that does not fit (a KV
    cache sized near the whole memory), an empty buffer, and the candidates timed on a warm L2 (logged)."""
    global _flush
    if _flush is None:
        device = torch.cuda.current_device()
        size = 2 * torch.cuda.get_device_properties(device).L2_cache_size
        try:
            _flush = torch.empty(size, dtype=torch.uint8, device=device)
        except torch.cuda.OutOfMemoryError:
            log.warning("NF4 autotune: no room for a %d MiB L2 flush buffer; timing on a warm L2", size >> 20)
            _flush = torch.empty(0, dtype=torch.uint8, device=device)
    return _flush


def release_l2_flush_buffer() -> None:
    global _flush
    _flush = None


def tune(layers: dict[tuple[int, int], list], num_sms: int,
         timer: Callable[[list[Callable[[], object]]], float] = time_calls,
         rows_list: tuple[int, ...] = ROWS, cache: Path | None = None,
         key: str = "") -> dict[tuple[tuple[int, int], int], Choice]:
    """Time the candidates for each (shape: the NF4Linears of that shape, each candidate run on every one in turn)
    at each row count; record the fastest in nf4_dispatch.TUNED and return what it got. A candidate that raises is
    skipped (logged). A shape and row count already tuned in this process (an earlier engine on the same GPU) keeps
    its pick: timing again would cost the start-up time for nothing, and could pick another kernel on noise, so that
    two engines of one process would sum in different orders (the GPU suite compares such engines bit for bit).
    time_calls' L2 flush buffer is released at the end. Measured slower and removed (H100, 8B, 32 distinct adapters
    at batch 32: 5.42 against 5.36 ms a step; bench/results/2026-12-06-nvidia-h100-80gb-hbm3-8b-s42-beside-ab.log,
    the design in 9fae332): the LoRA linears' base matmul beside the side stream's shrink taking the fastest kernel
    that leaves the SMs room (not the x-resident kernel, whose one block an SM fills them).
    With `cache` (tuning_cache's file) the picks stored there under `key` are taken untimed, and what was timed is
    added to them."""
    stored = tuning_cache.load(cache, key) if cache is not None else {}
    chosen, timed, kept = {}, 0, 0
    try:
        for shape, group in layers.items():
            for rows in rows_list:
                if (shape, rows) in nf4_dispatch.TUNED:
                    continue
                best = stored.get((shape, rows))
                if best is not None and best not in candidates(rows, shape, num_sms):
                    log.warning("NF4 autotune: stored pick %s at %d rows of %s is no candidate here: timed", best,
                                rows, shape)
                    best = None
                if best is None:
                    best = _fastest(group, shape, rows, num_sms, timer)
                    timed += 1
                else:
                    kept += 1
                if best is not None:
                    chosen[(shape, rows)] = best
    finally:
        release_l2_flush_buffer()
    nf4_dispatch.TUNED.update(chosen)
    if cache is not None:
        if timed:
            tuning_cache.save(cache, key, {**stored, **chosen})
        log.info("NF4 autotune: %d picks from %s, %d timed", kept, cache, timed)
    return chosen


def _fastest(group: list, shape: tuple[int, int], rows: int, num_sms: int,
             timer: Callable[[list[Callable[[], object]]], float]) -> Choice | None:
    """The candidate `timer` finds fastest at `rows` rows over the layers of `group`; None where every one raised
    (logged)."""
    x = torch.randn(rows, shape[1], device=group[0].codes.device).to(group[0].compute_dtype)
    timed = []
    for choice in candidates(rows, shape, num_sms):
        try:
            timed.append((timer([_runner(layer, shape, x, choice) for layer in group]), choice))
        except Exception as exc:  # a variant this build or shape lacks: the others still compete
            log.warning("NF4 autotune: %s at %d rows of %s failed: %s", choice, rows, shape, exc)
    return min(timed, key=lambda t: t[0], default=(None, None))[1]


def _runner(layer, shape: tuple[int, int], x: torch.Tensor, choice: Choice) -> Callable[[], object]:
    """One call of `choice` on the layer's weights (the dispatch's own entry point, the kernel forced)."""
    state = layer.quant_state
    return lambda: nf4_dispatch.nf4_linear_cuda(x, layer.codes, layer.absmax_f, shape, state.code, None, state,
                                                kernel=choice.kernel, tiled=layer.tiled, options=dict(choice.options))


# The model's layers of one shape a candidate is timed over (time_calls): enough that they are read from HBM as in a
# step (16 layers of the 1B model's smallest weight, o: 2.4 MB each, ~39 MB against the H100's 50 MB L2, and the
# flush), few enough to keep start-up short.
TUNE_LAYERS = 16


def cache_path(cache_dir: Path) -> Path | None:
    """Where the engine keeps its picks (tuning_cache) under the server's cache_dir; None under
    LORAPLEX_NF4_TUNING_CACHE=0 (every start times afresh)."""
    if os.environ.get("LORAPLEX_NF4_TUNING_CACHE", "1") == "0":
        return None
    return Path(cache_dir) / tuning_cache.FILE_NAME


def tune_model(model: torch.nn.Module, cache: Path | None = None) -> str:
    """Tune every distinct NF4 weight shape of `model` (CUDA, with the tile layout) over up to TUNE_LAYERS of its
    layers of that shape, taking what `cache` holds for this GPU, software and kernel sources; a one-line
    summary."""
    from server.kernels.nf4.triton_nf4 import device_num_sms

    layers: dict[tuple[int, int], list] = {}
    for module in model.modules():
        if getattr(module, "is_quantized", False) and getattr(module, "tiled", None) is not None:
            group = layers.setdefault((module.out_features, module.in_features), [])
            if len(group) < TUNE_LAYERS:
                group.append(module)
    if not layers:
        return "no NF4 layer on CUDA"
    first = next(iter(layers.values()))[0]
    index = first.codes.device.index or 0
    key = "" if cache is None else tuning_cache.device_key(index, first.compute_dtype)
    chosen = tune(layers, device_num_sms(index), cache=cache, key=key)
    if not chosen:
        return "every shape tuned already in this process"
    return "; ".join(f"{out}x{inp}@{rows}: {choice}" for ((out, inp), rows), choice in sorted(chosen.items()))
