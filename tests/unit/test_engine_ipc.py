"""The engine process boundary without a model: message codec, metric deltas, and the client against
a fake engine process (tests/unit/fake_engine_core.py)."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import tempfile
from pathlib import Path

import pytest
from prometheus_client.metrics import MetricWrapperBase
from transformers import AutoTokenizer

from server import metrics
from server.config import Settings
from server.engine.async_engine import EngineDeadError
from server.engine.client import EngineProcessClient, EngineStartError
from server.engine.core import route_outputs
from server.engine.engine_handle import EngineAttachment
from server.engine.metric_sink import DeltaSink, PrometheusSink, RelayingSink
from server.engine.protocol import (
    AbortRequests,
    AddRequest,
    Failed,
    MetricsDelta,
    Outputs,
    Ready,
    Rejected,
    Shutdown,
    TokenOutput,
    input_codec,
    output_codec,
)
from server.engine.request import FinishReason, Request, SamplingError, SamplingParams
from server.metrics import REGISTRY
from tests.unit.fake_engine_core import DIE, MODEL, REFUSE, fake_engine_core

SINK_TEST_MODEL = "sink-test-model"


@pytest.fixture(autouse=True)
def _drop_test_series():
    """Leave no series of this module's model names in the shared registry (tests of /metrics read it)."""
    yield
    families = [f for f in vars(metrics).values() if isinstance(f, MetricWrapperBase)]
    for family in families + list(metrics.length_histograms.get()):
        for labels in list(getattr(family, "_metrics", {})):
            if labels and labels[0] in (MODEL, SINK_TEST_MODEL):
                family.remove(*labels)


def test_every_message_round_trips():
    params = SamplingParams(max_tokens=7, temperature=0.5, top_k=3, logit_bias={5: -1.5}, seed=9, stop=["\n"],
                            stop_token_ids=[2], logprobs=True)
    inputs = [AddRequest("a", [1, 2, 3], params, ("tenant-lora", 4), 12.5, "tenant-a"),
              AddRequest("b", [7], SamplingParams(), None, 0.0), AbortRequests(["a", "b"]),
              AbortRequests(["c"], FinishReason.STOP), Shutdown()]
    encoder, decoder = input_codec()
    assert [decoder.decode(encoder.encode(m)) for m in inputs] == inputs
    delta = MetricsDelta(increments=[("generation_tokens", ["m"], 3.0)], gauges=[("kv_cache_usage_perc", ["m"], 0.5)],
                         histograms=[("inter_token_latency_seconds", ["m"], [(3, 1), (4, 1)], 0.03)],
                         removals=[("lora_requests_info", ["m", "8", "a", ""])])
    outputs = [Ready(256, [0, 2], 8, (256, 16, 1024, "float32", None, True), delta), Failed("OSError: gone"),
               Outputs([TokenOutput("a", [5, 6], [-0.1, -0.2], None, 3, 2, None, [[(5, -0.1), (9, -2.5)], [(6, -0.2)]]),
                        TokenOutput("b", [], None, FinishReason.ERROR, 1, 0, "RuntimeError during generation")],
                       [Rejected("c", "sampling", "logit_bias token id 999 is outside the vocabulary")], delta)]
    encoder, decoder = output_codec()
    assert [decoder.decode(encoder.encode(m)) for m in outputs] == outputs


def test_delta_sink_coalesces_and_orders_removals_before_gauges():
    sink = DeltaSink()
    assert sink.drain() is None
    sink.inc("generation_tokens", ("m",))
    sink.inc("generation_tokens", ("m",), 2)
    sink.observe("inter_token_latency_seconds", ("m",), 0.1)
    sink.observe("inter_token_latency_seconds", ("m",), 0.2)
    info = ("m", "8")
    sink.set("lora_requests_info", (*info, "a", ""), 1.0)
    sink.remove("lora_requests_info", (*info, "a", ""))
    sink.set("lora_requests_info", (*info, "b", ""), 2.0)
    sink.remove("lora_requests_info", (*info, "b", ""))
    sink.set("lora_requests_info", (*info, "a", ""), 3.0)  # back to the first labels within one batch
    delta = sink.drain()
    assert delta.increments == [("generation_tokens", ["m"], 3.0)]
    bounds = list(metrics.inter_token_latency_seconds._upper_bounds)  # 0.1 in (0.08, 0.15], 0.2 in (0.15, 0.3]
    counted = [(bounds.index(0.15), 1), (bounds.index(0.3), 1)]
    assert delta.histograms == [("inter_token_latency_seconds", ["m"], counted, pytest.approx(0.3))]
    assert delta.gauges == [("lora_requests_info", ["m", "8", "a", ""], 3.0)]
    assert delta.removals == [("lora_requests_info", ["m", "8", "b", ""])]
    assert sink.drain() is None
    # a series' updates before its removal go with it (applied after the removal they would bring it back)
    sink.inc("adapter_requests", ("m", "gone", "rejected"))
    sink.observe("adapter_load_seconds", ("m", "gone"), 0.5)
    sink.remove("adapter_requests", ("m", "gone", "rejected"))
    sink.remove("adapter_load_seconds", ("m", "gone"))
    sink.inc("adapter_requests", ("m", "kept", "ok"))
    delta = sink.drain()
    assert delta.increments == [("adapter_requests", ["m", "kept", "ok"], 1.0)] and delta.histograms == []
    assert sorted(delta.removals) == [("adapter_load_seconds", ["m", "gone"]),
                                      ("adapter_requests", ["m", "gone", "rejected"])]


