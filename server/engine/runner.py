"""Turn a scheduled batch into model inputs, run the forward, and return logits to sample from.

Prefill runs eagerly (variable shapes). Decode has static shapes per batch-size bucket with all
metadata in device tensors, so on CUDA each bucket is captured once as a CUDA graph and replayed.
"""

from __future__ import annotations

import logging

import torch

from server.engine.kv_cache import KVCache
from server.engine.request import Request
from server.model.host_device import host_list, to_device
from server.model.llama import CausalLM, PrefillSeq, StepContext
from server.model.lora import LoraContext
from server.model.lora_ops import decode_lora_meta, make_lora_meta

log = logging.getLogger(__name__)

PROMPT_LOGPROB_ROWS = 256


class ModelRunner:
    """Owns the model's step inputs; `prefill` and `decode` return float32 logits."""

    def __init__(self, model: CausalLM, kv_cache: KVCache, max_batch_size: int, max_model_len: int,
                 use_lora: bool, use_cuda_graphs: bool):
        self.model = model
        self.kv_cache = kv_cache
        self.device = model.device
        self.block_size = kv_cache.block_size
        self.max_blocks = -(-max_model_len // self.block_size)
        self.max_batch_size = max_batch_size
        self.use_lora = use_lora
        self.graphs = None
        if use_cuda_graphs and self.device.type == "cuda":
            from server.engine.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self, max_batch_size)

    def _slot_index(self, request: Request, position: int) -> int:
        block = request.block_ids[position // self.block_size]
        return block * self.block_size + position % self.block_size

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

    def decode_inputs(self, requests: list[Request], padded: int) -> dict[str, torch.Tensor]:
        """Host-built decode metadata for `padded` rows (rows past len(requests) are padding)."""
        pad = padded - len(requests)
        positions = [r.num_tokens - 1 for r in requests]
        tables = [r.block_ids + [0] * (self.max_blocks - len(r.block_ids)) for r in requests]
        input_ids = torch.tensor([r.output_token_ids[-1] if r.output_token_ids else r.prompt_token_ids[-1]
                                  for r in requests] + [0] * pad, dtype=torch.long)
        slot_mapping = torch.tensor(
            [self._slot_index(r, p) for r, p in zip(requests, positions, strict=True)] + [-1] * pad,
            dtype=torch.long,
        )
        context_lens = torch.tensor([r.num_tokens for r in requests] + [0] * pad, dtype=torch.int32)
        block_tables = torch.tensor(tables + [[0] * self.max_blocks] * pad, dtype=torch.int32)
        lora_slots = torch.tensor([r.slot for r in requests] + [-1] * pad, dtype=torch.int32)
        positions = torch.tensor(positions + [0] * pad, dtype=torch.long)
        return {
            "input_ids": input_ids, "positions": positions, "slot_mapping": slot_mapping,
            "context_lens": context_lens, "block_tables": block_tables, "lora_slots": lora_slots,
        }

    def forward_decode(self, inputs: dict[str, torch.Tensor], with_lora: bool) -> torch.Tensor:
        """The capturable decode step: device tensors in, logits [rows, vocab] out."""
        lora = LoraContext(meta=decode_lora_meta(inputs["lora_slots"])) if with_lora else None
        ctx = StepContext(
            is_prefill=False,
            slot_mapping=inputs["slot_mapping"],
            block_tables=inputs["block_tables"],
            context_lens=inputs["context_lens"],
            lora=lora,
        )
        hidden = self.model(inputs["input_ids"], inputs["positions"], ctx)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def decode(self, requests: list[Request]) -> torch.Tensor:
        """One token for each request; logits [len(requests), vocab]."""
        with_lora = self.use_lora and any(r.slot >= 0 for r in requests)
        if self.graphs is not None and len(requests) <= self.max_batch_size:
            return self.graphs.run(requests, with_lora)
        inputs = self.decode_inputs(requests, len(requests))
        # Eager steps need no static shape: trim the block tables to the longest sequence so that the
        # torch attention path (CPU) reads what the batch holds, not max_model_len.
        used_blocks = max(len(r.block_ids) for r in requests)
        inputs["block_tables"] = inputs["block_tables"][:, :used_blocks].contiguous()
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}
        return self.forward_decode(inputs, with_lora)
