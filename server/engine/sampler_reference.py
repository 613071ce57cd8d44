"""The sampler's semantics for one row as plain code (server.engine.sampler's docstring lists the steps): the
oracle the batched sampler is tested against, each float operation done as the batched one does it."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

import torch

from server.engine.request import SamplingParams
from server.engine.sampler import draw_uniform
from server.kernels.sampling.sampling_masses import integer_masses, top_p_threshold


def sample_row_reference(logits: torch.Tensor, params: SamplingParams, prompt_ids: Sequence[int],
                         output_ids: Sequence[int], seed: int, eos_token_ids: Collection[int] = ()) -> int:
    """Steps 0-9 for one row, logits [vocab] float32, as plain code: the oracle of the batched
    sampler (each float operation as the batched one does it, so the two agree bit for bit)."""
    def f32(value: float) -> torch.Tensor:
        return torch.tensor(value, dtype=torch.float32)

    logits = logits.clone()
    if params.allowed_token_ids is not None:
        is_allowed = torch.zeros(logits.shape[0], dtype=torch.bool)
        is_allowed[list(params.allowed_token_ids)] = True
        logits[~is_allowed] = float("-inf")
    if len(output_ids) < params.min_tokens:
        for token in set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids)):
            logits[token] = float("-inf")
    for token, bias in params.logit_bias.items():
        logits[token] += f32(bias)
    counts: dict[int, int] = {}
    for token in output_ids:
        counts[token] = counts.get(token, 0) + 1
    for token in set(prompt_ids) | set(counts):
        value, penalty = logits[token], f32(params.repetition_penalty)
        logits[token] = value / penalty if value > 0 else value * penalty
    for token, count in counts.items():
        logits[token] = logits[token] - f32(params.frequency_penalty) * count - f32(params.presence_penalty)
    if params.is_greedy:
        return int(logits.argmax())
    logits = logits / f32(params.temperature)
    if params.min_p > 0:
        logits[logits < logits.max() + f32(params.min_p).log()] = float("-inf")
    if 0 < params.top_k < logits.shape[0]:
        logits[logits < torch.topk(logits, params.top_k).values[-1]] = float("-inf")
    masses = integer_masses(logits.softmax(-1)).tolist()
    if params.top_p < 1.0:
        need = int(top_p_threshold(f32(params.top_p).reshape(1)))
        probs = logits.softmax(-1).tolist()
        kept, mass = [0] * len(masses), 0
        for token in sorted(range(len(probs)), key=lambda t: (-probs[t], t)):
            if mass >= need:
                break
            kept[token] = masses[token]
            mass += masses[token]
        masses = kept
    target = math.floor(draw_uniform(seed, len(output_ids)) * sum(masses))
    cumulative = 0
    for token, mass in enumerate(masses):
        cumulative += mass
        if cumulative > target:
            return token
    return len(masses) - 1
