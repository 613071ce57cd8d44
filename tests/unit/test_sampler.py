"""The batched sampler against its per-row reference, each parameter's effect, and validation."""

from __future__ import annotations

import math
import random

import pytest
import torch

from server.engine.request import Request, SamplingError, SamplingParams
from server.engine.sampler import (
    Sampler,
    apply_penalties,
    draw_uniform,
    filter_logits,
    sample,
)
from server.engine.sampler_reference import sample_row_reference
from server.kernels.sampling.sampling_masses import draw_from_masses, integer_masses, top_p_keep, top_p_threshold
from tests.unit.triton_interp import interpreted
from tests.unit.triton_variants import LaunchRecorder

VOCAB = 257
EOS = (2, 250)


def req(prompt=(1, 2, 3), **params) -> Request:
    return Request(list(prompt), SamplingParams(**params))


def random_params(rng: random.Random) -> SamplingParams:
    """Every parameter, each often at its neutral value, so rows mix every combination."""
    return SamplingParams(
        temperature=rng.choice([0.0, 0.3, 0.7, 1.0, 1.6]),
        top_k=rng.choice([0, 0, 1, 3, 20, 1000]),
        top_p=rng.choice([1.0, 1.0, 0.9, 0.5]),
        min_p=rng.choice([0.0, 0.0, 0.05, 0.4]),
        repetition_penalty=rng.choice([1.0, 1.0, 1.3, 0.7]),
        presence_penalty=rng.choice([0.0, 0.0, 0.8, -0.6]),
        frequency_penalty=rng.choice([0.0, 0.0, 0.4, -0.3]),
        logit_bias=rng.choice([{}, {}, {5: 3.0, 9: -100.0}, {rng.randrange(VOCAB): 8.0}]),
        seed=rng.choice([None, rng.randrange(-(2**63), 2**64)]),
        min_tokens=rng.choice([0, 0, 3, 8]),
        stop_token_ids=rng.choice([[], [7, 11]]),
        ignore_eos=rng.random() < 0.2,
        allowed_token_ids=rng.choice([None, None, [2, 5, 7, 9, 100], rng.sample(range(VOCAB), 40)]),
        logprobs=rng.random() < 0.3,
    )


def random_requests(rng: random.Random, n: int) -> list[Request]:
    return [Request([rng.randrange(VOCAB) for _ in range(rng.randrange(1, 12))], random_params(rng),
                    output_token_ids=[rng.randrange(VOCAB) for _ in range(rng.randrange(0, 6))]) for _ in range(n)]


def reference_tokens(logits: torch.Tensor, requests: list[Request]) -> list[int]:
    return [sample_row_reference(logits[i], r.params, r.prompt_token_ids, r.output_token_ids,
                                 r.sampling_seed if r.sampling_seed is not None else 0, EOS)
            for i, r in enumerate(requests)]


def test_batched_sampler_matches_the_per_row_reference_over_many_steps():
    rng = random.Random(0)
    requests = random_requests(rng, 40)  # past the initial 8 rows of the token-count table
    sampler = Sampler(VOCAB, torch.device("cpu"), EOS)
    torch.manual_seed(0)
    for _ in range(12):
        logits = torch.randn(len(requests), VOCAB) * 4
        tokens, *_ = sampler.sample(logits, requests)
        assert tokens == reference_tokens(logits, requests)
        for request, token in zip(requests, tokens, strict=True):
            request.output_token_ids.append(token)
        sampler.release(requests[rng.randrange(len(requests))])  # as preemption does: its row is rebuilt


def test_a_row_gets_the_same_tokens_whatever_else_is_in_the_batch():
    rng = random.Random(1)
    torch.manual_seed(1)
    for _ in range(10):
        requests = random_requests(rng, 12)
        for request in requests:
            request.sampling_seed = rng.randrange(2**64)  # fixed, as a seeded request's would be
        logits = torch.randn(len(requests), VOCAB) * 3
        together, *_ = sample(logits, requests, EOS)
        alone = [sample(logits[i : i + 1], [r], EOS)[0][0] for i, r in enumerate(requests)]
        order = list(range(len(requests)))
        rng.shuffle(order)
        shuffled, *_ = sample(logits[order], [requests[i] for i in order], EOS)
        assert together == alone
        assert shuffled == [together[i] for i in order]


