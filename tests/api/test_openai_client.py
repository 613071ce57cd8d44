"""The official openai client against a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import openai
import pytest

from tests.api.helpers import BASE_ID, upload


@pytest.fixture(scope="module")
def oai(open_server, tiny_adapters) -> openai.OpenAI:
    with open_server.client() as client:
        upload(client, "attn", tiny_adapters["attn-r4"])
    return openai.OpenAI(base_url=f"{open_server.url}/v1", api_key="unused", timeout=30, max_retries=0)


def test_models_lists_base_and_adapters(oai):
    models = {m.id: m for m in oai.models.list().data}
    assert models[BASE_ID].model_extra["parent"] is None
    assert models["attn"].model_extra["parent"] == BASE_ID
    assert models["attn"].model_extra["root"] == "attn"
    assert models[BASE_ID].model_extra["max_model_len"] == 256


def test_completion_greedy_is_deterministic_and_adapter_changes_output(oai):
    base = oai.completions.create(model=BASE_ID, prompt="Hello world", max_tokens=10, temperature=0)
    again = oai.completions.create(model=BASE_ID, prompt="Hello world", max_tokens=10, temperature=0)
    adapted = oai.completions.create(model="attn", prompt="Hello world", max_tokens=10, temperature=0)
    assert base.object == "text_completion" and base.model == BASE_ID
    assert base.choices[0].text == again.choices[0].text
    assert base.usage.completion_tokens == 10 and base.choices[0].finish_reason == "length"
    assert base.usage.total_tokens == base.usage.prompt_tokens + 10
    assert adapted.choices[0].text != base.choices[0].text


def test_completion_seed_reproduces_sampling(oai):
    texts = [oai.completions.create(model="attn", prompt="Hello", max_tokens=12, temperature=1.0, seed=7)
             .choices[0].text for _ in range(2)]
    assert texts[0] == texts[1]


def test_completion_logprobs(oai):
    result = oai.completions.create(model=BASE_ID, prompt="Hello", max_tokens=5, temperature=0, logprobs=1)
    logprobs = result.choices[0].logprobs
    assert len(logprobs.token_logprobs) == 5 and all(v <= 0 for v in logprobs.token_logprobs)
    assert len(logprobs.tokens) == 5 and len(logprobs.top_logprobs) == 5


def test_completion_stream_with_usage(oai):
    full = oai.completions.create(model="attn", prompt="Hello world", max_tokens=16, temperature=0)
    chunks = list(oai.completions.create(model="attn", prompt="Hello world", max_tokens=16, temperature=0,
                                         stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert all(c.usage is None for c in chunks[:-1])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_completion_and_stream(oai):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    full = oai.chat.completions.create(model="attn", messages=messages, max_tokens=12, temperature=0)
    assert full.object == "chat.completion"
    assert full.choices[0].message.role == "assistant"
    assert full.usage.completion_tokens == 12
    stream = oai.chat.completions.create(model="attn", messages=messages, max_completion_tokens=12,
                                         temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_chat_logprobs(oai):
    result = oai.chat.completions.create(model=BASE_ID, messages=[{"role": "user", "content": "Hi"}],
                                         max_tokens=4, temperature=0, logprobs=True, top_logprobs=1)
    content = result.choices[0].logprobs.content
    assert len(content) == 4 and all(item.logprob <= 0 for item in content)
    assert content[0].top_logprobs[0].token == content[0].token


def test_stop_string_ends_generation(oai):
    free = oai.completions.create(model=BASE_ID, prompt="Hello world", max_tokens=16, temperature=0)
    text = free.choices[0].text
    stop = text[3:5]
    assert stop.strip(), "the random model should produce some visible text"
    stopped = oai.completions.create(model=BASE_ID, prompt="Hello world", max_tokens=16, temperature=0,
                                     stop=stop)
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.index(stop)]


def test_logit_bias_penalties_and_min_p_reach_the_sampler(oai):
    result = oai.completions.create(model=BASE_ID, prompt="Hello", max_tokens=4, temperature=1.0, seed=1,
                                    logit_bias={"72": 100}, presence_penalty=0.5, frequency_penalty=0.5,
                                    logprobs=1, extra_body={"min_p": 0.1})
    assert len(set(result.choices[0].logprobs.tokens)) == 1  # the +100 bias wins every step
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        oai.completions.create(model=BASE_ID, prompt="Hi", max_tokens=2, logit_bias={"1000000": 1})


def test_unknown_model_is_404_in_openai_shape(oai):
    with pytest.raises(openai.NotFoundError) as info:
        oai.completions.create(model="no-such-adapter", prompt="Hi", max_tokens=2)
    error = info.value.body
    assert error["type"] == "NotFoundError" and error["code"] == 404
    assert "no-such-adapter" in error["message"]
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="no-such-adapter", messages=[{"role": "user", "content": "x"}])


@pytest.mark.parametrize("kwargs, field", [
    ({"n": 200}, "n"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"extra_body": {"use_beam_search": True}}, "use_beam_search"),
    ({"seed": 2**63}, "seed"),
])
def test_bad_parameters_are_400_naming_the_field(oai, kwargs, field):
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model=BASE_ID, prompt="Hi", **{"max_tokens": 2, **kwargs})
    assert info.value.body["param"] == field
    assert field in info.value.body["message"]


def test_chat_tool_call_and_refused_image_parts(oai):
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"enum": [1, 2]}}, "required": ["x"], "additionalProperties": False}}}
    reply = oai.chat.completions.create(model=BASE_ID, messages=[{"role": "user", "content": "x"}], tools=[tool],
                                        tool_choice={"type": "function", "function": {"name": "f"}}, max_tokens=20)
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "f" and call.function.arguments in ('{"x": 1}', '{"x": 2}', '{"x":1}', '{"x":2}')
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        oai.chat.completions.create(model=BASE_ID, messages=[{"role": "user", "content": "x"}], tools=[tool],
                                    tool_choice={"type": "function", "function": {"name": "g"}})
    with pytest.raises(openai.BadRequestError, match="image_url"):
        oai.chat.completions.create(model=BASE_ID, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])


def test_n_and_structured_output_through_the_client(oai):
    """n > 1 and the structured-output parameters, with the engine in a thread and in its own process
    (the grammar travels to the engine process with the sampling parameters)."""
    drawn = oai.completions.create(model="attn", prompt="Hello", max_tokens=6, temperature=1.0, seed=3, n=3)
    assert [c.index for c in drawn.choices] == [0, 1, 2] and drawn.usage.completion_tokens == 18
    chosen = oai.completions.create(model=BASE_ID, prompt="Answer:", max_tokens=10, temperature=1.0, seed=4,
                                    extra_body={"guided_choice": ["red", "green", "blue"]})
    assert chosen.choices[0].text in ("red", "green", "blue") and chosen.choices[0].finish_reason == "stop"
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    chat = oai.chat.completions.create(
        model="attn", messages=[{"role": "user", "content": "Reply in JSON"}], max_tokens=20, temperature=1.0,
        seed=5, response_format={"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}})
    import json

    assert json.loads(chat.choices[0].message.content).keys() == {"ok"}
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model=BASE_ID, prompt="x", max_tokens=2, extra_body={"guided_regex": "(unclosed"})
    assert "guided_regex" in str(info.value)


def test_prompt_logprobs_and_echo_logprobs_through_the_client(oai):
    result = oai.completions.create(model="attn", prompt="Hello world", max_tokens=2, temperature=0,
                                    extra_body={"prompt_logprobs": 1})
    entries = result.choices[0].model_extra["prompt_logprobs"]
    assert entries[0] is None and len(entries) == result.usage.prompt_tokens
    echoed = oai.completions.create(model="attn", prompt="Hello world", max_tokens=2, temperature=0, echo=True,
                                    logprobs=0)
    assert echoed.choices[0].text.startswith("Hello world")
    assert len(echoed.choices[0].logprobs.tokens) == result.usage.prompt_tokens + 2
