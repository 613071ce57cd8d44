"""The engine process boundary without a model: message codec, metric deltas, and the client against
a fake engine process (tests/unit/fake_engine_core.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client.metrics import MetricWrapperBase
from transformers import AutoTokenizer

from server import metrics
from server.config import Settings
from server.engine.async_engine import EngineDeadError
from server.engine.client import EngineProcessClient, EngineStartError
from server.engine.metric_sink import DeltaSink, PrometheusSink
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
                         observations=[("inter_token_latency_seconds", ["m"], [0.01, 0.02])],
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
    assert delta.observations == [("inter_token_latency_seconds", ["m"], [0.1, 0.2])]
    assert delta.gauges == [("lora_requests_info", ["m", "8", "a", ""], 3.0)]
    assert delta.removals == [("lora_requests_info", ["m", "8", "b", ""])]
    assert sink.drain() is None


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
    process = client._process
    client.shutdown(timeout=10)
    assert process.exitcode == 0 and not client.is_alive()


def _exit_at_once(*args) -> None:
    raise SystemExit(4)


def test_a_process_that_exits_while_loading_fails_start(tokenizer):
    engine = EngineProcessClient(Settings(), tokenizer, MODEL, Path("."), target=_exit_at_once)
    with pytest.raises(EngineStartError, match="exited with code 4 while loading"):
        engine.start()
