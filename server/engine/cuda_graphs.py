"""CUDA graphs for the decode step, one per (batch-size bucket, with/without LoRA).

A decode step of a small model is mostly kernel-launch and Python overhead (HF: 27 ms for a 1B
model whose weights take 0.4 ms to read). Capturing the whole forward once per bucket and replaying
it removes that. Inputs live in static device buffers; each step copies the host-built metadata in
(one asynchronous copy), replays, and reads the logits rows it needs. Every bucket is captured
at start-up (the engine's "cuda graphs" loading phase; a capture in the middle of serving stalls every
running stream) and all share one memory pool.
"""

from __future__ import annotations

import contextlib
import gc
import logging

import torch

from server.model.host_device import to_device

log = logging.getLogger(__name__)

# The per-row inputs of a decode step (and of prefill chunks riding it), in decode_rows' order.
DECODE_ROW_FIELDS = {"input_ids": torch.long, "positions": torch.long, "slot_mapping": torch.long,
                     "context_lens": torch.int32, "lora_slots": torch.int32}
DECODE_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


def bucket_for(batch_size: int, max_batch_size: int) -> int:
    for bucket in DECODE_BUCKETS:
        if bucket >= batch_size:
            return min(bucket, max(max_batch_size, batch_size))
    return batch_size


class DecodeGraphs:
    """Captured decode steps keyed by (bucket, with_lora)."""

    def __init__(self, runner, max_rows: int):
        self.runner = runner
        self.max_rows = max_rows  # decode rows plus prefill-chunk tokens of one replay
        self.pool = torch.cuda.graph_pool_handle()
        self._graphs: dict[tuple[int, bool], tuple[dict[str, torch.Tensor], torch.Tensor, torch.cuda.CUDAGraph]] = {}

    def run(self, requests, with_lora: bool, chunks=(), input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replay for `requests` (one decode row each) after `chunks` (one row per prefill token);
        returns the bucket's logits [bucket, vocab], rows in that order, then padding. `input_ids`: the
        decode rows' input ids, on the device."""
        bucket = bucket_for(len(requests) + sum(n for _, n in chunks), self.max_rows)
        key = (bucket, with_lora)
        if key not in self._graphs:
            self._graphs[key] = self._capture(bucket, with_lora)
        inputs, logits, graph = self._graphs[key]
        self._fill(inputs, *self.runner.decode_rows(requests, bucket, chunks))
        if input_ids is not None:
            first = sum(n for _, n in chunks)
            inputs["input_ids"][first : first + len(requests)].copy_(input_ids)
        graph.replay()
        return logits

    def _fill(self, inputs: dict[str, torch.Tensor], rows: list[list[int]], tables: list[list[int]]) -> None:
        """Write a step's rows into the static inputs: one pinned, asynchronous copy of every value (no
        stream sync: the host may run ahead of the GPU), then device-side copies. Block tables go as
        one row per sequence, only as wide as the longest, and are gathered per row on the device: the
        columns past that width keep stale entries, which no row's context length reaches."""
        width = max(1, max(len(t) for t in tables))
        flat = sum(rows, []) + [block for t in tables for block in t + [0] * (width - len(t))]
        values = to_device(flat, torch.long, self.runner.device)
        bucket = len(rows[0])
        per_row = values[: len(rows) * bucket].view(len(rows), bucket)
        for index, name in enumerate(DECODE_ROW_FIELDS):
            inputs[name].copy_(per_row[index])
        table = values[len(rows) * bucket :].view(len(tables), width)
        inputs["block_tables"][:, :width].copy_(table.index_select(0, per_row[-1]))

    def capture_all(self, lora_variants: tuple[bool, ...]) -> int:
        """Capture every bucket up to max_rows now (at start-up), so no serving step pays a capture."""
        buckets = sorted({bucket_for(rows, self.max_rows) for rows in range(1, self.max_rows + 1)})
        gc.collect()  # dead graphs go now, not in the middle of a capture (_no_garbage_collection)
        for bucket in buckets:
            for with_lora in lora_variants:
                if (bucket, with_lora) not in self._graphs:
                    self._graphs[(bucket, with_lora)] = self._capture(bucket, with_lora)
        return len(self._graphs)

    def _capture(self, bucket: int, with_lora: bool):
        inputs = {k: v.to(self.runner.device) for k, v in self.runner.decode_inputs([], bucket).items()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up: autotuning, lazy inits and allocations happen outside capture
                self.runner.forward_decode(inputs, with_lora)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with _no_garbage_collection(), torch.cuda.graph(graph, pool=self.pool):
            logits = self.runner.forward_decode(inputs, with_lora)
        torch.cuda.synchronize()
        log.debug("captured decode graph: batch bucket %d, lora=%s", bucket, with_lora)
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
