"""Async scheduling (server.engine.overlap): steps launched before the host has read their predecessor's
tokens give what the serial engine gives (tokens, logprobs, text, finish reasons) for every sampling
parameter, mixed adapters, stop tokens and strings, aborts and arrivals mid-run; no placeholder reaches an
output; every KV block, adapter slot and penalty row comes back."""

from __future__ import annotations

from server.engine import overlap
from server.engine.request import FinishReason, Request, SamplingParams
from tests.unit.engine_helpers import make_engine, record_preemptions
from tests.unit.test_mixed_batch_oracle import adapter_refs

PROMPTS = [[5, 17, 33, 100, 7], [44, 55, 66, 77, 88, 99], [200, 201], [1, 2, 3, 4, 5, 6, 7, 8, 9], [9, 9, 9],
           [120, 121, 122, 123]]
PARAMS = [
    dict(temperature=0.0, max_tokens=14, ignore_eos=True),
    dict(temperature=0.9, top_p=0.9, seed=11, frequency_penalty=0.5, logprobs=True, top_logprobs=3,
         max_tokens=12, ignore_eos=True),
    dict(temperature=0.0, repetition_penalty=1.3, max_tokens=10),  # EOS may end it early
    dict(temperature=1.2, top_k=20, min_p=0.05, seed=12, presence_penalty=-0.5, logit_bias={7: 2.0},
         min_tokens=3, max_tokens=9),
    dict(temperature=0.7, seed=13, max_tokens=1, ignore_eos=True),  # ends at its first token
    dict(temperature=0.0, max_tokens=11, ignore_eos=True, logprobs=True),
]


def requests(adapters=(), overrides: dict[int, dict] | None = None) -> list[Request]:
    made = []
    for index, (prompt, params) in enumerate(zip(PROMPTS, PARAMS, strict=True)):
        adapter = adapters[index % len(adapters)] if adapters else None
        params = {**params, **(overrides or {}).get(index, {})}
        made.append(Request(list(prompt), SamplingParams(**params), adapter=adapter))
    return made


def run(engine, batch: list[Request], arrivals: dict[int, list[Request]] = (), aborts: dict[int, str] = ()):
    """Step to the end; `arrivals` / `aborts`: requests added / ids aborted before step call i. Returns what
    each request's outputs carried, and the steps launched ahead."""
    ahead = []
    real = overlap.launch_ahead

    def counting(engine, continuing, requests, launched):
        ahead.append(real(engine, continuing, requests, launched))
        ahead[-1].ended = len(requests) - len(continuing)  # requests at their last token: no row
        return ahead[-1]

    overlap.launch_ahead = counting
    streamed: dict[str, list] = {r.request_id: [] for r in batch}
    try:
        for request in batch:
            engine.add_request(request)
        call = 0
        while engine.has_unfinished() or call in dict(arrivals):
            for request in dict(arrivals).get(call, []):
                streamed[request.request_id] = []
                engine.add_request(request)
            if call in dict(aborts):
                output = engine.abort(dict(aborts)[call])
                if output is not None:
                    streamed[output.request_id].append(output)
            for output in engine.step():
                streamed[output.request_id].append(output)
            call += 1
    finally:
        overlap.launch_ahead = real
    summary = {}
    for request_id, outputs in streamed.items():
        tokens = [t for o in outputs for t in o.new_token_ids]
        assert overlap.PLACEHOLDER not in tokens
        assert [o.finished for o in outputs].count(True) == 1, request_id  # exactly one final output
        logprobs = [p for o in outputs if o.new_logprobs for p in o.new_logprobs]
        summary[request_id] = (tokens, "".join(o.new_text for o in outputs), outputs[-1].finish_reason, logprobs)
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_usable_blocks  # every block came back
    table = engine.sampler.counts
    assert len(table.free_rows) == table.output_counts.shape[0]  # every penalty row came back
    return summary, ahead


def both(model_dir, make, kv_cache_blocks=128, **engine_kw):
    """The summaries of one workload on a serial and an overlapping engine (`make(engine)` builds it)."""
    results = []
    for async_scheduling in (False, True):
        engine = make_engine(model_dir, kv_cache_blocks=kv_cache_blocks, async_scheduling=async_scheduling,
                             **engine_kw)
        batch, arrivals, aborts = make(engine)
        summary, ahead = run(engine, batch, arrivals, aborts)
        ids = [r.request_id for r in batch] + [r.request_id for rs in dict(arrivals).values() for r in rs]
        results.append(([summary[i] for i in ids], ahead))
    (serial, serial_ahead), (overlapped, overlapped_ahead) = results
    assert not serial_ahead
    return serial, overlapped, overlapped_ahead


