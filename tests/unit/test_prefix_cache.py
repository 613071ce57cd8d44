"""Automatic prefix caching: block reuse, LRU eviction, identical outputs with and without the cache,
under preemption, and never across adapter versions."""

from __future__ import annotations

import dataclasses

import torch

from server.engine.kv_cache import KVCache
from server.engine.request import Request, SamplingParams
from tests.unit.engine_helpers import make_engine, record_preemptions
from tests.unit.test_mixed_batch_oracle import adapter_refs

SYSTEM = [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30,
          31, 32, 33, 34, 35, 36, 37, 38, 39, 40]  # 34 tokens: two full blocks and a bit


def _cache(num_blocks=6):
    return KVCache(1, num_blocks, 1, 4, torch.float32, torch.device("cpu"), block_size=16)


def test_freed_registered_blocks_are_reused_then_evicted_lru():
    cache = _cache()
    a, b = cache.allocate(2)
    cache.register(a, b"A")
    cache.register(b, b"B")
    cache.free([a, b])
    assert cache.num_free_blocks == 6 and cache.num_cached_blocks == 2
    assert cache.match_prefix([b"A", b"B", b"C"]) == [a, b]
    assert cache.match_prefix([b"B"]) == [b]  # shared: two users now
    cache.free([a, b, b])
    assert cache.match_prefix([b"X", b"A"]) == []  # a prefix must match from the first block
    taken = cache.allocate(5)  # four never-cached blocks, then the least recently freed cached one
    assert a in taken and b not in taken and cache.match_prefix([b"A"]) == []
    assert cache.num_cached_blocks == 1


def _greedy(prompt, n, adapter=None):
    return Request(list(prompt), SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), adapter=adapter)


def _run(engine, requests, one_by_one=True):
    if not one_by_one:
        for r in requests:
            engine.add_request(r)
    for r in requests:
        if one_by_one:
            engine.add_request(r)
        while engine.has_unfinished():
            engine.step()
    return [r.output_token_ids for r in requests]


def test_shared_prefix_is_reused_and_outputs_are_identical(tiny_llama_dir):
    prompts = [SYSTEM + [50, 51, 52], SYSTEM + [60], SYSTEM + [50, 51, 52]]
    cached = make_engine(tiny_llama_dir, kv_cache_blocks=64)
    plain = make_engine(tiny_llama_dir, kv_cache_blocks=64, enable_prefix_caching=False)
    got = _run(cached, [_greedy(p, 6) for p in prompts])
    assert got == _run(plain, [_greedy(p, 6) for p in prompts])
    # Request 2 reuses SYSTEM's two full blocks, request 3 the same (its third block holds SYSTEM's
    # tail and its own tokens, which request 1 computed too).
    assert cached.scheduler.prefix_hit_tokens >= 2 * 32
    assert plain.scheduler.prefix_hit_tokens == 0
    assert cached.kv_cache.num_free_blocks == cached.kv_cache.num_usable_blocks


def test_identical_outputs_under_preemption(tiny_llama_dir):
    prompts = [SYSTEM + [i, i + 1] for i in range(100, 105)]
    cached = make_engine(tiny_llama_dir, kv_cache_blocks=12)
    plain = make_engine(tiny_llama_dir, kv_cache_blocks=12, enable_prefix_caching=False)
    preempted = record_preemptions(cached)
    got = _run(cached, [_greedy(p, 25) for p in prompts], one_by_one=False)
    assert preempted  # the cache really ran out
    assert got == _run(plain, [_greedy(p, 25) for p in prompts], one_by_one=False)
    assert cached.kv_cache.num_free_blocks == cached.kv_cache.num_usable_blocks


def test_blocks_are_never_shared_across_adapter_versions(tiny_llama_dir, tiny_adapters):
    refs = adapter_refs(tiny_llama_dir, tiny_adapters)
    v1 = refs["all-r8"]
    v2 = dataclasses.replace(refs["attn-r4"], name="all-r8", version=2)  # same name, new version, new weights
    cached = make_engine(tiny_llama_dir, kv_cache_blocks=64, max_slots=2, max_rank=16)
    plain = make_engine(tiny_llama_dir, kv_cache_blocks=64, max_slots=2, max_rank=16, enable_prefix_caching=False)
    prompt = SYSTEM + [70, 71]
    order = [v1, v2, None, v1]
    got = _run(cached, [_greedy(prompt, 5, a) for a in order])
    assert got == _run(plain, [_greedy(prompt, 5, a) for a in order])
    assert got[0] != got[1]  # the versions really differ
    assert cached.scheduler.prefix_hit_tokens == 32  # only the second v1 request hit (v1's own blocks)


def test_tenants_share_cached_prefixes_only_with_the_global_scope(tiny_llama_dir):
    """Default scope "tenant": another tenant's identical prompt is computed again (no timing signal);
    "global" (vLLM's behaviour) shares it; within one tenant it is shared either way."""
    def hits(scope: str, tenants: tuple[str, str]) -> int:
        engine = make_engine(tiny_llama_dir, kv_cache_blocks=64, prefix_cache_scope=scope)
        first, second = _greedy(SYSTEM + [50], 2), _greedy(SYSTEM + [50], 2)
        first.tenant, second.tenant = tenants
        _run(engine, [first, second])
        return second.num_prefix_hit_tokens

    assert hits("tenant", ("a", "b")) == 0
    assert hits("tenant", ("a", "a")) >= 32
    assert hits("global", ("a", "b")) >= 32
