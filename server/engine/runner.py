"""Turn a scheduled batch into model inputs, run the forward, and return logits to sample from.

Decode has static shapes per batch-size bucket with all metadata in device tensors, so on CUDA each
bucket is captured once as a CUDA graph and replayed. Prefill runs eagerly (variable shapes), except
that a step whose prefill chunks are short rides the decode graph: a chunk of n tokens is n decode
rows of one sequence, row j at position start + j attending to positions 0..start + j, which is causal
prefill attention exactly (each layer writes every row's K/V before any row attends). An eager step of
an 8B model costs ~10 ms of host time for 32 layers of launches; a replay costs none, so a cached-prefix
hit or a new prompt arriving beside a decode batch no longer pays it.
"""

from __future__ import annotations

import logging
import os

import torch

from server.engine.cuda_graphs import DECODE_ROW_FIELDS, DecodeGraphs, tiled_lora_meta
from server.engine.kv_cache import KVCache
from server.engine.request import Request
from server.kernels.host_device import host_list, to_device
from server.kernels.lora.lora_ops import LoraBatchMeta, decode_lora_meta, make_lora_meta
from server.model.llama import CausalLM, PrefillSeq, StepContext
from server.model.loader import load_phase
from server.model.lora import LoraContext

log = logging.getLogger(__name__)

PROMPT_LOGPROB_ROWS = 256
# Prefill chunks ride a decode-graph replay only while their rows' contexts sum to at most this many
# tokens: each row reads its context alone, so this bounds the replay's extra attention reads (8B:
# 64k token-rows x 128 KiB of K/V per token = 8.6 GB, ~2 ms; a 16-token cached-prefix hit after 2,048
# tokens is 33k).
GRAPH_CONTEXT_ROWS = 1 << 16
# LORAPLEX_CHECK_STEP_INPUTS=1: check every index a step sends to the device on the host first, and name
# the one out of range (a device-side assert names nothing). For debugging: it costs host time per step.
CHECK_STEP_INPUTS = os.environ.get("LORAPLEX_CHECK_STEP_INPUTS") == "1"


