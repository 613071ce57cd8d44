"""Async scheduling against the serial engine on random workloads (server.engine.overlap): prefix sharing,
penalties, logprobs, prompt logprobs, min_tokens, stop strings, seeds, small KV caches (preemption), short
model lengths, small prefill budgets (chunked prefill), arrivals and aborts, in every LoRA mode. The same
tokens, text and finish reasons (aborted requests aside: an abort lands at another token count), one final
output each, every block back, and no placeholder token ever reaching the prefix-cache hashes, the penalty
counts or the detokenizer."""

from __future__ import annotations

import random

import pytest

import server.engine.engine as engine_module
from server.engine import prefix_cache
from server.engine.detokenizer import update_text
from server.engine.overlap import PLACEHOLDER
from server.engine.request import FinishReason, Request, SamplingParams
from server.engine.token_counts import TokenCounts
from tests.unit.engine_helpers import make_engine
from tests.unit.test_mixed_batch_oracle import adapter_refs


@pytest.fixture
def placeholder_sightings(monkeypatch) -> list:
    """Where a placeholder was seen by code that must only see real tokens."""
    seen = []
    extend = prefix_cache.extend_block_hashes

    def hashing(hashes, token_ids, space, num_blocks, block_size):
        if PLACEHOLDER in token_ids[: num_blocks * block_size]:
            seen.append(("block hashes", list(token_ids)))
        return extend(hashes, token_ids, space, num_blocks, block_size)

    row_of = TokenCounts.row_of

    def counting(self, request):
        if request.penalty_row < 0 and PLACEHOLDER in request.output_token_ids:
            seen.append(("penalty counts", request.request_id))
        return row_of(self, request)

    def detokenizing(request, decoder):
        if PLACEHOLDER in request.output_token_ids:
            seen.append(("detokenizer", request.request_id))
        return update_text(request, decoder)

    monkeypatch.setattr(prefix_cache, "extend_block_hashes", hashing)
    monkeypatch.setattr(TokenCounts, "row_of", counting)
    monkeypatch.setattr(engine_module, "update_text", detokenizing)
    return seen


def workload(rng: random.Random, adapters: list, count: int, prefix: str) -> list[Request]:
    made = []
    for index in range(count):
        prompt = [rng.randint(3, 300) for _ in range(rng.randint(1, 40))]
        if index % 3 == 0 and made:
            prompt = made[0].prompt_token_ids[: rng.randint(16, 40)] + prompt[:3]  # a shared prefix
        params = dict(temperature=rng.choice([0.0, 0.8, 1.1]), max_tokens=rng.randint(1, 40),
                      ignore_eos=rng.random() < 0.5, seed=rng.randint(0, 99))
        if rng.random() < 0.4:
            params.update(repetition_penalty=1.2, frequency_penalty=0.3)
        if rng.random() < 0.3:
            params.update(logprobs=True, top_logprobs=2)
        if rng.random() < 0.3:
            params["min_tokens"] = min(params["max_tokens"], 4)
        if rng.random() < 0.2:
            params["prompt_logprobs"] = 1
        if rng.random() < 0.2:
            params["stop"] = ["e"]
        adapter = rng.choice(adapters) if adapters else None
        made.append(Request(prompt, SamplingParams(**params), adapter=adapter, request_id=f"{prefix}-{index}"))
    return made


def run(engine, batch: list[Request], arrivals: dict[int, list[Request]], aborts: dict[int, list[str]]) -> dict:
    """Step to the end (requests added / ids aborted before call i); request id -> (tokens, text, finish)."""
    streamed = {r.request_id: [] for r in batch + [r for rs in arrivals.values() for r in rs]}
    for request in batch:
        engine.add_request(request)
    call = 0
    while engine.has_unfinished() or any(c >= call for c in arrivals):
        for request in arrivals.get(call, []):
            engine.add_request(request)
        for request_id in aborts.get(call, []):
            if (output := engine.abort(request_id)) is not None:
                streamed[request_id].append(output)
        for output in engine.step():
            streamed[output.request_id].append(output)
        call += 1
        assert call < 5000
    results = {}
    for request_id, outputs in streamed.items():
        tokens = [t for o in outputs for t in o.new_token_ids]
        assert PLACEHOLDER not in tokens, request_id
        assert [o.finished for o in outputs].count(True) == 1, request_id
        assert outputs[-1].completion_tokens == len(tokens), request_id
        results[request_id] = (tokens, "".join(o.new_text for o in outputs), outputs[-1].finish_reason)
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_usable_blocks
    return results


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("mode", ["base", "unmerged", "auto", "merged"])
def test_random_workloads_match_the_serial_engine(tiny_llama_dir, tiny_adapters, placeholder_sightings, seed, mode):
    refs = adapter_refs(tiny_llama_dir, tiny_adapters)
    adapters = {"base": [], "merged": [refs["all-r8"]]}.get(
        mode, [None, refs["attn-r4"], refs["all-r8"], refs["ko-r16"]])
    lora = {} if mode == "base" else dict(max_slots=4, max_rank=16, lora_mode=mode)
    results = []
    for async_scheduling in (False, True):
        rng = random.Random(seed)
        engine = make_engine(tiny_llama_dir, kv_cache_blocks=rng.choice([8, 12, 64]), async_scheduling=async_scheduling,
                             max_model_len=rng.choice([48, 64, 2048]), max_num_batched_tokens=rng.choice([16, 64]),
                             enable_prefix_caching=True, prefix_cache_scope="global", **lora)
        batch, late = workload(rng, adapters, 6, "first"), workload(rng, adapters, 6, "late")
        arrivals: dict[int, list[Request]] = {}
        for request in late:
            arrivals.setdefault(rng.randint(1, 25), []).append(request)
        aborts: dict[int, list[str]] = {}
        for request in rng.sample(batch + late, 3):
            aborts.setdefault(rng.randint(1, 40), []).append(request.request_id)
        results.append(run(engine, batch, arrivals, aborts))
    serial, overlapped = results
    assert not placeholder_sightings, placeholder_sightings[:3]
    for request_id, expected in serial.items():
        if expected[2] is not FinishReason.ABORT:
            assert overlapped[request_id] == expected, request_id