def test_seed_makes_sampling_reproducible_and_different_seeds_differ():
    logits = torch.randn(1, 50)
    first, *_ = sample(logits, [req(temperature=1.0, seed=7)])
    again, *_ = sample(torch.cat([torch.randn(1, 50), logits]), [req(temperature=1.0, seed=3),
                                                                req(temperature=1.0, seed=7)])
    assert first[0] == again[1]
    draws = {sample(logits, [req(temperature=5.0, seed=s)])[0][0] for s in range(40)}
    assert len(draws) > 5


def test_unseeded_requests_draw_different_tokens():
    logits = torch.zeros(200, 50)
    tokens, *_ = sample(logits, [req(temperature=1.0) for _ in range(200)])
    assert len(set(tokens)) > 30


def test_greedy_rows_take_the_argmax_and_report_raw_logprobs():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    tokens, logprobs, _ = sample(logits, [req(temperature=0, logprobs=True), req(temperature=0, logprobs=True)])
    assert tokens == [1, 0]
    assert logprobs[0] == pytest.approx(torch.log_softmax(logits[0], -1)[1].item())


def test_greedy_and_sampled_rows_in_one_batch():
    torch.manual_seed(2)
    logits = torch.randn(16, VOCAB)
    requests = [req(temperature=0.0) if i % 2 else req(temperature=1.0, seed=i) for i in range(16)]
    tokens, logprobs, _ = sample(logits, requests)
    assert logprobs is None
    assert tokens[1::2] == logits[1::2].argmax(-1).tolist()
    assert tokens == reference_tokens(logits, requests)


def test_model_dtype_logits_give_the_float32_answer_for_every_kind_of_row():
    """The decode step hands over bf16 logits on a GPU: plain greedy rows take their argmax as they are, and any
    batch with a row that needs arithmetic (a draw, bias, penalties, logprobs) is cast once first, so every batch
    samples the same tokens (and logprobs) as from the float32 copy of its logits."""
    rng = random.Random(5)
    torch.manual_seed(5)
    vocab = 1024  # chunked by row_argmax
    for _ in range(6):
        requests = random_requests(rng, 10) + [req(temperature=0.0), req(top_k=1, allowed_token_ids=[3, 9])]
        for request in requests:
            request.sampling_seed = rng.randrange(2**64)
        logits = (torch.randn(len(requests), vocab) * 4).to(torch.bfloat16)
        logits[:, 5] = logits.max()  # ties at the top
        for batch in (requests, requests[-2:], requests[:3] + requests[-2:]):
            rows = [requests.index(r) for r in batch]
            assert sample(logits[rows], batch, EOS) == sample(logits[rows].float(), batch, EOS)


def test_top_k_one_is_greedy():
    torch.manual_seed(3)
    logits = torch.randn(8, VOCAB)
    top1, *_ = sample(logits, [req(temperature=1.5, top_k=1, seed=i) for i in range(8)])
    assert top1 == logits.argmax(-1).tolist()


def test_sampling_only_draws_from_allowed_tokens():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]]).repeat(300, 1)
    top_k, *_ = sample(logits, [req(temperature=1.0, top_k=2, seed=i) for i in range(300)])
    assert set(top_k) == {3, 4}
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(300, 1)
    top_p, *_ = sample(probs, [req(temperature=1.0, top_p=0.7, seed=i) for i in range(300)])
    assert set(top_p) == {0, 1}  # 0.5 < 0.7, so the 0.3 token that crosses 0.7 is kept
    min_p, *_ = sample(probs, [req(temperature=1.0, min_p=0.2, seed=i) for i in range(300)])
    assert set(min_p) == {0, 1, 2}  # 0.05 < 0.2 * 0.5


def test_filter_masks_per_row():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0], [1.0, 4.0, 3.0, 2.0]])
    ones = torch.ones(2)
    kept = ~torch.isinf(filter_logits(logits, ones, top_k=torch.tensor([2, 0]), max_top_k=2))
    assert kept.tolist() == [[False, True, True, False], [True, True, True, True]]
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().repeat(2, 1)
    kept = ~torch.isinf(filter_logits(probs, ones, min_p=torch.tensor([0.0, 0.5])))
    assert kept.tolist() == [[True, True, True, True], [True, True, False, False]]
    kept = top_p_keep(probs.softmax(-1), torch.tensor([0.7, 0.85]))
    assert kept.tolist() == [[True, True, False, False], [True, True, True, False]]