def test_counted_observations_expose_as_observe_calls_do():
    """Histograms cross the process boundary counted into buckets; applied, they read as the same values
    observed one by one (bucket counts exactly, the sum to rounding), edge values and +Inf included."""
    direct, counted = "direct-histogram-model", SINK_TEST_MODEL
    values = [0.0, 0.001, 0.0010001, 0.0025, 0.02, 0.3, 2.5, 2.5000001, 1e9, float("inf"), 0.004] * 3
    family = metrics.inter_token_latency_seconds
    for value in values:
        family.labels(direct).observe(value)
    sink = DeltaSink()
    for value in values[:20]:
        sink.observe("inter_token_latency_seconds", (counted,), value)
    PrometheusSink().apply(sink.drain())
    for value in values[20:]:  # a second batch onto the same series
        sink.observe("inter_token_latency_seconds", (counted,), value)
    PrometheusSink().apply(sink.drain())
    try:
        by_model: dict[str, dict[str, float]] = {direct: {}, counted: {}}
        for metric in REGISTRY.collect():
            if metric.name != "vllm:inter_token_latency_seconds":
                continue
            for sample in metric.samples:
                if sample.labels.get("model_name") in by_model:
                    key = sample.name + ":" + sample.labels.get("le", "")
                    by_model[sample.labels["model_name"]][key] = sample.value
        assert by_model[direct] and by_model[direct].keys() == by_model[counted].keys()
        for key, value in by_model[direct].items():
            if key.endswith("_sum:"):
                assert by_model[counted][key] == pytest.approx(value, rel=1e-12)
            else:
                assert by_model[counted][key] == value, key
        assert by_model[counted]["vllm:inter_token_latency_seconds_count:"] == len(values)
    finally:
        family.remove(direct)


def test_prometheus_sink_applies_a_delta_to_the_registry():
    model = SINK_TEST_MODEL
    sink = DeltaSink()
    sink.set("lora_requests_info", (model, "8", "stale", ""), 1.0)
    PrometheusSink().apply(sink.drain())
    sink.inc("generation_tokens", (model,), 5)
    sink.observe("time_to_first_token_seconds", (model,), 0.02)
    sink.remove("lora_requests_info", (model, "8", "stale", ""))
    sink.set("lora_requests_info", (model, "8", "fresh", ""), 2.0)
    PrometheusSink().apply(sink.drain())
    value = REGISTRY.get_sample_value
    assert value("vllm:generation_tokens_total", {"model_name": model}) == 5
    assert value("vllm:time_to_first_token_seconds_count", {"model_name": model}) == 1
    info = {"model_name": model, "max_lora": "8", "waiting_lora_adapters": ""}
    assert value("vllm:lora_requests_info", {**info, "running_lora_adapters": "fresh"}) == 2.0
    assert value("vllm:lora_requests_info", {**info, "running_lora_adapters": "stale"}) is None
    metrics.lora_requests_info.remove(model, "8", "fresh", "")


@pytest.fixture()
def tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture()
def client(tokenizer):
    engine = EngineProcessClient(Settings(max_queue_size=4), tokenizer, MODEL, Path("."), target=fake_engine_core)
    engine.start()
    yield engine
    engine.shutdown(timeout=10)


async def _collect(client: EngineProcessClient, prompt: list[int], **params) -> list:
    request = Request(prompt, SamplingParams(**params))
    return [output async for output in client.generate(request)]


def test_client_detokenizes_what_the_engine_sends(client, tokenizer):
    prompt = tokenizer.encode("The capital of France is Paris.")
    outputs = asyncio.run(_collect(client, prompt, max_tokens=len(prompt)))
    assert [t for o in outputs for t in o.new_token_ids] == prompt
    assert "".join(o.new_text for o in outputs) == tokenizer.decode(prompt)
    assert outputs[-1].finished and outputs[-1].finish_reason is FinishReason.LENGTH
    assert outputs[-1].completion_tokens == len(prompt) and client.num_in_flight == 0


