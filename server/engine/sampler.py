"""Pick the next token of every row: greedy, temperature, top-k, top-p, repetition penalty, seeds."""

from __future__ import annotations

import torch

from server.engine.request import Request


def apply_repetition_penalty(logits: torch.Tensor, token_ids: list[int], penalty: float) -> None:
    """CTRL-style penalty on one row [vocab], in place: seen tokens' positive logits are divided by
    `penalty`, negative ones multiplied (as transformers and vLLM do)."""
    if penalty == 1.0 or not token_ids:
        return
    seen = torch.tensor(sorted(set(token_ids)), device=logits.device)
    values = logits[seen]
    logits[seen] = torch.where(values > 0, values / penalty, values * penalty)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits [vocab] outside the top-k and outside the smallest set with mass >= top_p."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def _generator_for(request: Request, device: torch.device) -> torch.Generator | None:
    if request.params.seed is None:
        return None
    if request.generator is None:
        request.generator = torch.Generator(device=device).manual_seed(request.params.seed)
    return request.generator


def sample(logits: torch.Tensor, requests: list[Request]) -> tuple[list[int], list[float] | None]:
    """logits [len(requests), vocab] float32 -> chosen token ids and (if any row asks) their logprobs.

    Logprobs are those of the model's raw distribution, as vLLM reports by default.
    """
    raw_logprobs = None
    if any(r.params.logprobs for r in requests):
        raw_logprobs = torch.log_softmax(logits, dim=-1)
    if all(r.params.is_greedy and r.params.repetition_penalty == 1.0 for r in requests):
        chosen = logits.argmax(-1)  # the common fast path: one kernel, one sync
        logprobs = None if raw_logprobs is None else raw_logprobs.gather(1, chosen[:, None]).squeeze(1).tolist()
        return chosen.tolist(), logprobs
    processed = logits.clone()
    chosen = torch.empty(len(requests), dtype=torch.long, device=logits.device)
    greedy_rows = []
    for row, request in enumerate(requests):
        params = request.params
        if params.repetition_penalty != 1.0:
            apply_repetition_penalty(processed[row], request.all_token_ids, params.repetition_penalty)
        if params.is_greedy:
            greedy_rows.append(row)
            continue
        row_logits = filter_top_k_top_p(processed[row] / params.temperature, params.top_k, params.top_p)
        probs = row_logits.softmax(-1)
        chosen[row] = torch.multinomial(probs, 1, generator=_generator_for(request, logits.device))[0]
    if greedy_rows:
        index = torch.tensor(greedy_rows, device=logits.device)
        chosen[index] = processed[index].argmax(-1)
    token_ids = chosen.tolist()
    logprobs = None
    if raw_logprobs is not None:
        logprobs = raw_logprobs.gather(1, chosen[:, None]).squeeze(1).tolist()
    return token_ids, logprobs