def same(overlapped: list, serial: list) -> None:
    """Tokens, text and finish reasons equal; logprobs equal up to float rounding (a request that arrives
    mid-run may join a batch of another size, and a matmul's rounding depends on its rows)."""
    assert [s[:3] for s in overlapped] == [s[:3] for s in serial]
    for (*_, got), (*_, want) in zip(overlapped, serial, strict=True):
        assert len(got) == len(want) and all(abs(a - b) < 1e-4 for a, b in zip(got, want, strict=True))


def test_every_sampling_parameter_gives_the_serial_tokens_logprobs_and_finishes(tiny_llama_dir):
    serial, overlapped, ahead = both(tiny_llama_dir, lambda engine: (requests(), {}, {}))
    same(overlapped, serial)
    assert len(ahead) >= 8  # the steady decode steps really ran ahead
    assert any(launched.ended for launched in ahead)  # also beside a request's last token
    assert serial[4][2] is FinishReason.LENGTH and len(serial[4][0]) == 1
    assert len(serial[1][3]) == 12  # logprobs came through for every token


def test_mixed_adapters_stop_strings_aborts_and_arrivals_match_the_serial_engine(tiny_llama_dir, tiny_adapters):
    refs = adapter_refs(tiny_llama_dir, tiny_adapters)
    adapters = [None, refs["attn-r4"], refs["all-r8"], refs["ko-r16"]]
    # A stop string from the middle of what request 0 writes alone, so that it ends early in both runs.
    probe = make_engine(tiny_llama_dir, kv_cache_blocks=128, max_slots=4, max_rank=16)
    (text,) = [t for _, t, _, _ in run(probe, requests(adapters)[:1])[0].values()]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip() and len(text) > 4

    def make(engine):
        batch = requests(adapters, {0: dict(stop=[stop])})
        late = requests(adapters[1:])[:3]  # arrive while the first batch decodes
        return batch, {3: late[:2], 7: late[2:]}, {5: batch[1].request_id}

    serial, overlapped, ahead = both(tiny_llama_dir, make, max_slots=4, max_rank=16, lora_mode="unmerged")
    same(overlapped, serial)
    assert len(ahead) >= 4
    assert any(launched.batch.prefill for launched in ahead)  # an arrival was admitted in a step run ahead
    assert serial[0][2] is FinishReason.STOP and stop not in serial[0][1]
    assert serial[1][2] is FinishReason.ABORT


def test_merged_mode_and_auto_mode_match_the_serial_engine(tiny_llama_dir, tiny_adapters):
    refs = adapter_refs(tiny_llama_dir, tiny_adapters)
    for mode, adapters in (("merged", [refs["all-r8"]]), ("auto", [refs["attn-r4"], refs["ko-r16"]])):
        # Arrivals mid-run: merged mode holds other adapters until its batch drains; auto mode, unmerged
        # over two adapters, admits them in steps run ahead (it cannot merge a mixed batch).
        serial, overlapped, ahead = both(
            tiny_llama_dir, lambda engine, a=adapters: (requests(a), {3: requests(a)[:2]}, {}),
            max_slots=4, max_rank=16, lora_mode=mode)
        same(overlapped, serial)
        assert len(ahead) >= 4, mode
        if mode == "auto":
            assert any(launched.batch.prefill for launched in ahead)


def test_a_step_ahead_never_outruns_the_kv_cache(tiny_llama_dir):
    """With too few blocks for everyone's next token, the engine preempts in a serial step (a step launched
    ahead never preempts) and still gives the tokens of a roomy cache."""
    preempted = []

    def make(engine):
        preempted.append(record_preemptions(engine))
        params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
        return [Request(list(p), params) for p in PROMPTS], {}, {}

    roomy, _, _ = both(tiny_llama_dir, make)
    assert not any(preempted)
    serial, overlapped, ahead = both(tiny_llama_dir, make, kv_cache_blocks=10)
    assert all(preempted[2:]) and ahead  # the cache really ran out, and steps still ran ahead in between
    same(overlapped, serial)
    assert [s[0] for s in serial] == [s[0] for s in roomy]


