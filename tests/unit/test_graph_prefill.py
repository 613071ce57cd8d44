"""Short prefill chunks ride the decode graph, one row per token (server.engine.runner). On the CPU an
eager stand-in replays what the graph would (static bucket inputs filled by DecodeGraphs._fill, stale
values included, through forward_decode),
and the logits of every sampled token are checked against PEFT on the same weights: fresh prompts and
decode rows in one replay, adapters mixed, a chunked prompt, and a cached-prefix hit."""

from __future__ import annotations

import random

import torch

from server.engine.cuda_graphs import DecodeGraphs, logit_rows, lora_tiles, max_lora_tiles
from server.engine.request import Request, SamplingParams
from tests.unit.engine_helpers import make_engine
from tests.unit.test_mixed_batch_oracle import adapter_refs, capture_sampled, peft_logits


class EagerReplay(DecodeGraphs):
    """DecodeGraphs without capture: the same static inputs (stale values left in them on purpose),
    filled by the same `run`, replayed eagerly through forward_decode; counts the chunk rows that ran."""

    def __init__(self, runner, max_rows: int):
        self.runner, self.max_rows, self.max_sequences = runner, max_rows, runner.max_batch_size
        self.chunk_rows = 0
        self.static = {}
        self.keys = []

    def run(self, requests, with_lora, chunks=(), input_ids=None):
        self.chunk_rows += sum(n for _, n in chunks)
        return super().run(requests, with_lora, chunks, input_ids)

    def _static_inputs(self, key):
        self.keys.append(key)
        if key not in self.static:
            inputs = self.step_inputs(key[0], self._tiled(*key[1:]))
            self.static[key] = {k: torch.full_like(v, 3) for k, v in inputs.items()}
        return self.static[key]

    def _replay(self, key):
        return self.runner.forward_decode(self.static[key], key[1], key[2])


def replaying(engine, max_rows: int = 64) -> EagerReplay:
    engine.runner.graphs = EagerReplay(engine.runner, max_rows)
    return engine.runner.graphs


def sampled_logits(engine) -> dict[str, list[torch.Tensor]]:
    """request_id -> the logits row each of its tokens was sampled from."""
    rows: dict[str, list[torch.Tensor]] = {}
    capture_sampled(engine, rows)
    return rows


def greedy(prompt, n, adapter=None) -> Request:
    return Request(list(prompt), SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), adapter=adapter)


def assert_matches_peft(model_dir, adapter_dirs, requests, names, rows, atol=2e-4):
    for request, name in zip(requests, names, strict=True):
        full = request.prompt_token_ids + request.output_token_ids
        reference = peft_logits(model_dir, None if name is None else adapter_dirs[name], full)
        start = len(request.prompt_token_ids) - 1
        got = rows[request.request_id]
        assert len(got) == len(request.output_token_ids)
        for step, row in enumerate(got):
            torch.testing.assert_close(row.cpu(), reference[start + step], atol=atol, rtol=atol,
                                       msg=f"{name} step {step}")


def run_arrivals(engine, requests, arrivals: dict[int, list[int]]) -> None:
    """Step the engine to the end, adding requests[i] for i in arrivals[step] before each step."""
    step = 0
    while step <= max(arrivals) or engine.has_unfinished():
        for i in arrivals.get(step, []):
            engine.add_request(requests[i])
        engine.step()
        step += 1


def test_prompts_joining_a_decode_batch_run_in_its_replay_and_match_peft(tiny_llama_dir, tiny_adapters):
    refs = adapter_refs(tiny_llama_dir, tiny_adapters)
    names = [None, "attn-r4", "all-r8", "ko-r16"]
    prompts = [[5, 17, 33, 100, 7], list(range(40, 61)), [200, 201], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 10, 20, 30]]
    engine = make_engine(tiny_llama_dir, max_slots=4, max_rank=16, kv_cache_blocks=128)
    replay = replaying(engine)
    rows = sampled_logits(engine)
    requests = [greedy(p, 6, None if n is None else refs[n]) for p, n in zip(prompts, names, strict=True)]
    run_arrivals(engine, requests, {0: [0], 2: [1, 2], 4: [3]})  # later prompts join while earlier ones decode
    assert replay.chunk_rows == sum(len(p) for p in prompts)  # every prompt token went through the replay
    # steps with prompt tokens replay chunk graphs (64 rows here: the smallest), the others decode graphs
    assert {key[0] for key in replay.keys if key[2]} == {64} and any(not key[2] for key in replay.keys)
    assert_matches_peft(tiny_llama_dir, tiny_adapters, requests, names, rows)


