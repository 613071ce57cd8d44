"""Pick the next token of every row on the device, all sampling parameters in one batched pass.

Semantics, per row (`sampler_reference.sample_row_reference` is this as plain code for one row):
0. masks: with a grammar (structured output), the tokens its matcher forbids are dropped (-inf); with
   allowed_token_ids, every other token is dropped; while fewer than min_tokens tokens are out, the
   EOS ids (unless ignore_eos) and stop_token_ids are dropped
1. logits[t] += logit_bias[t]
2. repetition penalty (CTRL, as transformers and vLLM) on the tokens seen in the prompt or output:
   a positive logit is divided by the penalty, a negative one multiplied by it
3. presence and frequency penalties (OpenAI) on the output tokens:
   logits[t] -= frequency_penalty * count[t] + presence_penalty * (count[t] > 0)
4. a greedy row (temperature 0 or top_k 1) takes the argmax here; the rest only applies to draws
5. logits /= temperature
6. min_p: drop tokens whose probability is below min_p * the top one (in logits: below max + log(min_p))
7. top_k: keep the k largest logits (ties with the k-th kept)
8. top_p: in order of probability after 5-7 (ties by token id), keep each token while the mass of
   the tokens before it is below top_p (the token that crosses top_p is kept)
9. draw by inverse CDF in vocabulary order with one uniform u per row: the first token whose
   cumulative mass exceeds floor(u * total kept mass).

Masses in steps 8-9 are integers: each probability (fp32 softmax after 5-7) floored to units of
2**-40. Integer sums are exact in any order, so the batched pass finds the top-p cut without a sort
and agrees bit for bit with the reference, which sorts and walks. On CUDA, Triton kernels do steps 8-9
(`triton_top_p`: a radix select of the cut over programs of 4,096 tokens, no sort; twice as fast as the
torch steps at 32 x 128k); elsewhere, or with LORAPLEX_TOP_P_KERNEL=torch, torch ops do them
(`sampling_masses.top_p_keep`, which sorts). A token below 2**-40 has mass 0 and is never drawn.

u is a counter-based hash of (request seed, output token index) with 23-bit resolution, computed on
the host in the pass that gathers the parameters, so a row's tokens do not depend on what else is in
the batch, survive preemption, and need no per-row generator: the batch is a fixed handful of
kernels. A request without a seed gets a random one at its first draw. Logprobs are those of the
model's raw distribution (log-softmax before steps 0-8) at the chosen token, as vLLM reports by
default; they are not those of the processed distribution that was sampled from. A row asking for
top_logprobs = k also gets the k most likely tokens of that raw distribution (one batched top-k over
the largest k asked for). The only host sync is the final copy of the chosen tokens (with logprobs
and alternatives) to the host, and it waits without holding the GIL (`HostCopy`).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Collection, Sequence
from typing import NamedTuple

import torch

from server.engine.grammar import GrammarBackend
from server.engine.request import Request, SamplingError, SamplingParams
from server.engine.token_counts import TokenCounts
from server.kernels.host_device import HostCopy, to_device
from server.kernels.sampling.row_argmax import row_argmax
from server.kernels.sampling.sampling_masses import (
    NO_TOP_P,
    draw_from_masses,
    fused_top_p_available,
    integer_masses,
    top_p_keep,
)

_MASK64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15


def _mix64(x: int) -> int:
    """splitmix64's finalizer: a bijection of 64-bit integers whose outputs look independent."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


@functools.lru_cache(maxsize=4096)
def _seed_key(seed: int) -> int:
    """A request's mixed seed, once per request rather than once per token: draw_uniform took ~2 us a row on the
    host (64 us a step for 32 sampled rows, cProfile on 2 cores), half of it mixing the seed."""
    return _mix64(seed & _MASK64)