def _walk_top_p(probs: torch.Tensor, top_p: float) -> list[bool]:
    """Step 8 as the definition reads: sort (ties by id), keep while the mass before is under top_p."""
    masses = integer_masses(probs).tolist()
    need = int(top_p_threshold(torch.tensor([top_p])))
    values = probs.tolist()
    kept, mass = [False] * len(values), 0
    for token in sorted(range(len(values)), key=lambda t: (-values[t], t)):
        if mass >= need:
            break
        kept[token], mass = True, mass + masses[token]
    return kept


@pytest.mark.parametrize("vocab, spread, quantum", [(50, 4.0, 0.0), (3000, 0.3, 0.0), (3000, 3.0, 0.5),
                                                    (20000, 1.0, 0.25), (7, 0.0, 0.0)])
def test_top_p_radix_select_matches_the_sorted_walk(vocab, spread, quantum):
    """Flat and peaked rows, and many exact ties (quantized logits), at top_p values that cut inside tie
    groups: the sort-free mask equals the walk over the sorted probabilities."""
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(6, vocab, generator=gen) * spread
    if quantum:
        logits = (logits / quantum).round() * quantum
    logits[5, vocab // 2:] = float("-inf")  # a row with dropped tokens (mass 0)
    probs = logits.softmax(-1)
    top_ps = [0.9, 0.5, 0.999, 0.1, 0.7, 0.95]
    kept = {method: top_p_keep(probs, torch.tensor(top_ps), method) for method in ("radix", "sort")}
    for row, top_p in enumerate(top_ps):
        walked = _walk_top_p(probs[row], top_p)
        assert kept["radix"][row].tolist() == walked, (row, top_p)
        assert kept["sort"][row].tolist() == walked, (row, top_p)


def test_logit_bias_forces_and_bans_tokens():
    torch.manual_seed(4)
    logits = torch.randn(20, VOCAB)
    forced, *_ = sample(logits, [req(temperature=1.0, seed=i, logit_bias={17: 100.0}) for i in range(20)])
    assert forced == [17] * 20
    top = int(logits[0].argmax())
    banned, *_ = sample(logits[:1], [req(temperature=0.0, logit_bias={top: -100.0})])
    assert banned[0] != top


def test_penalties_follow_the_formula():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    counts = torch.tensor([[0, 2, 1, 0]], dtype=torch.int32)  # output tokens 1, 1, 2
    in_prompt = torch.tensor([[True, False, False, False]])
    out = apply_penalties(logits, counts, in_prompt, torch.tensor([2.0]), torch.tensor([0.5]), torch.tensor([0.25]))
    # token 0: prompt only, repetition 2.0 / 2; token 1: -2 * 2 - 0.25 * 2 - 0.5;
    # token 2: 1 / 2 - 0.25 - 0.5; token 3: unseen
    assert out.tolist() == [[1.0, -5.0, -0.25, 0.5]]


def test_penalties_change_the_greedy_choice_as_tokens_repeat():
    logits = torch.tensor([[3.0, 2.5, 0.0]])
    request = req(prompt=[2], temperature=0.0, frequency_penalty=0.4)
    sampler = Sampler(3, torch.device("cpu"))
    picks = []
    for _ in range(4):
        token = sampler.sample(logits, [request])[0][0]
        request.output_token_ids.append(token)
        picks.append(token)
    assert picks == [0, 0, 1, 0]  # 3.0, 2.6, then 2.2 < 2.5, then 2.2 > 2.1


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_draws_follow_the_tempered_distribution(temperature):
    logits = torch.tensor([0.45, 0.25, 0.15, 0.1, 0.05]).log()
    probs = (logits / temperature).softmax(-1).double()
    n = 4000
    tokens, *_ = sample(logits.repeat(n, 1), [req(temperature=temperature, seed=s) for s in range(n)])
    counts = torch.bincount(torch.tensor(tokens), minlength=5).double()
    sigma = (n * probs * (1 - probs)).sqrt()
    assert ((counts - n * probs).abs() < 4 * sigma).all(), counts.tolist()


def test_uniforms_are_in_range_and_spread():
    values = [draw_uniform(seed, step) for seed in (0, 1, -5, 2**64 - 1) for step in range(500)]
    assert all(0.0 < v < 1.0 for v in values)
    assert abs(sum(values) / len(values) - 0.5) < 0.02
    assert all(torch.tensor(v, dtype=torch.float32).item() == v for v in values)
    assert len(set(values)) > 0.99 * len(values)


@pytest.mark.parametrize("params,field", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-0.5), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(repetition_penalty=0), "repetition_penalty"), (dict(stop=[""]), "stop"),
    (dict(min_p=1.5), "min_p"), (dict(min_p=-0.1), "min_p"), (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-2.1), "frequency_penalty"), (dict(logit_bias={3: 101.0}), "logit_bias"),
    (dict(logit_bias={"3": 1.0}), "logit_bias"),
])
def test_bad_params_name_the_field(params, field):
    with pytest.raises(SamplingError, match=field):
        SamplingParams(**params).validate()