def test_chunked_prompt_and_cached_prefix_hit_in_the_replay_match_peft(tiny_llama_dir, tiny_adapters):
    system = list(range(100, 134))  # 34 tokens: two full blocks and a bit
    engine = make_engine(tiny_llama_dir, kv_cache_blocks=64, max_num_batched_tokens=16)
    replay = replaying(engine)
    rows = sampled_logits(engine)
    first, second = greedy(system + [50, 51], 4), greedy(system + [60, 61, 62], 4)
    for request in (first, second):
        engine.add_request(request)
        while engine.has_unfinished():
            engine.step()
    assert second.num_prefix_hit_tokens == 32  # the hit: only its last 5 tokens were computed
    assert replay.chunk_rows == len(first.prompt_token_ids) + 5
    assert_matches_peft(tiny_llama_dir, tiny_adapters, [first, second], [None, None], rows)


def test_no_prefill_rides_a_replay_when_the_setting_is_zero(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, kv_cache_blocks=64, cuda_graph_max_rows=0)
    replay = replaying(engine)
    request = greedy([1, 2, 3], 4)
    engine.add_request(request)
    while engine.has_unfinished():
        engine.step()
    assert replay.chunk_rows == 0 and len(request.output_token_ids) == 4


def test_steps_too_big_for_a_replay_and_prompt_logprobs_run_eagerly(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, kv_cache_blocks=64)
    replay = replaying(engine, max_rows=8)
    big, scored = greedy(list(range(10, 30)), 3), greedy([5, 6, 7], 3)
    scored.params.prompt_logprobs = 1
    small = greedy([1, 2, 3], 3)
    for request in (big, scored, small):
        engine.add_request(request)
        while engine.has_unfinished():
            engine.step()
    assert replay.chunk_rows == 3  # only the small prompt's chunk
    assert all(len(r.output_token_ids) == 3 for r in (big, scored, small))
    assert len(scored.prompt_logprobs) == 3


def test_short_prompts_beside_decode_rows_are_held_to_one_replay_and_long_ones_get_an_eager_step(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, kv_cache_blocks=64)
    replay = replaying(engine, max_rows=8)
    engine.scheduler.graph_rows = 8
    steps = []
    schedule = engine.scheduler.schedule

    def recording(*args):
        batch = schedule(*args)
        steps.append(([n for _, n in batch.prefill], len(batch.decode)))
        return batch

    engine.scheduler.schedule = recording
    prompts = [[3, 4, 5], [4, 4, 5], [5, 4, 5], [40, 41, 42, 43], [50, 51, 52, 53], list(range(60, 80))]
    lengths = [12, 12, 12, 3, 3, 3]
    alone = make_engine(tiny_llama_dir, kv_cache_blocks=64)
    expected = [_run_alone(alone, greedy(p, n)) for p, n in zip(prompts, lengths, strict=True)]
    requests = [greedy(p, n) for p, n in zip(prompts, lengths, strict=True)]
    running, short, long = requests[:3], requests[3:5], requests[5]
    for request in running:
        engine.add_request(request)
    engine.step()  # their prefill: no decode rows yet, the full budget
    for request in short:
        engine.add_request(request)
    engine.step()
    engine.step()
    engine.add_request(long)
    while engine.has_unfinished():
        engine.step()
    beside_decode = [(chunks, rows) for chunks, rows in steps if chunks and rows]
    # The second prompt does not fit whole in the room left (1 row): it waits for the next replay rather
    # than being split into 1 + 3 tokens over two steps.
    assert beside_decode[0] == ([4], 3)
    assert beside_decode[1] == ([4], 4)
    assert ([20], 5) in beside_decode  # the long prompt does not fit 8 rows: one eager step, whole
    assert replay.chunk_rows == 8
    assert [r.output_token_ids for r in requests] == expected