def test_stop_string_is_cut_and_stops_the_engine_request(client, tokenizer):
    prompt = tokenizer.encode("Hello world! loraplex serves")
    stopped = REGISTRY.get_sample_value("vllm:request_success_total", {"model_name": MODEL, "finished_reason": "stop"})
    outputs = asyncio.run(_collect(client, prompt, max_tokens=10**9, stop=["world"]))
    assert "".join(o.new_text for o in outputs) == "Hello "
    assert outputs[-1].finish_reason is FinishReason.STOP
    # the engine was told to stop (reason stop, not abort): its metric delta arrives with a later step
    for _ in range(200):
        now = REGISTRY.get_sample_value("vllm:request_success_total",
                                        {"model_name": MODEL, "finished_reason": "stop"})
        if now == (stopped or 0) + 1:
            break
        asyncio.run(asyncio.sleep(0.01))
    assert now == (stopped or 0) + 1


def test_the_stop_token_that_ends_a_request_leaves_no_text_unless_asked(client, tokenizer):
    prompt = tokenizer.encode("Hello world! loraplex serves")
    stop_token = prompt[3]
    for include, kept in ((False, prompt[:3]), (True, prompt[:4])):
        outputs = asyncio.run(_collect(client, prompt, max_tokens=100, stop_token_ids=[stop_token],
                                       include_stop_str_in_output=include))
        assert [t for o in outputs for t in o.new_token_ids] == prompt[:4]
        assert "".join(o.new_text for o in outputs) == tokenizer.decode(kept)
        assert outputs[-1].finish_reason is FinishReason.STOP


def test_refusal_raises_the_engines_error(client):
    with pytest.raises(SamplingError, match="top_p"):
        asyncio.run(_collect(client, [REFUSE], max_tokens=3))
    assert client.num_in_flight == 0 and client.is_alive()


def test_engine_death_fails_open_streams_and_new_requests(client):
    async def scenario():
        long = asyncio.ensure_future(_collect(client, [5, 6], max_tokens=10**9))
        await asyncio.sleep(0.2)
        with pytest.raises(EngineDeadError):
            await _collect(client, [DIE], max_tokens=1)
        with pytest.raises(EngineDeadError, match="exited with code 3"):
            await asyncio.wait_for(long, 2)

    asyncio.run(scenario())
    assert not client.is_alive()
    with pytest.raises(EngineDeadError):
        asyncio.run(_collect(client, [5], max_tokens=1))


def test_shutdown_ends_the_engine_process(client):
    process = client._engine.process
    client.shutdown(timeout=10)
    assert process.exitcode == 0 and not client.is_alive()


def _exit_at_once(*args) -> None:
    raise SystemExit(4)


def test_a_process_that_exits_while_loading_fails_start(tokenizer):
    engine = EngineProcessClient(Settings(), tokenizer, MODEL, Path("."), target=_exit_at_once)
    with pytest.raises(EngineStartError, match="exited with code 4 while loading"):
        engine.start()


def test_route_outputs_sends_each_client_its_requests_and_everyone_the_metrics():
    delta = MetricsDelta(increments=[("request_success", [MODEL, "length"], 1.0)])
    step = Outputs([TokenOutput("a", [1], None, None, 3, 1), TokenOutput("b", [2], None, FinishReason.LENGTH, 3, 1),
                    TokenOutput("c", [3], None, None, 3, 1)], [Rejected("d", "sampling", "bad")], delta)
    clients = {"b": 1, "c": 2, "d": 2}
    parts = dict(route_outputs(step, clients, 4))
    assert [o.request_id for o in parts[0].outputs] == ["a"]
    assert [o.request_id for o in parts[1].outputs] == ["b"]
    assert [o.request_id for o in parts[2].outputs] == ["c"] and [r.request_id for r in parts[2].rejected] == ["d"]
    assert parts[3].outputs == [] and all(part.metrics is delta for part in parts.values())
    assert clients == {"c": 2}  # b finished and d was refused: their routes are gone
    quiet = route_outputs(Outputs([TokenOutput("c", [4], None, None, 3, 2)]), clients, 4)
    assert [(client, [o.request_id for o in part.outputs]) for client, part in quiet] == [(2, ["c"])]
    alone = Outputs([TokenOutput("e", [5], None, None, 3, 1)])
    assert route_outputs(alone, {}, 1) == [(0, alone)]


