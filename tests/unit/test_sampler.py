"""Sampling controls: greedy, temperature, top-k, top-p, repetition penalty, seeds, stop strings."""

from __future__ import annotations

import pytest
import torch

from server.engine.detokenizer import update_text
from server.engine.request import FinishReason, Request, SamplingError, SamplingParams
from server.engine.sampler import apply_repetition_penalty, filter_top_k_top_p, sample


def req(**params):
    return Request([1, 2, 3], SamplingParams(**params))


def test_greedy_picks_argmax_and_reports_logprob():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    tokens, logprobs = sample(logits, [req(temperature=0, logprobs=True), req(temperature=0, logprobs=True)])
    assert tokens == [1, 0]
    assert logprobs[0] == pytest.approx(torch.log_softmax(logits[0], -1)[1].item())


def test_top_k_and_top_p_masks():
    logits = torch.tensor([1.0, 4.0, 3.0, 2.0])
    assert torch.isinf(filter_top_k_top_p(logits, 2, 1.0)).tolist() == [True, False, False, True]
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    kept = ~torch.isinf(filter_top_k_top_p(probs, 0, 0.7))
    assert kept.tolist() == [True, True, False, False]


def test_sampling_only_draws_from_allowed_tokens():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]]).repeat(200, 1)
    requests = [req(temperature=1.0, top_k=2, seed=i) for i in range(200)]
    tokens, _ = sample(logits, requests)
    assert set(tokens) == {3, 4}


def test_seed_makes_sampling_reproducible_and_independent_of_batch():
    logits = torch.randn(1, 50)
    a, _ = sample(logits, [req(temperature=1.0, seed=7)])
    b, _ = sample(torch.cat([torch.randn(1, 50), logits]), [req(temperature=1.0, seed=3), req(temperature=1.0, seed=7)])
    assert a[0] == b[1]
    draws = {sample(logits, [req(temperature=5.0, seed=s)])[0][0] for s in range(40)}
    assert len(draws) > 5  # different seeds really give different tokens


def test_repetition_penalty():
    row = torch.tensor([2.0, -2.0, 1.0])
    apply_repetition_penalty(row, [0, 1], 2.0)
    assert row.tolist() == [1.0, -4.0, 1.0]


@pytest.mark.parametrize("params,field", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-0.5), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(repetition_penalty=0), "repetition_penalty"), (dict(stop=[""]), "stop"),
])
def test_bad_params_name_the_field(params, field):
    with pytest.raises(SamplingError, match=field):
        SamplingParams(**params).validate()


class CharTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_stop_string_is_never_emitted_even_in_part():
    request = req(stop=["END"])
    emitted = ""
    for ch in "hello ENjoy the END of it":
        request.output_token_ids.append(ord(ch))
        emitted += update_text(request, CharTokenizer())
        if request.finish_reason is not None:
            break
    assert request.finish_reason is FinishReason.STOP
    assert emitted == "hello ENjoy the "
    assert request.text == "hello ENjoy the "