def _run_alone(engine, request) -> list[int]:
    engine.add_request(request)
    while engine.has_unfinished():
        engine.step()
    return request.output_token_ids


def test_logit_rows_are_the_finishing_chunks_last_rows_then_the_decode_rows():
    finishing = Request(list(range(10)), SamplingParams(max_tokens=2))
    partial = Request(list(range(30)), SamplingParams(max_tokens=2))
    finishing.prefill_target, partial.prefill_target = 10, 30  # as the scheduler sets them
    decoding = [greedy([1, 2], 2), greedy([3], 2)]
    assert logit_rows(decoding, [(finishing, 10), (partial, 8)]) == [9, 18, 19]
    assert logit_rows(decoding) == [0, 1]
    assert logit_rows([], [(partial, 8)]) == []


def test_a_replay_runs_the_lm_head_on_the_sampled_rows_only_and_steps_past_them_run_eagerly(tiny_llama_dir):
    """A 20-token prompt beside two decode rows rides a 32-row replay: the LM head sees the graph's
    min(bucket, max_batch_size) = 4 rows (not 32), and the tokens equal an engine without replays. With room
    for fewer sequences than a step has, that step runs eagerly."""
    prompts = [[5, 17, 33], [40, 41], list(range(60, 80))]
    results = []
    for mode in ("replay", "eager", "too-few-rows"):
        engine = make_engine(tiny_llama_dir, kv_cache_blocks=64, max_batch_size=4)
        if mode != "eager":
            replay = replaying(engine)
            if mode == "too-few-rows":
                replay.max_sequences = 2
        heads = []
        compute = engine.model.compute_logits
        engine.model.compute_logits = lambda hidden, heads=heads, compute=compute, **kw: (
            heads.append(hidden.shape[0]) or compute(hidden, **kw))
        requests = [greedy(p, 5) for p in prompts]
        engine.add_request(requests[0])
        engine.add_request(requests[1])
        engine.step()
        engine.add_request(requests[2])
        while engine.has_unfinished():
            engine.step()
        results.append([r.output_token_ids for r in requests])
        if mode == "replay":
            assert replay.chunk_rows == 3 + 2 + 20  # two prompts in one replay, then 20 tokens beside 2 decode rows
            assert max(heads) == 4
        if mode == "too-few-rows":
            assert replay.chunk_rows == 3 + 2  # two sequences fit; the third prompt's step runs eagerly
    assert results[0] == results[1] == results[2]


def test_lora_tiles_cut_each_chunk_into_tiles_then_one_per_decode_row_within_the_bound():
    first, second = greedy(list(range(40)), 2), greedy(list(range(5)), 2)
    first.slot, second.slot = 3, -1
    decoding = [greedy([1, 2], 2), greedy([3], 2)]
    decoding[0].slot, decoding[1].slot = 0, 2
    tiles = lora_tiles(decoding, [(first, 40), (second, 5)], tile=16)
    assert tiles == ([0, 16, 32, 40, 45, 46, 47], [3, 3, 3, -1, 0, 2])
    assert lora_tiles(decoding) == ([0, 1, 2], [0, 2])
    gen = random.Random(0)
    for _ in range(500):  # any split of a bucket's rows over at most max_sequences sequences fits the bound
        bucket, sequences, tile = gen.choice([64, 96, 128, 768]), gen.randint(1, 40), gen.choice([8, 16, 64])
        rows = gen.randint(1, bucket)
        num_chunks = gen.randint(0, min(sequences, rows))
        num_decode = gen.randint(0, min(sequences - num_chunks, rows - num_chunks))
        cuts = sorted(gen.sample(range(1, rows - num_decode), num_chunks - 1)) if num_chunks else []
        lengths = [b - a for a, b in zip([0, *cuts], [*cuts, rows - num_decode], strict=True)] if num_chunks else []
        chunks = [(greedy([1], 1), n) for n in lengths]
        starts, slots = lora_tiles([greedy([1], 1)] * num_decode, chunks, tile)
        assert starts[-1] == sum(lengths) + num_decode and all(b > a for a, b in zip(starts, starts[1:], strict=False))
        assert len(slots) <= max_lora_tiles(bucket, sequences, tile)