def test_relaying_sink_applies_here_and_keeps_the_update_for_the_others():
    sink = RelayingSink()
    labels = (SINK_TEST_MODEL, "base", "rejected")
    before = REGISTRY.get_sample_value("loraplex_adapter_requests_total", dict(zip(
        ("model_name", "adapter", "status"), labels, strict=True))) or 0
    sink.inc("adapter_requests", labels)
    sink.observe("http_admission_seconds", (SINK_TEST_MODEL,), 0.002)
    assert REGISTRY.get_sample_value("loraplex_adapter_requests_total", dict(zip(
        ("model_name", "adapter", "status"), labels, strict=True))) == before + 1
    delta = sink.pending.drain()
    assert delta.increments == [("adapter_requests", list(labels), 1.0)]
    assert delta.histograms == [("http_admission_seconds", [SINK_TEST_MODEL], [(1, 1)], 0.002)]  # in (0.001, 0.0025]
    sink.inc("adapter_requests", (SINK_TEST_MODEL, "gone-adapter", "ok"))
    sink.pending.drain()
    assert sink.forget_adapter("gone-adapter") == [(SINK_TEST_MODEL, "gone-adapter", "ok")]
    assert sink.pending.drain().removals == [("adapter_requests", [SINK_TEST_MODEL, "gone-adapter", "ok"])]


def test_a_relayed_removal_frees_the_adapters_place_under_the_label_cap():
    counter = metrics.adapter_requests
    saved = counter.max_adapters
    try:
        counter.max_adapters = len(counter._series_by_adapter.keys() - {"base", "other"}) + 1
        counter.labels(SINK_TEST_MODEL, "first", "ok").inc()
        counter.labels(SINK_TEST_MODEL, "second", "ok").inc()  # over the cap: counted as "other"
        assert REGISTRY.get_sample_value("loraplex_adapter_requests_total",
                                         {"model_name": SINK_TEST_MODEL, "adapter": "other", "status": "ok"}) == 1
        PrometheusSink().remove("adapter_requests", (SINK_TEST_MODEL, "first", "ok"))  # as another process's delete
        counter.labels(SINK_TEST_MODEL, "second", "ok").inc()
        assert REGISTRY.get_sample_value("loraplex_adapter_requests_total",
                                         {"model_name": SINK_TEST_MODEL, "adapter": "second", "status": "ok"}) == 1
    finally:
        counter.max_adapters = saved
        counter.forget("second")  # the "other" series goes with the module's autouse fixture


def test_two_attached_clients_share_one_engine_process(tokenizer):
    """Two API processes' clients (here in one process) on one engine process: each gets only its own
    requests' outputs, one's metric updates reach the other through the engine, and the engine exits
    after both have shut down."""
    ipc_dir = tempfile.mkdtemp(prefix="loraplex-test-ipc-")
    endpoints = [(f"ipc://{ipc_dir}/input-{i}", f"ipc://{ipc_dir}/output-{i}") for i in range(2)]
    engine = multiprocessing.get_context("spawn").Process(
        target=fake_engine_core, args=(Settings(), ".", MODEL, endpoints, os.getpid()))
    engine.start()
    relay = RelayingSink()
    clients = [EngineProcessClient(Settings(), tokenizer, MODEL, Path("."), attachment=EngineAttachment(
        i, *endpoints[i], engine.pid, 2), relay=relay.pending if i == 1 else None) for i in range(2)]
    try:
        for client in clients:
            client.start()
        first, second = tokenizer.encode("one two three"), tokenizer.encode("four five six seven")

        async def both():
            return await asyncio.gather(_collect(clients[0], first, max_tokens=12),
                                        _collect(clients[1], second, max_tokens=12),
                                        _collect(clients[0], second, max_tokens=5))

        outputs = asyncio.run(both())
        for prompt, got, length in zip((first, second, second), outputs, (12, 12, 5), strict=True):
            assert [t for o in got for t in o.new_token_ids] == [prompt[i % len(prompt)] for i in range(length)]
        labels = {"model_name": MODEL, "adapter": "base", "status": "rejected"}
        before = REGISTRY.get_sample_value("loraplex_adapter_requests_total", labels) or 0
        relay.inc("adapter_requests", (MODEL, "base", "rejected"))  # client 1's process records one
        for _ in range(200):  # and client 0's applies it again when the engine passes it on (one registry here)
            if REGISTRY.get_sample_value("loraplex_adapter_requests_total", labels) == before + 2:
                break
            asyncio.run(asyncio.sleep(0.01))
        assert REGISTRY.get_sample_value("loraplex_adapter_requests_total", labels) == before + 2
        clients[0].shutdown(timeout=10)
        engine.join(0.5)
        assert engine.is_alive() and clients[1].is_alive()  # still serving the other client
        clients[1].shutdown(timeout=10)
        engine.join(10)
        assert engine.exitcode == 0
    finally:
        for client in clients:
            client.shutdown(timeout=1)
        if engine.is_alive():
            engine.kill()