def test_unset_setting_is_on_for_the_engine_and_off_in_a_thread_of_the_http_process(tiny_llama_dir, tmp_path):
    from server.api.state import ServerState
    from tests.api.helpers import api_settings

    assert make_engine(tiny_llama_dir, kv_cache_blocks=16).async_scheduling  # the engine process, benchmarks
    for setting, expected in ((None, False), (True, True)):
        state = ServerState(api_settings(tiny_llama_dir, tmp_path / "store", async_scheduling=setting))
        state.start()
        try:
            assert state.engine.engine.async_scheduling is expected
        finally:
            state.stop()


def test_a_prompt_failed_in_a_step_run_ahead_gets_its_error_even_if_the_next_step_fails(tiny_llama_dir):
    """A prefill out of memory in a step launched ahead fails its request at once; its error output must
    reach the caller even when the rest of that call raises (the guard then fails everything else)."""
    import torch

    from server.engine import guard

    engine = make_engine(tiny_llama_dir, kv_cache_blocks=64, async_scheduling=True)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    running, late = Request([5, 6, 7], params), Request([9, 9, 9, 9], params)
    finals: dict[str, list] = {}

    def collect(outputs) -> None:
        for output in outputs:
            finals.setdefault(output.request_id, []).append(output)

    engine.add_request(running)
    collect(guard.run_step(engine))
    collect(guard.run_step(engine))
    assert engine._ahead is not None
    engine.add_request(late)
    prefill_step = engine.runner.prefill_step

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("injected")

    def fault(*args, **kwargs):
        raise RuntimeError("injected")

    # The late prompt is admitted in the step launched ahead and runs out of memory; then reading the step
    # before it raises in the same call, so the guard fails everything else.
    postprocess = engine._postprocess
    engine.runner.prefill_step, engine._postprocess = out_of_memory, fault
    collect(guard.run_step(engine))
    engine.runner.prefill_step, engine._postprocess = prefill_step, postprocess
    while engine.has_unfinished():
        collect(guard.run_step(engine))
    for request in (running, late):
        outputs = finals[request.request_id]
        assert [o.finished for o in outputs].count(True) == 1 and outputs[-1].finished, request.request_id
        assert outputs[-1].error
    assert "out of memory" in finals[late.request_id][-1].error


def test_fairness_charges_no_token_for_a_dropped_row(tiny_llama_dir):
    """Requests that end on a stop token have a row in the step run ahead of their end; its token is dropped,
    and so is its charge: the tenants' counters equal the serial engine's."""
    counters = []
    for async_scheduling in (False, True):
        engine = make_engine(tiny_llama_dir, kv_cache_blocks=128, async_scheduling=async_scheduling)
        probe = run(engine, [Request(list(PROMPTS[0]), SamplingParams(max_tokens=12, temperature=0,
                                                                       ignore_eos=True))])[0]
        stop_at = next(iter(probe.values()))[0][5]  # the sixth token ends a greedy run of this prompt
        batch = [Request(list(p), SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_at]),
                         tenant=f"t{i % 2}") for i, p in enumerate(PROMPTS)]
        run(engine, batch)
        counters.append(dict(engine.scheduler.tenants.counters))
    assert counters[1] == counters[0]


def test_a_tenant_at_its_cap_is_replaced_in_the_step_that_runs_ahead_of_its_request_s_end(tiny_llama_dir):
    """A request at its last token gets no row in the step launched ahead, and no place at its tenant's cap:
    the tenant's next request is admitted in that step, so its first token comes one call after the end."""
    from server.engine.fairness import TenantCounters, TenantPolicy

    engine = make_engine(tiny_llama_dir, kv_cache_blocks=64, async_scheduling=True)
    engine.scheduler.tenants = TenantCounters(policies={"t": TenantPolicy(max_running_requests=1)})
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    first, second = Request([5, 6, 7], params, tenant="t"), Request([8, 9, 10], params, tenant="t")
    engine.add_request(first)
    engine.add_request(second)
    seen: dict[str, list[int]] = {first.request_id: [], second.request_id: []}
    call = 0
    while engine.has_unfinished():
        for output in engine.step():
            if output.finished or output.new_token_ids:
                seen[output.request_id].append(call)
        call += 1
    assert seen[second.request_id][0] == seen[first.request_id][-1] + 1
    assert len(second.output_token_ids) == 6