class ModelRunner:
    """Owns the model's step inputs; `prefill` and `decode` return float32 logits."""

    def __init__(self, model: CausalLM, kv_cache: KVCache, max_batch_size: int, max_model_len: int,
                 use_lora: bool, use_cuda_graphs: bool, max_graph_rows: int = 0):
        self.model = model
        self.kv_cache = kv_cache
        self.device = model.device
        self.block_size = kv_cache.block_size
        self.max_blocks = -(-max_model_len // self.block_size)
        self.max_batch_size = max_batch_size
        self.use_lora = use_lora
        self.graphs = None
        self.prefill_in_graphs = max_graph_rows > 0  # short prefill chunks may ride a decode replay
        if use_cuda_graphs and self.device.type == "cuda":
            self.graphs = DecodeGraphs(self, max(max_batch_size, max_graph_rows), max_batch_size)

    def _slot_index(self, request: Request, position: int) -> int:
        block = request.block_ids[position // self.block_size]
        return block * self.block_size + position % self.block_size

    def prefill_step(self, chunks: list[tuple[Request, int]], requests: list[Request],
                     input_ids: torch.Tensor | None = None) -> tuple[torch.Tensor | None, bool]:
        """Run `chunks`: in one decode-graph replay with `requests` when they fit (True: the logits are
        the finishing chunks' rows, then one per request, whose decode is then done), else eagerly.
        `input_ids`: the requests' last tokens on the device (see decode)."""
        if self.graph_fits(chunks, requests):
            return self.decode(requests, chunks, input_ids), True
        return self.prefill(chunks), False

    @torch.inference_mode()
    def prefill(self, chunks: list[tuple[Request, int]]) -> torch.Tensor | None:
        """Run prefill chunks; logits [n, vocab] for the chunks that complete their prefill, in order.
        Every input goes to the device in asynchronous copies from pinned memory: no stream sync, so
        the host queues the eager forward while the GPU still runs the step before."""
        tokens, positions, slots, segments, last_rows, facts = [], [], [], [], [], []
        for request, chunk in chunks:
            start = request.num_computed_tokens
            q_start = len(tokens)
            tokens += request.all_token_ids[start : start + chunk]
            positions += range(start, start + chunk)
            slots += [self._slot_index(request, p) for p in range(start, start + chunk)]
            facts.append((q_start, chunk, start + chunk, request.block_ids))
            segments.append((q_start, chunk, request.slot))
            if start + chunk == request.prefill_target:
                last_rows.append(len(tokens) - 1)
        if CHECK_STEP_INPUTS:
            self._check_inputs("prefill", tokens, positions, slots, [blocks for *_, blocks in facts],
                               [slot for *_, slot in segments])
        inputs = to_device([tokens, positions, slots], torch.long, self.device)
        width = max(len(blocks) for *_, blocks in facts)
        tables = to_device([blocks + [0] * (width - len(blocks)) for *_, blocks in facts], torch.long, self.device)
        seqs = [PrefillSeq(q_start, n, ctx_len, tables[i, : len(blocks)], list(blocks))
                for i, (q_start, n, ctx_len, blocks) in enumerate(facts)]
        ctx = StepContext(
            is_prefill=True,
            slot_mapping=inputs[2],
            prefill_seqs=seqs,
            fresh_groups=self._fresh_groups(seqs),
            lora=self._prefill_lora(segments),
        )
        hidden = self.model(inputs[0], inputs[1], ctx)
        for (request, chunk), seq in zip(chunks, seqs, strict=True):
            if request.params.prompt_logprobs is not None and not request.output_token_ids:
                self._prompt_logprobs(request, hidden[seq.q_start : seq.q_start + chunk], seq.ctx_len - chunk)
        if not last_rows:
            return None
        return self.model.compute_logits(hidden[to_device(last_rows, torch.long, self.device)])

    def prepare(self, max_num_batched_tokens: int, lora_variants: tuple[bool, ...]) -> None:
        """Start-up work on CUDA, before serving: capture every decode graph (each capture met while
        serving stalls every request), then run eager prefills of the sizes a server meets, so that
        what the first prefill of a shape pays once is paid here: on the H200 a fresh server's first
        eager prefill (8 prompts of 128 tokens) took 0.9 s against ~15 ms for the next ones (cuBLAS
        and attention kernels that CUDA loads at first use, the allocator's growth)."""
        if self.graphs is not None:
            with load_phase("cuda graphs", f"decode steps of up to {self.graphs.max_rows} rows"):
                self.graphs.capture_all(lora_variants)
        if self.device.type == "cuda":
            with load_phase("prefill warm-up", f"eager prefills of up to {max_num_batched_tokens} tokens"):
                try:
                    self.warm_up_prefill(max_num_batched_tokens)
                except torch.cuda.OutOfMemoryError:  # serving fails such a prefill alone; start anyway
                    log.warning("prefill warm-up: out of memory at %d tokens; the largest prefills may fail",
                                max_num_batched_tokens)
                    torch.cuda.empty_cache()

    @torch.inference_mode()
    def warm_up_prefill(self, max_tokens: int) -> int:
        """Eager prefills of batches of 512 tokens up to `max_tokens` (doubling): each once as fresh
        prompts of one length (one attention call per length) and once as chunks after a cached prefix
        (the Triton attention over the paged cache), then once two fresh prompts of different lengths (the
        FlashAttention varlen call, whose module loads at first use), through the adapter kernels when the
        model has them (slot 0, still empty: rank 0). Nothing is written to the KV cache (slot -1) or
        sampled. Returns the number of forwards run."""
        length = max(1, min(128, self.max_blocks * self.block_size - self.block_size))
        runs, total = 0, min(512, max_tokens)
        while True:
            for prefix in (0, self.block_size):
                self._dummy_prefill([length] * max(1, total // length), prefix)
                runs += 1
            if total >= max_tokens:
                break
            total = min(2 * total, max_tokens)
        self._dummy_prefill([length, max(1, length // 2)], 0)
        runs += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return runs

    def _dummy_prefill(self, lengths: list[int], prefix: int) -> None:
        """One eager forward over chunks of `lengths` tokens, each after `prefix` cached tokens (block 0)."""
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        num_blocks = -(-(prefix + max(lengths)) // self.block_size)
        table = torch.zeros(num_blocks, dtype=torch.long, device=self.device)
        seqs = [PrefillSeq(q_start, n, prefix + n, table, [0] * num_blocks) for q_start, n in zip(starts, lengths,
                                                                                                   strict=True)]
        num_tokens = sum(lengths)
        ctx = StepContext(is_prefill=True, slot_mapping=torch.full((num_tokens,), -1, device=self.device),
                          prefill_seqs=seqs, fresh_groups=self._fresh_groups(seqs),
                          lora=self._prefill_lora([(q_start, n, 0) for q_start, n in zip(starts, lengths,
                                                                                           strict=True)]))
        positions = torch.cat([torch.arange(prefix, prefix + n, device=self.device) for n in lengths])
        hidden = self.model(torch.zeros(num_tokens, dtype=torch.long, device=self.device), positions, ctx)
        last_rows = torch.tensor([s + n - 1 for s, n in zip(starts, lengths, strict=True)], device=self.device)
        self.model.compute_logits(hidden[last_rows])

    def _check_inputs(self, kind: str, tokens: list[int], positions: list[int], slots: list[int],
                      tables: list[list[int]], lora_slots: list[int]) -> None:
        """Raise naming the first index of a step that is out of range (LORAPLEX_CHECK_STEP_INPUTS=1)."""
        limits = {"token id": (tokens, 0, self.model.config.vocab_size),
                  "position": (positions, 0, self.model.rope.shape[0]),
                  "KV slot": (slots, 0, self.kv_cache.num_blocks * self.block_size),
                  "block id": ([b for t in tables for b in t], 0, self.kv_cache.num_blocks),
                  "block table width": ([len(t) for t in tables], 0, self.max_blocks + 1)}
        if self.use_lora:
            limits["LoRA slot"] = (lora_slots, -1, self.model.lora_linears()[0][1].layout.num_slots)  # -1: none
        for name, (values, low, high) in limits.items():
            bad = [v for v in values if not low <= v < high]
            if bad:
                raise RuntimeError(f"{kind} step: {name} {bad[0]} outside [{low}, {high}) "
                                   f"({len(bad)} of {len(values)})")

    def _prompt_logprobs(self, request: Request, hidden: torch.Tensor, start: int) -> None:
        """Append the logprobs of the prompt tokens this chunk predicts (positions start + 1 ...) to
        request.prompt_logprobs, PROMPT_LOGPROB_ROWS rows of logits at a time (a 128k vocabulary makes
        a whole chunk's float32 logits gigabytes)."""
        prompt = request.prompt_token_ids
        if start == 0:  # (again, after a preemption before the first token)
            request.prompt_logprobs = [None]  # nothing predicts the first token
        rows = min(hidden.shape[0], len(prompt) - 1 - start)
        k = request.params.prompt_logprobs
        for first in range(0, max(rows, 0), PROMPT_LOGPROB_ROWS):
            last = min(rows, first + PROMPT_LOGPROB_ROWS)
            logprobs = self.model.compute_logits(hidden[first:last]).float().log_softmax(dim=-1)
            targets = torch.tensor(prompt[start + first + 1 : start + last + 1], device=logprobs.device)
            chosen = logprobs.gather(1, targets[:, None])
            rank = (logprobs > chosen).sum(dim=-1, keepdim=True) + 1
            top_values, top_ids = logprobs.topk(k, dim=-1) if k else (chosen[:, :0], chosen[:, :0])
            host = host_list(torch.cat([chosen.double(), rank.double(), top_ids.double(), top_values.double()], 1))
            request.prompt_logprobs += [
                (row[0], int(row[1]), [(int(t), v) for t, v in zip(row[2 : 2 + k], row[2 + k :], strict=True)])
                for row in host
            ]

    def _fresh_groups(self, seqs: list[PrefillSeq]) -> list[torch.Tensor]:
        """Token rows [num_seqs, length] of whole prompts (no cached prefix), grouped by length."""
        by_length: dict[int, list[int]] = {}
        for seq in seqs:
            if seq.ctx_len == seq.q_len:
                by_length.setdefault(seq.q_len, []).append(seq.q_start)
        return [to_device([list(range(start, start + length)) for start in starts], torch.long, self.device)
                for length, starts in by_length.items()]

    def _prefill_lora(self, segments: list[tuple[int, int, int]]) -> LoraContext | None:
        if not self.use_lora or all(slot < 0 for _, _, slot in segments):
            return None
        meta = make_lora_meta([n for _, n, _ in segments], [s for _, _, s in segments], self.device)
        return LoraContext(meta=meta, host_segments=segments)

    @property
    def graph_prefill_rows(self) -> int:
        """Rows of the largest replay that prefill chunks may ride (0: they never do); the scheduler sizes
        its prefill budget beside decode rows by it."""
        return self.graphs.max_rows if self.graphs is not None and self.prefill_in_graphs else 0

    def graph_fits(self, chunks: list[tuple[Request, int]], requests: list[Request]) -> bool:
        """Whether this step's prefill chunks and decode rows run as one graph replay (one row a token)."""
        if not self.graph_prefill_rows or any(r.params.prompt_logprobs is not None for r, _ in chunks):
            return False
        if not self.graphs.fits(len(requests) + len(chunks)):
            return False
        # Row j of a chunk reads its whole context on its own (the decode kernel shares no key tile
        # between rows, as prefill attention does): bound the rows' total context.
        context = sum(n * r.num_computed_tokens + n * (n + 1) // 2 for r, n in chunks)
        return len(requests) + sum(n for _, n in chunks) <= self.graph_prefill_rows and context <= GRAPH_CONTEXT_ROWS

    def decode_rows(self, requests: list[Request], padded: int,
                    chunks: list[tuple[Request, int]] = ()) -> tuple[list[list[int]], list[list[int]]]:
        """Host facts of `padded` rows: one row per token of each prefill chunk, then one per decode
        request, then padding. Returns (six lists of `padded` ints: DECODE_ROW_FIELDS, then the index of
        each row's sequence in the tables), (one block list per sequence, then [] for padding rows)."""
        owners: list[int] = []
        positions: list[int] = []
        input_ids: list[int] = []
        sequences: list[Request] = []
        for request, chunk in chunks:
            start = request.num_computed_tokens
            owners += [len(sequences)] * chunk
            positions += range(start, start + chunk)
            input_ids += request.all_token_ids[start : start + chunk]
            sequences.append(request)
        for request in requests:
            owners.append(len(sequences))
            positions.append(request.num_tokens - 1)
            last = request.output_token_ids[-1] if request.output_token_ids else request.prompt_token_ids[-1]
            input_ids.append(max(last, 0))  # a placeholder (-1) is replaced on the device
            sequences.append(request)
        pad = [0] * (padded - len(owners))
        slots = [self._slot_index(sequences[o], p) for o, p in zip(owners, positions, strict=True)]
        lora_slots = [sequences[o].slot for o in owners]
        if CHECK_STEP_INPUTS:
            self._check_inputs("decode", input_ids, positions, slots, [r.block_ids for r in sequences], lora_slots)
        rows = [input_ids + pad, positions + pad, slots + [-1] * len(pad), [p + 1 for p in positions] + pad,
                lora_slots + [-1] * len(pad), owners + [len(sequences)] * len(pad)]
        return rows, [r.block_ids for r in sequences] + [[]]

    def decode_inputs(self, requests: list[Request], padded: int,
                      chunks: list[tuple[Request, int]] = ()) -> dict[str, torch.Tensor]:
        """decode_rows as host tensors (the eager path and graph capture)."""
        rows, tables = self.decode_rows(requests, padded, chunks)
        table = torch.tensor([t + [0] * (self.max_blocks - len(t)) for t in tables], dtype=torch.int32)
        inputs = {name: torch.tensor(values, dtype=DECODE_ROW_FIELDS[name])
                  for name, values in zip(DECODE_ROW_FIELDS, rows, strict=False)}
        inputs["block_tables"] = table[torch.tensor(rows[-1])]
        return inputs

    @staticmethod
    def _decode_lora_meta(inputs: dict[str, torch.Tensor]) -> LoraBatchMeta:
        """One LoRA segment a row, or, in a tiled graph's step (cuda_graphs.lora_tiles), the static segments."""
        return tiled_lora_meta(inputs) if "lora_tile_starts" in inputs else decode_lora_meta(inputs["lora_slots"])

    def forward_decode(self, inputs: dict[str, torch.Tensor], with_lora: bool, chunks: bool = False) -> torch.Tensor:
        """The capturable decode step: device tensors in, logits [rows, vocab] out. `chunks`: rows may be prompt
        chunks' tokens, which read k/v that other rows of the step write."""
        lora = LoraContext(meta=self._decode_lora_meta(inputs)) if with_lora else None
        ctx = StepContext(
            is_prefill=False,
            slot_mapping=inputs["slot_mapping"],
            block_tables=inputs["block_tables"],
            context_lens=inputs["context_lens"],
            lora=lora,
            rows_read_own_kv=not chunks,
        )
        hidden = self.model(inputs["input_ids"], inputs["positions"], ctx)
        if "logit_rows" in inputs:  # a graph's step: only the rows that sample (DecodeGraphs.step_inputs)
            hidden = hidden.index_select(0, inputs["logit_rows"])
        return self.model.compute_logits(hidden, float32=False)  # Sampler.sample_async casts when a row needs it

    @torch.inference_mode()
    def decode(self, requests: list[Request], chunks: list[tuple[Request, int]] = (),
               input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """One token for each request; logits [len(requests), vocab]. With `chunks` (only when
        graph_fits), their tokens run in the same replay and the logits of the chunks that complete
        their prefill come first, in order. `input_ids` [len(requests)] on the device: the requests' last
        tokens, still unknown to the host (a step launched ahead, engine.overlap); their host lists end in
        a placeholder."""
        with_lora = self.use_lora and any(r.slot >= 0 for r in [*requests, *(r for r, _ in chunks)])
        if chunks:
            return self.graphs.run(requests, with_lora, chunks, input_ids)
        if self.graphs is not None and len(requests) <= self.graphs.max_rows and self.graphs.fits(len(requests)):
            return self.graphs.run(requests, with_lora, input_ids=input_ids)
        inputs = self.decode_inputs(requests, len(requests))
        # Eager steps need no static shape: trim the block tables to the longest sequence so that the
        # torch attention path (CPU) reads what the batch holds, not max_model_len.
        used_blocks = max(len(r.block_ids) for r in requests)
        inputs["block_tables"] = inputs["block_tables"][:, :used_blocks].contiguous()
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}
        if input_ids is not None:
            inputs["input_ids"] = input_ids
        return self.forward_decode(inputs, with_lora)