def test_a_prompt_in_a_lora_replay_takes_the_tiled_chunk_graph_and_matches_peft(tiny_llama_dir,
                                                                                            tiny_adapters):
    """A 50-token prompt with an adapter beside two decode rows rides a 64-row replay through the tiled chunk graph:
    its LoRA segments are 16 + 16 + 16 + 2 rows, then one per decode row, padded with empty ones; the tokens match
    PEFT. Decode-only steps keep the graphs of one segment a row."""
    refs = adapter_refs(tiny_llama_dir, tiny_adapters)
    names = ["attn-r4", None, "all-r8"]
    prompts = [[5, 17, 33], [40, 41], list(range(60, 110))]
    engine = make_engine(tiny_llama_dir, max_slots=4, max_rank=16, kv_cache_blocks=64)
    replay = replaying(engine, max_rows=128)
    rows = sampled_logits(engine)
    requests = [greedy(p, 5, None if n is None else refs[n]) for p, n in zip(prompts, names, strict=True)]
    for request in requests[:2]:
        engine.add_request(request)
    engine.step()
    engine.step()
    engine.add_request(requests[2])
    engine.step()
    assert replay.keys[-1] == (64, True, True)
    static = replay.static[(64, True, True)]
    slots = [requests[2].slot] * 4 + [requests[0].slot, requests[1].slot]
    assert static["lora_tile_starts"][:8].tolist() == [0, 16, 32, 48, 50, 51, 52, 52]
    assert static["lora_tile_slots"][:7].tolist() == [*slots, -1]
    assert static["lora_tile_starts"].numel() == max_lora_tiles(64, engine.runner.max_batch_size) + 1
    while engine.has_unfinished():
        engine.step()
    assert {key[2] for key in replay.keys if key[0] < 64} == {False}
    assert_matches_peft(tiny_llama_dir, tiny_adapters, requests, names, rows)


def test_chunk_graphs_start_at_64_rows_and_capture_all_takes_both_kinds(monkeypatch):
    """Steps with prompt tokens replay chunk graphs of CHUNK_MIN_BUCKET rows or more (capped by max_rows); decode
    steps the smallest bucket that fits. capture_all captures both kinds for every LoRA variant."""
    from server.engine import cuda_graphs

    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)

    class Runner:
        device = torch.device("cpu")
        prefill_in_graphs = True

    class Recording(DecodeGraphs):
        def _capture(self, bucket, with_lora, chunks):
            return None

    graphs = Recording(Runner(), max_rows=256, max_sequences=32)
    assert graphs._bucket(5, chunks=True) == 64 and graphs._bucket(5, chunks=False) == 8
    assert graphs._bucket(65, chunks=True) == graphs._bucket(65, chunks=False) == 96
    assert Recording(Runner(), max_rows=16, max_sequences=16)._bucket(3, chunks=True) == 16
    graphs.capture_all((False, True))
    chunk_buckets = (64, 96, 128, 192, 256)
    decode_buckets = [b for b in cuda_graphs.DECODE_BUCKETS if b <= 256]
    assert set(graphs._graphs) == ({(b, lora, True) for b in chunk_buckets for lora in (False, True)}
                                   | {(b, lora, False) for b in decode_buckets for lora in (False, True)})
    assert graphs._tiled(True, True) and not graphs._tiled(True, False) and not graphs._tiled(False, True)
    Runner.prefill_in_graphs = False
    plain = Recording(Runner(), max_rows=256, max_sequences=32)
    plain.capture_all((True,))
    assert not any(chunks for _, _, chunks in plain._graphs)