def draw_uniform(seed: int, step: int) -> float:
    """The uniform in (0, 1) for output token `step` of a request seeded with `seed`.

    A pure function of both (splitmix64 over the counter) and exactly representable in float32
    ((2k + 1) / 2**24), so the device uses the value the host computed.
    """
    bits = _mix64((_seed_key(seed) + (step + 1) * _GOLDEN64) & _MASK64)
    return ((bits >> 41) * 2 + 1) / 2**24


class SampledTokens(NamedTuple):
    """What one sampler pass returns for a batch (lists indexed by row)."""

    token_ids: list[int]
    logprobs: list[float] | None  # chosen tokens' raw logprobs; None when no row asks
    top_logprobs: list[list[tuple[int, float]]] | None  # per row its top_logprobs (id, logprob), best first


class PendingTokens(NamedTuple):
    """A batch's chosen tokens on the device, with their copy to the host already queued."""

    chosen: torch.Tensor  # [B] int64 on the device
    copy: HostCopy  # chosen; or (chosen, logprob) rows; or per row chosen, logprob, top ids, top logprobs
    top_logprobs: Sequence[int] | None = None  # None: no logprobs; (): logprobs only; else k per row

    def resolve(self) -> SampledTokens:
        """Wait for the copy (the one host sync of a step) and unpack it."""
        host = self.copy.wait()
        if self.top_logprobs is None:
            return SampledTokens(host, None, None)
        if not self.top_logprobs:
            return SampledTokens([int(t) for t in host[0]], host[1], None)
        width = (len(host[0]) - 2) // 2
        top = [[(int(i), v) for i, v in zip(row[2:2 + k], row[2 + width:2 + width + k], strict=True)]
               for row, k in zip(host, self.top_logprobs, strict=True)]
        return SampledTokens([int(row[0]) for row in host], [row[1] for row in host], top)


def banned_token_ids(request: Request, eos_token_ids: Collection[int]) -> list[int]:
    """Step 0's min_tokens mask: the tokens that may not be drawn yet (empty once min_tokens are out)."""
    params = request.params
    if len(request.output_token_ids) >= params.min_tokens:
        return []
    return sorted(set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids)))


def apply_penalties(logits: torch.Tensor, output_counts: torch.Tensor, in_prompt: torch.Tensor,
                    repetition: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """Steps 2-3 on logits [P, vocab]: output_counts [P, vocab] int, in_prompt [P, vocab] bool,
    penalties [P] float. Returns new logits."""
    repetition = repetition[:, None]
    penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(in_prompt | (output_counts > 0), penalized, logits)
    return logits - frequency[:, None] * output_counts - presence[:, None] * (output_counts > 0)


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, min_p: torch.Tensor | None = None,
                  top_k: torch.Tensor | None = None, max_top_k: int = 0) -> torch.Tensor:
    """Steps 5-7 on logits [S, vocab] with temperature [S]. min_p [S] float (0 = off) and top_k [S] int
    (0 = off, at most `max_top_k`, a host int) are None when no row uses them. Returns new logits, -inf
    where dropped."""
    logits = logits / temperature[:, None]
    if min_p is not None:
        top = logits.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(logits < top + min_p[:, None].log(), float("-inf"))  # min_p 0: log = -inf
    if top_k is not None:
        largest = torch.topk(logits, max_top_k, dim=-1).values  # [S, max_top_k], descending
        kth = largest.gather(1, (top_k.clamp(min=1) - 1)[:, None])
        kth = kth.masked_fill((top_k <= 0)[:, None], float("-inf"))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits


def _argmax_only(params: SamplingParams) -> bool:
    """Whether a row's token is the argmax of its logits after masks alone (no arithmetic on them, no logprobs)."""
    return params.is_greedy and not params.logit_bias and not params.has_penalties and not params.logprobs


