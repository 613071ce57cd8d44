"""CUDA graphs for the decode step, one per (batch-size bucket, with/without LoRA).

A decode step of a small model is mostly kernel-launch and Python overhead (HF: 27 ms for a 1B
model whose weights take 0.4 ms to read). Capturing the whole forward once per bucket and replaying
it removes that. Inputs live in static device buffers; each step copies the host-built metadata in
(one asynchronous copy) and replays; the LM head runs only on the rows that sample. Every bucket is captured
at start-up (the engine's "cuda graphs" loading phase; a capture in the middle of serving stalls every
running stream) and all share one memory pool.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os

import torch

from server.kernels.backends import triton_available
from server.kernels.host_device import to_device
from server.kernels.lora.lora_meta import LoraBatchMeta
from server.kernels.lora.shrink_workspace import ShrinkWorkspace

log = logging.getLogger(__name__)

# The per-row inputs of a decode step (and of prefill chunks riding it), in decode_rows' order.
DECODE_ROW_FIELDS = {"input_ids": torch.long, "positions": torch.long, "slot_mapping": torch.long,
                     "context_lens": torch.int32, "lora_slots": torch.int32}
DECODE_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
# A replay that carries prompt chunks runs a graph of its own ("chunk graphs", buckets from CHUNK_MIN_BUCKET):
# - its rows read k/v that other rows of the step write (a chunk's token p reads tokens p-1, p-2, ... of its chunk),
#   so k/v go to the cache in a kernel of their own before attention; graphs of decode rows alone let the attention
#   kernel write each row's k/v itself (StepContext.rows_read_own_kv: one launch fewer a layer);
# - with LoRA, it gives the LoRA kernels each chunk's rows in segments of up to LORA_TILE rows (one segment per
#   decode row, as before). With one segment a row, a chunk's every token read its adapter's whole B (rank x out)
#   and A on its own: on the H200 four 128-token prompts beside 32 decode rows (1B, 32 adapters) cost 3.3 ms of
#   expand and 1.4 ms of shrink on the GPU, more than the base layers they passed through; in tiles 0.6 and 0.6, and
#   each prompt's wall time beside the decode batch 2.28 -> 1.42 ms (engine_loop --carry 4, eighteenth session).
#   LORAPLEX_LORA_TILE=0 turns the tiles off (A/B timing).
# A chunk step of fewer rows than CHUNK_MIN_BUCKET replays the CHUNK_MIN_BUCKET graph: 9 chunk buckets (64-1,024)
# a LoRA variant instead of 16, for the rare step of a few decode rows and a short chunk.
LORA_TILE = int(os.environ.get("LORAPLEX_LORA_TILE", "16"))
# There the shrink takes a tile a program (LoraBatchMeta.shrink_tiles); LORAPLEX_LORA_TILE_SHRINK=token: a program a
# token, as in decode steps (A/B).
SHRINK_TILES = os.environ.get("LORAPLEX_LORA_TILE_SHRINK", "tile") != "token"
# LORAPLEX_LORA_ONE_FILL=1: the split-K LoRA shrinks of a captured step take their zeroed h from one buffer zeroed
# once at the step's start (server/kernels/lora/shrink_workspace.py), where each shrink has its own fill kernel (128 in
# an 8B step). Off: slower on the H200 (twenty-ninth session, 8B mixed32 decode step, unprofiled wall 5.93 -> 7.00 ms,
# while the LoRA kernels' summed time fell 3.36 -> 2.32 ms): without the fill ahead of it, each shrink reaches the
# SMs as early as the base NF4 kernel beside it and takes blocks from the step's critical path.
ONE_FILL = os.environ.get("LORAPLEX_LORA_ONE_FILL", "0") == "1"
CHUNK_MIN_BUCKET = 64


def bucket_for(batch_size: int, max_batch_size: int) -> int:
    for bucket in DECODE_BUCKETS:
        if bucket >= batch_size:
            return min(bucket, max(max_batch_size, batch_size))
    return batch_size


def logit_rows(requests, chunks=()) -> list[int]:
    """The rows of a replay whose logits are sampled: the last row of each chunk that completes its prefill, in
    order, then one per decode request (rows as decode_rows lays them out: chunk tokens first)."""
    rows, last = [], 0
    for request, chunk in chunks:
        last += chunk
        if request.num_computed_tokens + chunk == request.prefill_target:
            rows.append(last - 1)
    return rows + list(range(last, last + len(requests)))


def lora_tiles(requests, chunks=(), tile: int = LORA_TILE) -> tuple[list[int], list[int]]:
    """The LoRA segments of a replay's rows (laid out as decode_rows lays them): each chunk's rows in pieces of at
    most `tile`, then one per decode request. Returns (starts [n + 1], adapter slots [n])."""
    starts, slots = [0], []
    for request, chunk in chunks:
        for first in range(0, chunk, tile):
            starts.append(starts[-1] + min(tile, chunk - first))
            slots.append(request.slot)
    for request in requests:
        starts.append(starts[-1] + 1)
        slots.append(request.slot)
    return starts, slots


def max_lora_tiles(bucket: int, max_sequences: int, tile: int = LORA_TILE) -> int:
    """A bound on lora_tiles' segments for a replay of `bucket` rows and at most `max_sequences` sequences: each
    sequence's rows take at most (rows + tile - 1) // tile of them, so all take at most bucket // tile + sequences,
    and never more than one a row."""
    return min(bucket, max_sequences + bucket // tile)


def tiled_lora_meta(inputs: dict[str, torch.Tensor]) -> LoraBatchMeta:
    """The LoRA metadata of a tiled graph's step: its static segments (lora_tiles, padded), one slot a row."""
    return LoraBatchMeta(seg_starts=inputs["lora_tile_starts"], seg_slots=inputs["lora_tile_slots"],
                         token_slots=inputs["lora_slots"], max_seg_len=LORA_TILE, shrink_tiles=SHRINK_TILES)