def test_logit_bias_token_ids_are_checked_against_the_vocabulary():
    SamplingParams(logit_bias={0: 1.0, 99: -1.0}).validate_token_ids(100)
    for bad in (100, -1):
        with pytest.raises(SamplingError, match="logit_bias"):
            SamplingParams(logit_bias={bad: 1.0}).validate_token_ids(100)


def test_logprob_of_a_drawn_token_is_its_raw_logprob():
    torch.manual_seed(5)
    logits = torch.randn(4, VOCAB)
    tokens, logprobs, _ = sample(logits, [req(temperature=0.8, top_k=10, seed=i, logprobs=True) for i in range(4)])
    expected = torch.log_softmax(logits, -1)[torch.arange(4), torch.tensor(tokens)]
    assert all(math.isclose(a, b, abs_tol=1e-5) for a, b in zip(logprobs, expected.tolist(), strict=True))


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.zeros(1, 10)
    logits[0, 2] = 50.0  # EOS is by far the likeliest
    logits[0, 3] = 40.0  # then a stop token id
    sampler = Sampler(10, torch.device("cpu"), eos_token_ids=[2])
    request = req(temperature=0.0, min_tokens=3, stop_token_ids=[3])
    picks = []
    for _ in range(4):
        token = sampler.sample(logits, [request]).token_ids[0]
        request.output_token_ids.append(token)
        picks.append(token)
    assert picks[:3] != [2, 2, 2] and 2 not in picks[:3] and 3 not in picks[:3]
    assert picks[3] == 2  # the 4th token may end the request
    ignoring = req(temperature=0.0, min_tokens=3, stop_token_ids=[3], ignore_eos=True)
    assert sampler.sample(logits, [ignoring]).token_ids == [2]  # ignore_eos: EOS is not a stop token
    drawn = sample(logits.repeat(50, 1), [req(temperature=1.0, seed=i, min_tokens=1) for i in range(50)], [2])
    assert 2 not in drawn.token_ids


def test_allowed_token_ids_restrict_greedy_and_sampled_rows_only():
    torch.manual_seed(6)
    logits = torch.randn(60, VOCAB) * 3
    allowed = [4, 50, 51, 200]
    requests = [req(temperature=0.0 if i % 3 == 0 else 1.2, seed=i, allowed_token_ids=allowed) if i % 2 else
                req(temperature=0.0) for i in range(60)]
    tokens = sample(logits, requests).token_ids
    assert all(tokens[i] in allowed for i in range(1, 60, 2))
    assert tokens[0::2] == logits[0::2].argmax(-1).tolist()
    assert len(set(tokens[1::2])) > 1  # the sampled rows draw among the allowed tokens
    bias_outside = req(temperature=0.0, allowed_token_ids=[9], logit_bias={10: 100.0})
    assert sample(logits[:1], [bias_outside]).token_ids == [9]


def test_top_logprobs_match_a_per_row_reference():
    torch.manual_seed(7)
    logits = torch.randn(9, VOCAB) * 2
    ks = [0, 1, 5, 20, 0, 3, 20, 2, 7]
    requests = [req(temperature=0.0 if i % 2 else 0.9, seed=i, logprobs=k > 0 or i == 4, top_logprobs=k)
                for i, k in enumerate(ks)]
    result = sample(logits, requests)
    raw = torch.log_softmax(logits.double(), dim=-1)
    for row, k in enumerate(ks):
        values, ids = raw[row].topk(k)
        assert [t for t, _ in result.top_logprobs[row]] == ids.tolist()
        assert [v for _, v in result.top_logprobs[row]] == pytest.approx(values.tolist(), abs=1e-5)
        assert result.logprobs[row] == pytest.approx(raw[row, result.token_ids[row]].item(), abs=1e-5)
    alone = sample(logits[3:4], [requests[3]])
    assert alone.top_logprobs == [result.top_logprobs[3]]
    assert sample(logits[:1], [req(temperature=0.0)]).top_logprobs is None