class Sampler:
    """The batched sampler of one engine: per-row parameters gathered on the host in one pass,
    then a fixed handful of kernels for the whole batch."""

    def __init__(self, vocab_size: int, device: torch.device, eos_token_ids: Collection[int] = (),
                 grammars: GrammarBackend | None = None):
        self.device = torch.device(device)
        self.grammars = grammars  # None: requests with a grammar are refused (no tokenizer to build matchers)
        self.counts = TokenCounts(vocab_size, self.device)
        self.eos_token_ids = frozenset(eos_token_ids)  # masked by min_tokens
        self._seeds = random.Random()  # seeds for requests that bring none (drawn once each)

    def warm_up(self) -> None:
        """Run every draw path once on a dummy batch at start-up (on CUDA): otherwise the first sampled request pays in
        its step for what is built or loaded at a kernel's first use: the top-p kernels (a second or more with
        Triton), and the modules of the cast, temperature, min-p, top-k, softmax and log-softmax kernels, which CUDA
        loads at their first launch. On the H200 (c32, twenty-fourth session) the sampled load,
        the server's first, had a client TTFT p99 of 436 ms against the greedy load's 50, while the engine alone,
        warmed by its own loads, showed no such stall (bench/NOTES.md)."""
        if self.device.type == "cuda":
            self.warm_draws()

    def warm_draws(self) -> list[int]:
        """Two dummy steps through `sample`: a draw with top-p, top-k, min-p and top logprobs beside a greedy row;
        then a draw that keeps every token (the draw without top-p has its own kernels). Returns the chosen tokens;
        leaves no state behind (no penalties: their table is allocated at the first request that asks)."""
        batches = [
            [Request([0], SamplingParams(max_tokens=1, temperature=0.8, top_p=0.9, top_k=50, min_p=0.01, seed=0,
                                         logprobs=True, top_logprobs=2)),
             Request([0], SamplingParams(max_tokens=1, temperature=0.0))],
            [Request([0], SamplingParams(max_tokens=1, temperature=0.7, seed=1))],
        ]
        chosen = []
        for requests in batches:
            logits = torch.randn(len(requests), self.counts.vocab_size, device=self.device).to(torch.bfloat16)
            try:
                chosen += self.sample(logits, requests).token_ids
            finally:
                for request in requests:
                    self.release(request)
        return chosen

    def release(self, request: Request) -> None:
        """The request left the running batch: free its token-count row (rebuilt if it returns)."""
        self.counts.release(request)

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> SampledTokens:
        """logits [len(requests), vocab] (float32, or the model's dtype: see `sample_async`) -> chosen token
        ids and (if any row asks) their logprobs and top alternatives. `logits` is not modified."""
        return self.sample_async(logits, requests).resolve()

    def sample_async(self, logits: torch.Tensor, requests: list[Request]) -> PendingTokens:
        """`sample`, with the host copy queued but not waited for: the tokens stay usable on the device
        (the next step's input ids) while the host goes on; `resolve()` waits.

        The decode step hands over logits in the model's dtype (bf16 on a GPU): when every row is a plain greedy
        argmax (masks and grammars only write -inf) they are used as they are, with the same argmax as their
        float32 copy; otherwise they are cast here once. That cast was 12 us of a 1B batch-32 step's 1.2 ms."""
        if logits.dtype != torch.float32 and not all(_argmax_only(r.params) for r in requests):
            logits = logits.float()
        device = logits.device
        processed = self._apply_grammars(logits, requests)
        processed = self._apply_masks(processed, requests)
        bias = [(row, token, value) for row, r in enumerate(requests) for token, value in r.params.logit_bias.items()]
        if bias:
            rows, tokens, values = zip(*bias, strict=True)
            index = to_device([rows, tokens], torch.long, device)
            processed = processed.index_put((index[0], index[1]), to_device(values, torch.float32, device),
                                            accumulate=True)
        penalized = [row for row, r in enumerate(requests) if r.params.has_penalties]
        if penalized:
            processed = self._apply_penalties(processed, requests, penalized)
        sampled = [row for row, r in enumerate(requests) if not r.params.is_greedy]
        if not sampled:
            chosen = row_argmax(processed)  # [B]
        elif len(sampled) == len(requests):
            chosen = self._draw(processed, requests, sampled)
        else:  # greedy and sampled rows: the argmax of every row, then the draws written over it
            drawn = self._draw(processed, [requests[row] for row in sampled], sampled)
            chosen = row_argmax(processed).index_copy(0, to_device(sampled, torch.long, device), drawn)
        if penalized:
            index = to_device([penalized, [requests[row].penalty_row for row in penalized]], torch.long, device)
            self.counts.add(index[1], chosen[index[0]])
        if not any(r.params.logprobs for r in requests):
            return PendingTokens(chosen, HostCopy(chosen))
        max_top = max(r.params.top_logprobs for r in requests)
        if not max_top:
            logprobs = logits.gather(1, chosen[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
            return PendingTokens(chosen, HostCopy(torch.stack([chosen.double(), logprobs.double()])), ())
        raw = logits.log_softmax(dim=-1)  # [B, vocab]
        top_values, top_ids = raw.topk(min(max_top, raw.shape[-1]), dim=-1)  # [B, max_top], best first
        columns = [chosen.double()[:, None], raw.gather(1, chosen[:, None]).double(), top_ids.double(),
                   top_values.double()]
        # One copy; ids < 2**53 are exact in float64.
        return PendingTokens(chosen, HostCopy(torch.cat(columns, dim=1)), [r.params.top_logprobs for r in requests])

    def _apply_grammars(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Step 0's grammar masks: one host mask for the constrained rows, one copy, one masked_fill."""
        rows = [row for row, r in enumerate(requests) if r.params.grammar is not None]
        if not rows:
            return logits
        if self.grammars is None:
            raise SamplingError("structured output needs the engine's grammar backend")
        matchers = []
        for row in rows:
            request = requests[row]
            if request.grammar_matcher is None:
                request.grammar_matcher = self.grammars.matcher(request.params.grammar, request.output_token_ids)
            matchers.append(request.grammar_matcher)
        allowed = self.grammars.allowed_mask(matchers)
        if logits.device.type == "cuda":
            allowed = allowed.pin_memory()
        allowed = allowed.to(logits.device, non_blocking=True)
        index = to_device(rows, torch.long, logits.device)
        return logits.index_copy(0, index, logits[index].masked_fill(~allowed, float("-inf")))

    def _apply_masks(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Step 0 for the rows that need it (allowed_token_ids, min_tokens); other rows untouched.

        Each masked row gets a [vocab] bool of allowed tokens built from index lists in one pass, so
        the cost is one scatter and one masked_fill for the batch, whatever the number of rows."""
        allowed = [(row, r.params.allowed_token_ids) for row, r in enumerate(requests)
                   if r.params.allowed_token_ids is not None]
        banned = [(row, ids) for row, r in enumerate(requests) if (ids := banned_token_ids(r, self.eos_token_ids))]
        if not allowed and not banned:
            return logits
        rows = sorted({row for row, _ in allowed} | {row for row, _ in banned})
        position = {row: i for i, row in enumerate(rows)}
        device = logits.device
        is_allowed = torch.ones(len(rows), logits.shape[-1], dtype=torch.bool, device=device)  # [R, vocab]
        if allowed:
            index = to_device([[position[row] for row, ids in allowed for _ in ids],
                                [t for _, ids in allowed for t in ids]], torch.long, device)
            only = torch.zeros_like(is_allowed)
            only[index[0], index[1]] = True
            restricted = {row for row, _ in allowed}
            keep_all = to_device([row not in restricted for row in rows], torch.bool, device)
            is_allowed = only | keep_all[:, None]
        if banned:
            index = to_device([[position[row] for row, ids in banned for _ in ids],
                                [t for _, ids in banned for t in ids]], torch.long, device)
            is_allowed[index[0], index[1]] = False
        row_index = to_device(rows, torch.long, device)
        masked = logits[row_index].masked_fill(~is_allowed, float("-inf"))
        return logits.index_copy(0, row_index, masked)

    def _apply_penalties(self, logits: torch.Tensor, requests: list[Request], penalized: list[int]) -> torch.Tensor:
        table_rows = [self.counts.row_of(requests[row]) for row in penalized]
        index = to_device([penalized, table_rows], torch.long, logits.device)
        params = to_device([[requests[row].params.repetition_penalty for row in penalized],
                             [requests[row].params.presence_penalty for row in penalized],
                             [requests[row].params.frequency_penalty for row in penalized]],
                            torch.float32, logits.device)
        rows = apply_penalties(logits[index[0]], self.counts.output_counts[index[1]],
                               self.counts.in_prompt[index[1]], params[0], params[1], params[2])
        return logits.index_copy(0, index[0], rows)

    def _draw(self, logits: torch.Tensor, requests: list[Request], rows: list[int]) -> torch.Tensor:
        """Steps 5-9 for the sampled rows (batch rows `rows`); token ids [len(rows)] int64."""
        vocab = logits.shape[-1]
        for request in requests:
            if request.sampling_seed is None:
                seed = request.params.seed
                request.sampling_seed = self._seeds.getrandbits(64) if seed is None else seed
        top_k = [r.params.top_k if r.params.top_k < vocab else 0 for r in requests]
        # One float32 tensor carries every per-row value (top_k < 2**24 is exact in float32).
        # A row without top-p carries NO_TOP_P (2.0): the fused draw keeps its every token, and the torch steps
        # read top_p only for the rows under 1.0. A top_p under 1.0 that float32 rounds to 1.0 still cuts.
        params = to_device([[r.params.temperature for r in requests], [r.params.min_p for r in requests],
                             [r.params.top_p if r.params.top_p < 1.0 else NO_TOP_P for r in requests], top_k,
                             [draw_uniform(r.sampling_seed, len(r.output_token_ids)) for r in requests]],
                            torch.float32, logits.device)
        if len(rows) < logits.shape[0]:
            logits = logits[to_device(rows, torch.long, logits.device)]
        max_top_k = max(top_k)
        top_p_rows = [i for i, r in enumerate(requests) if r.params.top_p < 1.0]
        top_p, top_p_index = None, None
        if len(top_p_rows) == len(requests):
            top_p = params[2]
        elif top_p_rows:
            top_p_index = to_device(top_p_rows, torch.long, logits.device)
            top_p = params[2][top_p_index]
        filtered = filter_logits(
            logits, params[0],
            min_p=params[1] if any(r.params.min_p > 0 for r in requests) else None,
            top_k=params[3].long() if max_top_k > 0 else None, max_top_k=max_top_k,
        )
        probs = filtered.softmax(dim=-1)
        if probs.is_cuda and fused_top_p_available():
            from server.kernels.sampling.triton_top_p import full_draw, top_p_draw

            return top_p_draw(probs, params[2], params[4]) if top_p is not None else full_draw(probs, params[4])
        masses = integer_masses(probs)
        if top_p is not None:
            if top_p_index is None:
                masses = masses.masked_fill(~top_p_keep(probs, top_p), 0)
            else:
                kept = top_p_keep(probs[top_p_index], top_p)
                masses = masses.index_copy(0, top_p_index, masses[top_p_index].masked_fill(~kept, 0))
        return draw_from_masses(masses, params[4])


def sample(logits: torch.Tensor, requests: list[Request], eos_token_ids: Collection[int] = ()) -> SampledTokens:
    """One-off batched sampling (tests, tools): penalties count from the requests' tokens each call."""
    sampler = Sampler(logits.shape[-1], logits.device, eos_token_ids)
    try:
        return sampler.sample(logits, requests)
    finally:
        for request in requests:
            sampler.release(request)