def scatter_torch(inputs: dict[str, torch.Tensor], values: torch.Tensor, bucket: int, width: int,
                  num_tables: int) -> None:
    """Spread a step's values (DecodeGraphs._fill's layout: the fields [6, bucket] in DECODE_ROW_FIELDS' order then
    the owners, the tables [num_tables, width], the logit rows, the tiles' starts and slots) into the static inputs
    with torch ops: triton_step_inputs' semantics."""
    fields = len(DECODE_ROW_FIELDS) + 1
    per_row = values[: fields * bucket].view(fields, bucket)
    for index, name in enumerate(DECODE_ROW_FIELDS):
        inputs[name].copy_(per_row[index])
    table = values[fields * bucket : fields * bucket + num_tables * width].view(num_tables, width)
    inputs["block_tables"][:, :width].copy_(table.index_select(0, per_row[-1]))
    start = fields * bucket + num_tables * width
    for name in ("logit_rows", "lora_tile_starts", "lora_tile_slots"):
        if name in inputs:
            count = inputs[name].numel()
            inputs[name].copy_(values[start : start + count])
            start += count


class DecodeGraphs:
    """Captured decode steps keyed by (bucket, with_lora, chunks): chunk graphs run the steps that carry prompt
    chunks (their k/v written before attention; with LoRA, their segments in tiles of LORA_TILE rows)."""

    # Static inputs written by one kernel (triton_step_inputs) rather than ~9 torch ops; LORAPLEX_FILL_KERNEL=0 turns
    # it off. On since the twenty-third session: its GPU tests passed, and at 1B batch 32 the step's other glue went
    # from 13 launches (16.6 us) to 6 (9.0 us), the step 1.153 -> 1.145 ms (bench.profile_step, H200).
    fill_kernel = False

    def __init__(self, runner, max_rows: int, max_sequences: int):
        self.runner = runner
        self.fill_kernel = (runner.device.type == "cuda" and os.environ.get("LORAPLEX_FILL_KERNEL", "1") == "1"
                            and triton_available())
        self.max_rows = max_rows  # decode rows plus prefill-chunk tokens of one replay
        # Sequences of one step (the scheduler's max_batch_size): a replay computes logits for at most this many
        # rows, not for the whole bucket. A 1,024-row bucket's LM head over every row was 1,024 x 128,256 fp32
        # logits (525 MB) and, on the 1B shape, ~0.5 TFLOP a replay for the 33 rows that sample.
        self.max_sequences = max_sequences
        self.pool = torch.cuda.graph_pool_handle()
        self._graphs: dict[tuple[int, bool, bool], tuple[dict[str, torch.Tensor], torch.Tensor,
                                                         torch.cuda.CUDAGraph]] = {}

    def fits(self, num_sequences: int) -> bool:
        """Whether a replay can return the logits of this many sequences (else the step runs eagerly)."""
        return num_sequences <= self.max_sequences

    def run(self, requests, with_lora: bool, chunks=(), input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replay for `requests` (one decode row each) after `chunks` (one row per prefill token); returns the
        logits of `logit_rows`: one row per chunk that completes its prefill, in order, then one per request.
        `input_ids`: the decode rows' input ids, on the device."""
        key = (self._bucket(len(requests) + sum(n for _, n in chunks), bool(chunks)), with_lora, bool(chunks))
        inputs = self._static_inputs(key)
        wanted = logit_rows(requests, chunks)
        tiles = lora_tiles(requests, chunks) if self._tiled(*key[1:]) else None
        self._fill(inputs, *self.runner.decode_rows(requests, key[0], chunks), wanted, tiles)
        if input_ids is not None:
            first = sum(n for _, n in chunks)
            inputs["input_ids"][first : first + len(requests)].copy_(input_ids)
        return self._replay(key)[: len(wanted)]

    def _bucket(self, rows: int, chunks: bool) -> int:
        """The graph bucket of a replay of `rows` rows: chunk graphs start at CHUNK_MIN_BUCKET rows."""
        return bucket_for(max(rows, min(CHUNK_MIN_BUCKET, self.max_rows)) if chunks else rows, self.max_rows)

    @staticmethod
    def _tiled(with_lora: bool, chunks: bool) -> bool:
        """Whether a graph's LoRA segments are tiles (lora_tiles) rather than one a row."""
        return with_lora and chunks and LORA_TILE > 0

    def step_inputs(self, bucket: int, tiled: bool = False) -> dict[str, torch.Tensor]:
        """Host tensors of an empty step of `bucket` rows (the shapes a graph captures)."""
        inputs = self.runner.decode_inputs([], bucket)
        inputs["logit_rows"] = torch.zeros(min(bucket, self.max_sequences), dtype=torch.long)
        if tiled:  # empty segments (start = end) of no adapter, as padding stays
            tiles = max_lora_tiles(bucket, self.max_sequences)
            inputs["lora_tile_starts"] = torch.zeros(tiles + 1, dtype=torch.int32)
            inputs["lora_tile_slots"] = torch.full((tiles,), -1, dtype=torch.int32)
        return inputs

    def _static_inputs(self, key: tuple[int, bool, bool]) -> dict[str, torch.Tensor]:
        if key not in self._graphs:
            self._graphs[key] = self._capture(*key)
        return self._graphs[key][0]

    def _replay(self, key: tuple[int, bool, bool]) -> torch.Tensor:
        _, logits, graph = self._graphs[key]
        graph.replay()
        return logits

    def _fill(self, inputs: dict[str, torch.Tensor], rows: list[list[int]], tables: list[list[int]],
              wanted: list[int], tiles: tuple[list[int], list[int]] | None = None) -> None:
        """Write a step's rows into the static inputs: one pinned, asynchronous copy of every value (no
        stream sync: the host may run ahead of the GPU), then device-side copies. Block tables go as
        one row per sequence, only as wide as the longest, and are gathered per row on the device: the
        columns past that width keep stale entries, which no row's context length reaches. `wanted`: the
        rows whose logits the step needs, padded with row 0 to the graph's logit rows. `tiles`: lora_tiles' segments
        (a tiled graph), padded with empty segments of slot -1. On CUDA one kernel spreads the values
        (triton_step_inputs), elsewhere scatter_torch."""
        width = max(1, max(len(t) for t in tables))
        padded = wanted + [0] * (inputs["logit_rows"].numel() - len(wanted))
        flat = sum(rows, []) + [block for t in tables for block in t + [0] * (width - len(t))] + padded
        if tiles is not None:
            starts, slots = tiles
            pad = inputs["lora_tile_slots"].numel() - len(slots)
            flat += starts + [starts[-1]] * pad + slots + [-1] * pad
        values = to_device(flat, torch.long, self.runner.device)
        if self.fill_kernel:
            from server.kernels.triton_step_inputs import scatter_step_inputs

            scatter_step_inputs(inputs, values, tuple(DECODE_ROW_FIELDS), len(rows[0]), width, len(tables))
        else:
            scatter_torch(inputs, values, len(rows[0]), width, len(tables))

    def capture_all(self, lora_variants: tuple[bool, ...]) -> int:
        """Capture every bucket up to max_rows now (at start-up), so no serving step pays a capture."""
        buckets = sorted({bucket_for(rows, self.max_rows) for rows in range(1, self.max_rows + 1)})
        gc.collect()  # dead graphs go now, not in the middle of a capture (_no_garbage_collection)
        keys = [(bucket, with_lora, False) for bucket in buckets for with_lora in lora_variants]
        if self.runner.prefill_in_graphs:
            chunk_buckets = sorted({self._bucket(rows, chunks=True) for rows in buckets})
            keys += [(bucket, with_lora, True) for bucket in chunk_buckets for with_lora in lora_variants]
        for key in keys:
            if key not in self._graphs:
                self._graphs[key] = self._capture(*key)
        for tiled in (False, True) if self.fill_kernel else ():  # its two variants compiled now, not mid-serving
            key = next((key for key in keys if self._tiled(*key[1:]) == tiled), None)
            if key is not None:
                self._fill(self._graphs[key][0], *self.runner.decode_rows([], key[0]), [],
                           lora_tiles([]) if tiled else None)
        return len(self._graphs)

    def _capture(self, bucket: int, with_lora: bool, chunks: bool):
        tiled = self._tiled(with_lora, chunks)
        inputs = {k: v.to(self.runner.device) for k, v in self.step_inputs(bucket, tiled).items()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        workspace = ShrinkWorkspace()
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up: autotuning, lazy inits and allocations happen outside capture
                with workspace.sizing() if ONE_FILL else contextlib.nullcontext():
                    self.runner.forward_decode(inputs, with_lora, chunks)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        one_fill = workspace.serving(self.runner.device) if workspace.needed else contextlib.nullcontext()
        with _no_garbage_collection(), torch.cuda.graph(graph, pool=self.pool), one_fill:
            logits = self.runner.forward_decode(inputs, with_lora, chunks)
        torch.cuda.synchronize()
        log.debug("captured decode graph: batch bucket %d, lora=%s, chunks=%s", bucket, with_lora, chunks)
        return inputs, logits, graph

    @property
    def num_captured(self) -> int:
        return len(self._graphs)


@contextlib.contextmanager
def _no_garbage_collection():
    """No garbage collection until the capture ends. A CUDAGraph that the collector frees mid-capture (an earlier
    engine's, kept alive by a reference cycle) resets itself with a call not permitted while a stream captures,
    which invalidates the capture (the H200 GPU suite, a test building three engines). torch.cuda.graph no longer
    collects on entry unless torch.compiler.config.force_cudagraph_gc is set; capture_all collects once."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