@pytest.mark.parametrize("params,field", [
    (dict(min_tokens=-1), "min_tokens"), (dict(max_tokens=4, min_tokens=5), "min_tokens"),
    (dict(allowed_token_ids=[]), "allowed_token_ids"), (dict(top_logprobs=21, logprobs=True), "top_logprobs"),
    (dict(top_logprobs=2), "top_logprobs"),
])
def test_bad_mask_and_logprob_params_name_the_field(params, field):
    with pytest.raises(SamplingError, match=field):
        SamplingParams(**params).validate()


def test_mask_token_ids_are_checked_against_the_vocabulary():
    for field in ("allowed_token_ids", "stop_token_ids"):
        with pytest.raises(SamplingError, match=field):
            SamplingParams(**{field: [1, 100]}).validate_token_ids(100)


@pytest.mark.parametrize("vocab, spread, quantum, chunk, digit_bits", [
    (50, 4.0, 0.0, 256, 5), (3000, 0.3, 0.0, 512, 4), (3000, 3.0, 0.5, 512, 3), (4500, 1.0, 0.25, 1024, 5),
    (7, 0.0, 0.0, 256, 6), (1500, 0.05, 0.01, 256, 2),
])  # fmt: skip
def test_fused_top_p_draw_equals_the_torch_steps_bit_for_bit(vocab, spread, quantum, chunk, digit_bits):
    """The Triton kernels (interpreted) against top_p_keep + draw_from_masses: flat, peaked and tied rows, a
    row with dropped tokens, top_p 1.0 (no cut), and uniforms at both ends and at a tie group; rows of one
    chunk and of up to 6 (ties and the drawn token then fall in any chunk); radix digits of 2-6 bits (2 bits:
    15 passes, each carrying the mass above its prefix from the one before, over nearly flat rows whose tokens
    share the high bits for many passes)."""
    triton_top_p = interpreted("server.kernels.sampling.triton_top_p")
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(8, vocab, generator=gen) * spread
    if quantum:
        logits = (logits / quantum).round() * quantum
    logits[5, vocab // 2:] = float("-inf")
    probs = logits.softmax(-1)
    top_p = torch.tensor([0.9, 0.5, 0.999, 0.1, 0.7, 0.95, 1.0, 0.3])
    for uniform in (torch.rand(8, generator=gen), torch.tensor([0.0] * 4 + [1.0 - 2**-23] * 4)):
        keep = top_p_keep(probs, top_p) | (top_p >= 1.0)[:, None]  # a row without top-p keeps everything
        expected = draw_from_masses(integer_masses(probs).masked_fill(~keep, 0), uniform)
        marked = top_p.masked_fill(top_p >= 1.0, triton_top_p.NO_TOP_P)  # as the sampler passes them
        got = triton_top_p.top_p_draw(probs, marked, uniform, chunk=chunk, digit_bits=digit_bits, sub=128)
        assert torch.equal(got, expected)


@pytest.mark.parametrize("digit_bits", [2, 4, 5])
def test_fused_top_p_draw_settles_the_last_digits_in_every_chunk(digit_bits):
    """Every probability within 64 float32 steps of one value (built from bit patterns; rows of 6 chunks, sums
    about 0.73): the cut falls among the last digits, where each chunk's mass above the cut takes the last pass's
    digits over the chosen one (softmax rows rarely put tokens that close above the cut)."""
    triton_top_p = interpreted("server.kernels.sampling.triton_top_p")
    gen = torch.Generator().manual_seed(digit_bits)
    probs = (0x3A000000 + torch.randint(0, 64, (6, 1500), generator=gen, dtype=torch.int32)).view(torch.float32)
    top_p = torch.tensor([0.3, 0.5, 0.55, 0.7, 0.9, 0.05]) * probs.sum(-1).double().float()
    for uniform in (torch.rand(6, generator=gen), torch.tensor([0.0, 1 - 2**-23] * 3)):
        expected = draw_from_masses(integer_masses(probs).masked_fill(~top_p_keep(probs, top_p), 0), uniform)
        got = triton_top_p.top_p_draw(probs, top_p, uniform, chunk=256, digit_bits=digit_bits, sub=128)
        assert torch.equal(got, expected)


def test_fused_top_p_draw_keeps_every_token_of_a_row_without_top_p():
    """Floored masses can sum past 2**40 (here the first two alone do): a row without top-p (NO_TOP_P) must
    still keep the tail, as the torch path does. u near 1 lands on the last token. A top_p under 1.0 that is
    1.0 in float32 (0.99999999) is a top-p row: it cuts the tail with need 2**40, as the torch steps do."""
    triton_top_p = interpreted("server.kernels.sampling.triton_top_p")
    probs = torch.tensor([[0.50000006, 0.50000006, 1e-6]])
    uniform = torch.tensor([1.0 - 2**-23])
    expected = draw_from_masses(integer_masses(probs), uniform)
    assert expected.tolist() == [2]
    assert triton_top_p.top_p_draw(probs, torch.tensor([triton_top_p.NO_TOP_P]), uniform).tolist() == [2]
    almost_one = torch.tensor([0.99999999])
    cut = draw_from_masses(integer_masses(probs).masked_fill(~top_p_keep(probs, almost_one), 0), uniform)
    assert cut.tolist() == [1]
    assert triton_top_p.top_p_draw(probs, almost_one, uniform).tolist() == [1]


@pytest.mark.parametrize("vocab, spread, chunk", [(50, 4.0, 256), (3000, 0.3, 512), (4500, 1.0, 1024), (7, 0.0, 256)])
def test_full_draw_equals_the_torch_draw_bit_for_bit(vocab, spread, chunk):
    """Rows without top-p (the sampler's temperature-only draws on CUDA): the chunk masses and the draw kernel
    (interpreted) against draw_from_masses over every token, with a row of dropped tokens, a row of one chunk and
    of up to 9, uniforms at both ends; and floored masses summing past 2**40 keep their tail."""
    triton_top_p = interpreted("server.kernels.sampling.triton_top_p")
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(6, vocab, generator=gen) * spread
    logits[2, vocab // 3:] = float("-inf")
    probs = logits.softmax(-1)
    for uniform in (torch.rand(6, generator=gen), torch.tensor([0.0] * 3 + [1.0 - 2**-23] * 3)):
        expected = draw_from_masses(integer_masses(probs), uniform)
        assert torch.equal(triton_top_p.full_draw(probs, uniform, chunk=chunk, sub=128), expected)
    tail = torch.tensor([[0.50000006, 0.50000006, 1e-6]])
    assert triton_top_p.full_draw(tail, torch.tensor([1.0 - 2**-23])).tolist() == [2]


def test_fused_top_p_draw_builds_the_same_variants_for_every_batch_size(monkeypatch):
    """Triton builds a kernel variant per pointer alignment: the pass buffers' second halves started 16-byte
    aligned only for some batch sizes, and the H200 c32 run of the tenth session built histogram and cut
    variants mid-serving (a 1.05 s step) that start-up, at another batch size, had not."""
    import inspect

    triton_top_p = interpreted("server.kernels.sampling.triton_top_p")
    recorders = {}
    for name, runtime in (("_histogram_kernel", ("shift",)), ("_cut_stats_kernel", ()), ("_draw_kernel", ())):
        params = list(inspect.signature(getattr(triton_top_p, name).fn).parameters)
        recorders[name] = LaunchRecorder(params, runtime)
        monkeypatch.setattr(triton_top_p, name, recorders[name])
    params = torch.arange(10, dtype=torch.float32).repeat(5, 1)  # rows of one tensor, as the sampler holds them
    for num_rows in range(1, 41):
        probs = torch.full((num_rows, 3000), 1 / 3000)
        triton_top_p.top_p_draw(probs, params[1, :num_rows], params[3, :num_rows], chunk=512)
    assert len(recorders["_histogram_kernel"].variants) == 2  # the first pass and the rest
    assert len(recorders["_cut_stats_kernel"].variants) == 1
    assert len(recorders["_draw_kernel"].variants) == 1


def test_warm_draws_run_both_draws_and_a_greedy_row_and_leave_no_state(monkeypatch):
    """The start-up warm-up (run on CUDA only) takes the draw with top-p (and top-k, min-p, top logprobs) beside a
    greedy row, then the draw that keeps every token, and leaves no request state in the sampler."""
    sampler = Sampler(VOCAB, torch.device("cpu"), EOS)
    draws = []
    real_draw = Sampler._draw

    def spy(self, logits, requests, rows):
        draws.append([(r.params.top_p, r.params.top_k) for r in requests])
        return real_draw(self, logits, requests, rows)

    monkeypatch.setattr(Sampler, "_draw", spy)
    sampler.warm_up()  # on the CPU: nothing
    assert draws == []
    chosen = sampler.warm_draws()
    assert draws == [[(0.9, 50)], [(1.0, 0)]]  # the greedy row of the first step takes the argmax, not a draw
    assert len(chosen) == 3 and all(0 <= t < VOCAB for t in chosen)
    assert sampler.counts.output_counts.shape[0] == 0  # no penalty table allocated
