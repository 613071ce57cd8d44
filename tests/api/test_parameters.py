"""Every request parameter is honoured or refused, never silently ignored.

The walk: for /v1/completions, /v1/chat/completions and TGI's /generate, the request model's fields
plus the names the OpenAI API reference, vLLM's OpenAI server and TGI document must each be covered
below, either by a check that proves the parameter's effect (`honoured`), by a 400 that names it
(`REFUSED`), or, for the few whose contract asks for no behaviour, by an accepted request with the
reason written down (`INFORMATIONAL`). A new field without a case fails `test_every_parameter_is_covered`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import httpx
import pytest
import torch

from server.api.schemas import ChatCompletionRequest, CompletionRequest, GenerateParameters
from tests.api.helpers import BASE_ID, api_settings, assert_error, live_server, upload

# The names each API documents (OpenAI API reference; vLLM's protocol.py; TGI's GenerateParameters).
OPENAI_COMPLETIONS = {
    "model", "prompt", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n",
    "presence_penalty", "seed", "stop", "stream", "stream_options", "suffix", "temperature", "top_p", "user",
}
OPENAI_CHAT = {
    "messages", "model", "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
    "max_completion_tokens", "max_tokens", "metadata", "modalities", "n", "parallel_tool_calls", "prediction",
    "presence_penalty", "prompt_cache_key", "reasoning_effort", "response_format", "safety_identifier", "seed",
    "service_tier", "stop", "store", "stream", "stream_options", "temperature", "tool_choice", "tools",
    "top_logprobs", "top_p", "user", "verbosity", "web_search_options",
}
VLLM_SAMPLING = {
    "use_beam_search", "top_k", "min_p", "repetition_penalty", "length_penalty", "stop_token_ids",
    "include_stop_str_in_output", "ignore_eos", "min_tokens", "skip_special_tokens",
    "spaces_between_special_tokens", "truncate_prompt_tokens", "allowed_token_ids", "prompt_logprobs",
    "bad_words", "logits_processors", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
    "guided_grammar", "guided_decoding_backend", "guided_whitespace_pattern", "priority", "request_id",
    "return_tokens_as_token_ids", "return_token_ids", "cache_salt", "kv_transfer_params", "vllm_xargs",
    "response_format", "best_of",
}
VLLM_COMPLETIONS = VLLM_SAMPLING | {"add_special_tokens", "prompt_embeds", "echo"}
VLLM_CHAT = VLLM_SAMPLING | {
    "echo", "add_generation_prompt", "continue_final_message", "add_special_tokens", "documents", "chat_template",
    "chat_template_kwargs", "mm_processor_kwargs", "include_reasoning",
}
TGI = {
    "adapter_id", "best_of", "decoder_input_details", "details", "do_sample", "frequency_penalty", "grammar",
    "max_new_tokens", "repetition_penalty", "return_full_text", "seed", "stop", "temperature", "top_k",
    "top_n_tokens", "top_p", "truncate", "typical_p", "watermark", "adapter_source", "adapter_parameters",
}
KNOWN = {
    "completions": (CompletionRequest, OPENAI_COMPLETIONS | VLLM_COMPLETIONS),
    "chat": (ChatCompletionRequest, OPENAI_CHAT | VLLM_CHAT),
    "generate": (GenerateParameters, TGI),
}

# Refused: (endpoint, name, a value that asks for something) -> 400 naming the parameter.
# "both": a field of the shared OpenAI base, refused on both endpoints.
_TOOL = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
REFUSED = [
    ("both", "best_of", 2), ("both", "service_tier", "flex"), ("both", "store", True),
    ("both", "metadata", {"k": "v"}), ("both", "use_beam_search", True), ("both", "length_penalty", 0.5),
    ("both", "skip_special_tokens", False),
    ("both", "spaces_between_special_tokens", False), ("both", "prompt_logprobs", 50),
    ("both", "bad_words", ["x"]), ("both", "logits_processors", ["m.f"]),
    ("both", "response_format", {"type": "json_schema"}), ("both", "guided_json", "{not json"),
    ("both", "guided_regex", "(a"), ("both", "guided_choice", []), ("both", "guided_grammar", "start: ("),
    ("both", "guided_decoding_backend", "xgrammar"), ("both", "guided_whitespace_pattern", " "),
    ("both", "structured_outputs", {"regex": "a", "choice": ["b"]}), ("both", "priority", 1),
    ("both", "request_id", "mine"),
    ("both", "return_token_ids", True), ("both", "kv_transfer_params", {"a": 1}), ("both", "vllm_xargs", {"a": 1}),
    ("both", "prompt_embeds", "AAAA"),
    ("completions", "suffix", "tail"),
    ("chat", "tools", [{"type": "retrieval"}]), ("chat", "tool_choice", "sometimes"), ("chat", "functions", _TOOL),
    ("chat", "function_call", {"name": "f"}), ("chat", "audio", {"voice": "alloy"}), ("chat", "modalities", ["audio"]),
    ("chat", "prediction", {"type": "content", "content": "x"}), ("chat", "reasoning_effort", "high"),
    ("chat", "verbosity", "low"), ("chat", "web_search_options", {}), ("chat", "chat_template", "{{ 1 }}"),
    ("chat", "documents", [{"text": "d"}]), ("chat", "mm_processor_kwargs", {"a": 1}), ("chat", "echo", True),
    ("generate", "best_of", 2),
    ("generate", "grammar", {"type": "regex", "value": "(unclosed"}),
    ("generate", "typical_p", 0.5), ("generate", "watermark", True), ("generate", "adapter_source", "s3"),
    ("generate", "adapter_parameters", {"adapter_ids": ["a", "b"]}),
]
# Accepted with no effect, because the parameter's contract asks for none here.
INFORMATIONAL = {
    ("both", "user"): "an end-user id for the provider's abuse monitoring; affects no output",
    ("chat", "include_reasoning"): "governs a reasoning parser's output; there is none",
    ("chat", "prompt_cache_key"): "a cache-routing hint; affects no output",
    ("chat", "safety_identifier"): "like user: an id for abuse monitoring",
}
INFORMATIONAL_VALUES = {"user": "u-1",
                        "include_reasoning": False, "prompt_cache_key": "k", "safety_identifier": "s"}

HONOURED: dict[tuple[str, str], Callable] = {}


def honoured(endpoint: str, *names: str):
    """Register a test that proves the effect of `names` on `endpoint` ("both": the shared base)."""
    def register(fn):
        for name in names:
            HONOURED[(endpoint, name)] = fn
        return fn
    return register


def _covered(endpoint: str) -> set[str]:
    keys = {*HONOURED, *INFORMATIONAL, *((e, n) for e, n, _ in REFUSED)}
    shared = {"completions", "chat"}
    return {n for e, n in keys if e == endpoint or (e == "both" and endpoint in shared)}


@pytest.mark.parametrize("endpoint", sorted(KNOWN))
def test_every_parameter_is_covered(endpoint):
    model, known = KNOWN[endpoint]
    fields = set(model.model_fields)
    assert known <= fields, f"{endpoint}: documented parameters without a field (silently ignored): {known - fields}"
    missing = fields - _covered(endpoint)
    assert not missing, f"{endpoint}: fields with no honoured/refused case: {sorted(missing)}"


# ---- a server whose tokenizer adds a BOS and whose chat template checks roles --------------------------

TEMPLATE = (
    "{% for t in tools or [] %}<tool>{{ t['function']['name'] }}</tool>{% endfor %}"
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant', 'critic', 'tool'] %}"
    "{{ raise_exception('role ' + m['role'] + ' is not supported') }}{% endif %}"
    "<{{ m['role'] }}>{{ m['content'] }}"
    "{{ ('<call>' + (m['tool_calls'][0]['function']['arguments'] | tojson) + '</call>') if m['tool_calls'] else '' }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% if greeting is defined %}{{ greeting }}{% endif %}{% endif %}"
)


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tiny_adapters, tmp_path_factory):
    from tokenizers.processors import TemplateProcessing

    with live_server(api_settings(tiny_llama_dir, tmp_path_factory.mktemp("store"))) as live:
        tokenizer = live.state.prompts.tokenizer
        tokenizer.chat_template = TEMPLATE
        bos = tokenizer.eos_token_id
        tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
            single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)])
        with live.client() as client:
            upload(client, "adapted", tiny_adapters["attn-r4"])
        yield live


@pytest.fixture(scope="module")
def api(server):
    with server.client(timeout=60) as client:
        yield Api(client, server.state.prompts.tokenizer)


class Api:
    """Requests with greedy defaults, and their outputs read back as token ids where it matters."""

    def __init__(self, client: httpx.Client, tokenizer):
        self.client, self.tokenizer = client, tokenizer
        self.eos = tokenizer.eos_token_id

    def complete(self, status: int = 200, **body) -> dict:
        payload = {"model": BASE_ID, "prompt": "Hello world", "max_tokens": 8, "temperature": 0, **body}
        response = self.client.post("/v1/completions", json=payload)
        assert response.status_code == status, response.text
        return response.json()

    def chat(self, status: int = 200, **body) -> dict:
        payload = {"model": BASE_ID, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8,
                   "temperature": 0, **body}
        response = self.client.post("/v1/chat/completions", json=payload)
        assert response.status_code == status, response.text
        return response.json()

    def generate(self, route: str = "/generate", **parameters) -> dict:
        response = self.client.post(route, json={"inputs": "Hello world",
                                                 "parameters": {"max_new_tokens": 8, **parameters}})
        assert response.status_code == 200, response.text
        return response.json()

    def token_ids(self, **body) -> list[int]:
        """The completion's token ids (through logprobs with return_tokens_as_token_ids)."""
        result = self.complete(logprobs=0, return_tokens_as_token_ids=True, **body)
        return [int(t.removeprefix("token_id:")) for t in result["choices"][0]["logprobs"]["tokens"]]

    def text(self, **body) -> str:
        return self.complete(**body)["choices"][0]["text"]

    def stream(self, path: str, **body) -> list[dict]:
        defaults = {"model": BASE_ID, "max_tokens": 6, "temperature": 0, "stream": True}
        if path == "/v1/completions":
            defaults["prompt"] = "Hello world"
        else:
            defaults["messages"] = [{"role": "user", "content": "Hello"}]
        with self.client.stream("POST", path, json={**defaults, **body}) as response:
            assert response.status_code == 200
            lines = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        return [json.loads(line) for line in lines[:-1]]


def _endpoints(endpoint: str) -> list[str]:
    return ["completions", "chat"] if endpoint == "both" else [endpoint]


@pytest.mark.parametrize("endpoint,name,value",
                         [(e, n, v) for ep, n, v in REFUSED for e in _endpoints(ep)], ids=lambda x: str(x)[:30])
def test_refused_parameters_are_400_naming_them(api, endpoint, name, value):
    if endpoint == "completions":
        response = api.client.post("/v1/completions", json={"model": BASE_ID, "prompt": "Hi", name: value})
    elif endpoint == "chat":
        response = api.client.post("/v1/chat/completions", json={
            "model": BASE_ID, "messages": [{"role": "user", "content": "Hi"}], name: value})
    else:
        response = api.client.post("/generate", json={"inputs": "Hi", "parameters": {name: value}})
    error = assert_error(response, 400, name)
    assert error["param"] == name or name in (error["param"] or ""), error


@pytest.mark.parametrize("endpoint,name", sorted(INFORMATIONAL))
def test_informational_parameters_are_accepted(api, endpoint, name):
    body = {name: INFORMATIONAL_VALUES[name]}
    plain = api.chat()["choices"][0] if endpoint == "chat" else api.complete()["choices"][0]
    given = api.chat(**body)["choices"][0] if endpoint == "chat" else api.complete(**body)["choices"][0]
    assert given == plain


# ---- honoured: the effect of each parameter --------------------------------------------------------------

@honoured("both", "model")
def _model(api):
    assert api.text(model="adapted") != api.text()
    assert_error(api.client.post("/v1/completions", json={"model": "nope", "prompt": "x"}), 404, "nope")


@honoured("completions", "prompt")
def _prompt(api):
    ids = api.tokenizer.encode("Hello world")
    assert api.complete(prompt=ids)["choices"][0]["text"] == api.text()
    assert api.complete(prompt=[ids[:3]])["usage"]["prompt_tokens"] == 3


@honoured("completions", "max_tokens")
def _max_tokens(api):
    assert api.complete(max_tokens=5, ignore_eos=True)["usage"]["completion_tokens"] == 5


@honoured("chat", "max_tokens", "max_completion_tokens")
def _chat_max_tokens(api):
    assert api.chat(max_tokens=3, ignore_eos=True)["usage"]["completion_tokens"] == 3
    assert api.chat(max_tokens=None, max_completion_tokens=4, ignore_eos=True)["usage"]["completion_tokens"] == 4


@honoured("both", "temperature", "seed")
def _temperature_and_seed(api):
    greedy = api.token_ids(max_tokens=16, ignore_eos=True)
    drawn = {tuple(api.token_ids(max_tokens=16, ignore_eos=True, temperature=2.0, seed=s)) for s in range(3)}
    assert len(drawn) == 3 and tuple(greedy) not in drawn
    again = api.token_ids(max_tokens=16, ignore_eos=True, temperature=2.0, seed=1)
    assert tuple(again) in drawn


@honoured("both", "top_p", "top_k", "min_p")
def _truncation_to_the_top_token(api):
    greedy = api.token_ids(max_tokens=12, ignore_eos=True)
    for narrow in ({"top_p": 1e-6}, {"top_k": 1}, {"min_p": 1.0}):
        assert api.token_ids(max_tokens=12, ignore_eos=True, temperature=2.0, seed=3, **narrow) == greedy, narrow


@honoured("both", "presence_penalty", "frequency_penalty", "repetition_penalty")
def _penalties(api):
    plain = api.token_ids(max_tokens=40, ignore_eos=True)
    assert len(set(plain)) < len(plain), "the greedy output should repeat tokens"
    for penalty in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}, {"repetition_penalty": 3.0}):
        penalized = api.token_ids(max_tokens=40, ignore_eos=True, **penalty)
        assert penalized != plain, penalty
        assert len(set(penalized)) > len(set(plain)), penalty


@honoured("both", "n")
def _n(api):
    drawn = api.complete(n=3, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True)
    texts = [c["text"] for c in drawn["choices"]]
    assert [c["index"] for c in drawn["choices"]] == [0, 1, 2] and len(set(texts)) > 1
    assert drawn["usage"]["completion_tokens"] == 24
    assert drawn["usage"]["prompt_tokens"] == api.complete()["usage"]["prompt_tokens"]  # counted once
    assert texts[0] == api.text(temperature=1.0, seed=5, max_tokens=8, ignore_eos=True)  # sample 0: the seed
    again = api.complete(n=3, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True)
    assert [c["text"] for c in again["choices"]] == texts
    greedy = api.chat(n=2)["choices"]
    assert [c["index"] for c in greedy] == [0, 1] and greedy[0]["message"] == greedy[1]["message"]
    streamed: dict[int, str] = {}
    for chunk in api.stream("/v1/completions", n=2, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True):
        for choice in chunk["choices"]:
            streamed[choice["index"]] = streamed.get(choice["index"], "") + choice["text"]
    assert streamed == {0: texts[0], 1: texts[1]}
    roles = [c["choices"][0]["index"] for c in api.stream("/v1/chat/completions", n=2)
             if c["choices"] and c["choices"][0]["delta"].get("role")]
    assert sorted(roles) == [0, 1]


@honoured("both", "response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
          "guided_decoding_backend", "structured_outputs")
def _structured_output(api):
    sampled = {"temperature": 1.0, "max_tokens": 40}
    for seed in range(4):
        text = api.text(guided_choice=["yes", "no"], seed=seed, **sampled)
        assert text in ("yes", "no"), text
        assert re.fullmatch(r"[0-9]{3}-[a-c]+", api.text(guided_regex=r"[0-9]{3}-[a-c]+", seed=seed, **sampled))
        assert api.text(guided_grammar='start: "ab" | "cd" "!"', seed=seed, **sampled) in ("ab", "cd!")
        assert api.text(structured_outputs={"choice": ["x", "y"]}, guided_decoding_backend="llguidance",
                        seed=seed, **sampled) in ("x", "y")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "maximum": 9,
              "minimum": 0}}, "required": ["ok", "n"], "additionalProperties": False}
    for body in ({"guided_json": schema}, {"response_format": {"type": "json_schema", "json_schema": {
                 "name": "s", "schema": schema}}}, {"structured_outputs": {"json": schema}}):
        choice = api.complete(seed=1, **sampled, **body)["choices"][0]
        value = json.loads(choice["text"])
        assert choice["finish_reason"] == "stop" and set(value) == {"ok", "n"} and isinstance(value["ok"], bool)
    # Any object is allowed: a bias towards "}" lets the random model close it (without the grammar the
    # bias alone would not make the text start with "{").
    close = api.tokenizer.encode("}", add_special_tokens=False)[-1]
    message = api.chat(response_format={"type": "json_object"}, seed=2, temperature=1.0, max_tokens=60,
                       logit_bias={str(close): 8.0})
    assert isinstance(json.loads(message["choices"][0]["message"]["content"]), dict)
    both = api.client.post("/v1/completions", json={"model": BASE_ID, "prompt": "x", "guided_regex": "a",
                                                    "guided_choice": ["b"]})
    assert_error(both, 400, "only one structured output")


@honoured("generate", "grammar")
def _tgi_grammar(api):
    text = api.generate(grammar={"type": "regex", "value": "[a-c]{4}"}, do_sample=True, seed=3)["generated_text"]
    assert re.fullmatch("[a-c]{4}", text)


@honoured("both", "logit_bias")
def _logit_bias(api):
    assert set(api.token_ids(logit_bias={"42": 100}, ignore_eos=True)) == {42}


@honoured("both", "stop")
def _stop(api):
    text = api.text(max_tokens=16, ignore_eos=True)
    stop = text[4:6]
    stopped = api.complete(max_tokens=16, ignore_eos=True, stop=[stop])["choices"][0]
    assert stopped["text"] == text[: text.index(stop)] and stopped["finish_reason"] == "stop"


@honoured("both", "ignore_eos")
def _ignore_eos(api):
    forced = {"logit_bias": {str(api.eos): 100}, "max_tokens": 5}
    assert api.complete(**forced)["usage"]["completion_tokens"] == 1
    assert api.complete(ignore_eos=True, **forced)["usage"]["completion_tokens"] == 5


@honoured("both", "stop_token_ids")
def _stop_token_ids(api):
    result = api.complete(logit_bias={"42": 100}, stop_token_ids=[42], ignore_eos=True, max_tokens=6)
    assert result["usage"]["completion_tokens"] == 1 and result["choices"][0]["finish_reason"] == "stop"
    assert result["choices"][0]["text"] == ""  # the stop token's text is left out, as in vLLM


@honoured("both", "include_stop_str_in_output")
def _include_stop_str_in_output(api):
    text = api.text(max_tokens=16, ignore_eos=True)
    stop = text[4:6]
    kept = api.complete(max_tokens=16, ignore_eos=True, stop=[stop], include_stop_str_in_output=True)["choices"][0]
    assert kept["text"] == text[: text.index(stop) + len(stop)] and kept["finish_reason"] == "stop"
    forced = {"logit_bias": {"42": 100}, "stop_token_ids": [42], "ignore_eos": True, "max_tokens": 6}
    token_text = api.tokenizer.decode([42])
    assert token_text and api.text(include_stop_str_in_output=True, **forced) == token_text


@honoured("both", "min_tokens")
def _min_tokens(api):
    forced = {"logit_bias": {str(api.eos): 100}, "max_tokens": 10}
    result = api.complete(min_tokens=4, **forced)
    assert result["usage"]["completion_tokens"] == 5 and result["choices"][0]["finish_reason"] == "stop"
    ids = api.token_ids(min_tokens=3, logit_bias={"42": 100}, stop_token_ids=[42], max_tokens=10)
    assert len(ids) == 4 and 42 not in ids[:3] and ids[3] == 42
    free = api.text(max_tokens=16, ignore_eos=True)
    stopped = api.complete(max_tokens=16, ignore_eos=True, stop=[free[:1]])  # the first character's token ends it...
    early = stopped["usage"]["completion_tokens"]
    assert stopped["choices"][0]["text"] == "" and early < 14
    held = api.complete(max_tokens=16, ignore_eos=True, stop=[free[:1]], min_tokens=early + 2)  # ...not before these
    assert held["usage"]["completion_tokens"] > early + 2 and held["choices"][0]["text"].startswith(free[:1])
    assert_error(api.client.post("/v1/completions", json={"model": BASE_ID, "prompt": "x", "max_tokens": 2,
                                                          "min_tokens": 3}), 400, "min_tokens")


@honoured("both", "allowed_token_ids")
def _allowed_token_ids(api):
    ids = api.token_ids(allowed_token_ids=[40, 41, 42], temperature=1.5, seed=2, max_tokens=12, ignore_eos=True)
    assert set(ids) <= {40, 41, 42}
    assert_error(api.client.post("/v1/completions", json={"model": BASE_ID, "prompt": "x",
                                                          "allowed_token_ids": [10**6]}), 400, "allowed_token_ids")


@honoured("completions", "logprobs")
def _completion_logprobs(api):
    # As token ids: several byte-level tokens decode alike (a partial character is "\ufffd").
    logprobs = api.complete(logprobs=3, max_tokens=4, return_tokens_as_token_ids=True)["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == 4
    for token, value, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"],
                                 strict=True):
        assert 3 <= len(top) <= 4 and top[token] == value  # the 3 likeliest, plus the chosen one
        assert max(top.values()) == pytest.approx(value)  # greedy: the chosen token is the likeliest


@honoured("chat", "logprobs", "top_logprobs")
def _chat_logprobs(api):
    content = api.chat(logprobs=True, top_logprobs=4, max_tokens=3)["choices"][0]["logprobs"]["content"]
    assert len(content) == 3
    for entry in content:
        values = [alt["logprob"] for alt in entry["top_logprobs"]]
        assert len(values) == 4 and values == sorted(values, reverse=True)
        assert entry["top_logprobs"][0]["token"] == entry["token"]  # greedy
    assert api.chat(logprobs=True, max_tokens=2)["choices"][0]["logprobs"]["content"][0]["top_logprobs"] == []
    assert_error(api.client.post("/v1/chat/completions", json={
        "model": BASE_ID, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}), 400, "top_logprobs")


@honoured("both", "return_tokens_as_token_ids")
def _token_ids_as_text(api):
    tokens = api.complete(logprobs=1, max_tokens=3, return_tokens_as_token_ids=True)["choices"][0]["logprobs"]
    assert all(t.startswith("token_id:") for t in tokens["tokens"])


@honoured("completions", "echo")
def _echo(api):
    assert api.text(echo=True) == "Hello world" + api.text()
    ids = api.tokenizer.encode("Hello world", add_special_tokens=False)
    assert api.complete(prompt=ids, echo=True)["choices"][0]["text"].startswith("Hello world")
    chunks = api.stream("/v1/completions", echo=True)
    assert chunks[0]["choices"][0]["text"] == "Hello world"
    with_logprobs = api.complete(echo=True, logprobs=1, max_tokens=3)["choices"][0]["logprobs"]
    offsets = with_logprobs["text_offset"]
    assert offsets == sorted(offsets) and with_logprobs["token_logprobs"][0] is None  # prompt tokens first


@honoured("both", "truncate_prompt_tokens")
def _truncate_prompt_tokens(api):
    assert api.complete(prompt="Hello world, hello there", truncate_prompt_tokens=3)["usage"]["prompt_tokens"] == 3
    assert api.chat(truncate_prompt_tokens=2)["usage"]["prompt_tokens"] == 2


@honoured("completions", "add_special_tokens")
def _completion_special_tokens(api):
    with_bos = api.complete()["usage"]["prompt_tokens"]
    assert api.complete(add_special_tokens=False)["usage"]["prompt_tokens"] == with_bos - 1


@honoured("chat", "add_special_tokens")
def _chat_special_tokens(api):
    plain = api.chat()["usage"]["prompt_tokens"]  # the template's text only (vLLM's chat default)
    assert api.chat(add_special_tokens=True)["usage"]["prompt_tokens"] == plain + 1


@honoured("chat", "messages")
def _messages_and_roles(api):
    user = api.chat()["usage"]["prompt_tokens"]
    critic = api.chat(messages=[{"role": "critic", "content": "Hello"}])["usage"]["prompt_tokens"]
    assert critic != user  # a custom role the template accepts reaches the prompt
    response = api.client.post("/v1/chat/completions", json={
        "model": BASE_ID, "messages": [{"role": "narrator", "content": "Hello"}]})
    assert_error(response, 400, "role narrator is not supported")  # the template's own error


@honoured("chat", "add_generation_prompt", "continue_final_message")
def _generation_prompt(api):
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    closed = api.chat(messages=turns, add_generation_prompt=False)["usage"]["prompt_tokens"]
    opened = api.chat(messages=turns)["usage"]["prompt_tokens"]
    continued = api.chat(messages=turns, add_generation_prompt=False, continue_final_message=True)
    assert opened > closed > continued["usage"]["prompt_tokens"]  # "<assistant>" added; the last "\n" cut
    assert_error(api.client.post("/v1/chat/completions", json={
        "model": BASE_ID, "messages": turns, "continue_final_message": True}), 400, "continue_final_message")


@honoured("chat", "chat_template_kwargs")
def _chat_template_kwargs(api):
    plain = api.chat()["usage"]["prompt_tokens"]
    assert api.chat(chat_template_kwargs={"greeting": "Hello there"})["usage"]["prompt_tokens"] > plain
    response = api.client.post("/v1/chat/completions", json={
        "model": BASE_ID, "messages": [{"role": "user", "content": "x"}],
        "chat_template_kwargs": {"tokenize": True}})
    assert_error(response, 400, "tokenize")


@honoured("chat", "modalities", "response_format")
def _neutral_values(api):
    for neutral in ({"tool_choice": "none"}, {"modalities": ["text"]}, {"response_format": {"type": "text"}}):
        assert api.chat(**neutral)["choices"][0] == api.chat()["choices"][0], neutral


_WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
    "additionalProperties": False}}}
_TIME = {"type": "function", "function": {"name": "time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}


@honoured("chat", "tools", "tool_choice", "parallel_tool_calls")
def _tool_calling(api):
    tools = [_WEATHER, _TIME]
    offered = api.chat(tools=tools)["usage"]["prompt_tokens"]
    assert offered > api.chat()["usage"]["prompt_tokens"]  # the template renders the tools
    assert api.chat(tools=tools, tool_choice="none")["choices"][0] == api.chat()["choices"][0]
    named = api.chat(tools=tools, tool_choice={"type": "function", "function": {"name": "weather"}},
                     temperature=1.0, seed=1, max_tokens=30)["choices"][0]
    (call,) = named["message"]["tool_calls"]
    assert call["function"]["name"] == "weather" and call["id"].startswith("chatcmpl-tool-")
    assert json.loads(call["function"]["arguments"])["city"] in ("Paris", "Rome")
    assert named["finish_reason"] == "stop" and named["message"]["content"] is None
    for parallel, seed in ((None, 2), (False, 3)):
        required = api.chat(tools=tools, tool_choice="required", temperature=1.0, seed=seed, max_tokens=60,
                            parallel_tool_calls=parallel)["choices"][0]
        calls = required["message"]["tool_calls"]
        assert required["finish_reason"] == "tool_calls" and calls and (parallel is None or len(calls) == 1)
        assert all(c["function"]["name"] in ("weather", "time") for c in calls)
    streamed = api.stream("/v1/chat/completions", tools=tools, tool_choice="required", temperature=1.0, seed=2,
                          max_tokens=60)
    (last,) = [c for c in streamed if c["choices"] and c["choices"][0]["finish_reason"]]
    assert last["choices"][0]["finish_reason"] == "tool_calls"
    streamed_calls = last["choices"][0]["delta"]["tool_calls"]
    assert streamed_calls and [c["index"] for c in streamed_calls] == list(range(len(streamed_calls)))
    history = [{"role": "user", "content": "Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}]
    assert api.chat(messages=history, tools=tools)["usage"]["prompt_tokens"] > offered
    assert_error(api.client.post("/v1/chat/completions", json={
        "model": BASE_ID, "messages": [{"role": "user", "content": "x"}], "tools": tools,
        "tool_choice": {"type": "function", "function": {"name": "nope"}}}), 400, "nope")


@honoured("both", "prompt_logprobs")
def _prompt_logprobs(api):
    ids = api.tokenizer.encode("Hello world")
    choice = api.complete(prompt=ids, prompt_logprobs=2, max_tokens=2)["choices"][0]
    entries = choice["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(ids)
    for token, entry in zip(ids[1:], entries[1:], strict=True):
        own = entry[str(token)]
        assert own["logprob"] <= 0 and own["rank"] >= 1 and own["decoded_token"] == api.tokenizer.decode([token])
        ranked = sorted((e for key, e in entry.items() if key != str(token) or e["rank"] <= 2), key=lambda e: e["rank"])
        assert [e["rank"] for e in ranked][:2] == [1, 2] and ranked[0]["logprob"] >= ranked[1]["logprob"]
    echoed = api.complete(prompt=ids, echo=True, logprobs=1, max_tokens=3)["choices"][0]["logprobs"]
    assert len(echoed["tokens"]) == len(ids) + 3 and echoed["token_logprobs"][0] is None
    assert echoed["token_logprobs"][1:len(ids)] == pytest.approx(
        [e[str(t)]["logprob"] for t, e in zip(ids[1:], entries[1:], strict=True)], abs=1e-5)
    chat = api.chat(prompt_logprobs=0)
    assert len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"] and chat["prompt_logprobs"][0] is None


def test_prompt_logprobs_match_transformers(api, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    ids = api.tokenizer.encode("The quick brown fox jumps")
    entries = api.complete(prompt=ids, prompt_logprobs=3, max_tokens=1)["choices"][0]["prompt_logprobs"]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, torch_dtype=torch.float32)
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    for position in range(1, len(ids)):
        row = reference[position - 1]
        own = entries[position][str(ids[position])]
        assert own["logprob"] == pytest.approx(row[ids[position]].item(), abs=1e-4)
        assert own["rank"] == int((row > row[ids[position]]).sum()) + 1
        top = row.topk(3)
        for _rank, (value, token) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True), 1):
            assert entries[position][str(token)]["logprob"] == pytest.approx(value, abs=1e-4)


def test_auto_tool_calls_are_parsed_from_the_text():
    from server.api.tools import parse_tool_calls

    hermes = 'Let me check.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    content, calls = parse_tool_calls(hermes, "auto")
    assert content == "Let me check." and calls[0]["function"] == {"name": "weather", "arguments": '{"city": "Rome"}'}
    content, calls = parse_tool_calls('{"name": "time", "parameters": {"zone": "UTC"}}', "auto")
    assert content is None and calls[0]["function"]["name"] == "time"
    assert parse_tool_calls("Just text {not json", "auto") == ("Just text {not json", [])
    assert parse_tool_calls("<tool_call>{broken</tool_call>", "auto") == ("<tool_call>{broken</tool_call>", [])


@honoured("both", "stream", "stream_options")
def _stream_and_usage(api):
    for path in ("/v1/completions", "/v1/chat/completions"):
        plain = api.stream(path)
        assert all("usage" not in c for c in plain)
        with_usage = api.stream(path, stream_options={"include_usage": True})
        assert with_usage[-1]["choices"] == [] and with_usage[-1]["usage"]["completion_tokens"] == 6
        assert all(c["usage"] is None for c in with_usage[:-1])
        continuous = api.stream(path, stream_options={"include_usage": True, "continuous_usage_stats": True})
        counts = [c["usage"]["completion_tokens"] for c in continuous]
        assert counts == sorted(counts) and counts[-1] == 6 and all(c["usage"] for c in continuous)
        response = api.client.post(path, json={"model": BASE_ID, "prompt": "x", "max_tokens": 2,
                                               "messages": [{"role": "user", "content": "x"}],
                                               "stream_options": {"include_usage": True}})
        assert_error(response, 400, "stream_options")


# ---- TGI -----------------------------------------------------------------------------------------------

@honoured("generate", "adapter_id")
def _adapter_id(api):
    assert api.generate(adapter_id="adapted")["generated_text"] != api.generate()["generated_text"]


@honoured("generate", "max_new_tokens", "details", "top_n_tokens")
def _tgi_details(api):
    details = api.generate(max_new_tokens=4, details=True, top_n_tokens=3)["details"]
    assert details["generated_tokens"] == 4 and len(details["tokens"]) == 4
    assert [len(top) for top in details["top_tokens"]] == [3] * 4
    assert all(top[0]["id"] == token["id"] for top, token in zip(details["top_tokens"], details["tokens"],
                                                                   strict=True))


@honoured("generate", "decoder_input_details")
def _tgi_prefill(api):
    prefill = api.generate(max_new_tokens=2, details=True, decoder_input_details=True)["details"]["prefill"]
    assert [token["id"] for token in prefill] == api.tokenizer.encode("Hello world")
    assert prefill[0]["logprob"] is None and all(token["logprob"] <= 0 for token in prefill[1:])
    assert api.generate(max_new_tokens=2, details=True)["details"]["prefill"] == []


@honoured("generate", "do_sample", "temperature", "seed", "top_k", "top_p")
def _tgi_sampling(api):
    greedy = api.generate(max_new_tokens=12)["generated_text"]
    drawn = api.generate(max_new_tokens=12, do_sample=True, temperature=2.0, seed=4)["generated_text"]
    assert drawn != greedy and api.generate(max_new_tokens=12, do_sample=True, temperature=2.0,
                                            seed=4)["generated_text"] == drawn
    for narrow in ({"top_k": 1}, {"top_p": 1e-6}):
        assert api.generate(max_new_tokens=12, do_sample=True, temperature=2.0, seed=4, **narrow)[
            "generated_text"] == greedy
    # details report the seed a sampled request used, drawn where none was given: it gives the same text again
    unseeded = api.generate(max_new_tokens=12, do_sample=True, temperature=2.0, details=True)
    seed = unseeded["details"]["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**64
    assert api.generate(max_new_tokens=12, do_sample=True, temperature=2.0, seed=seed)["generated_text"] == \
        unseeded["generated_text"]
    assert api.generate(max_new_tokens=4, details=True)["details"]["seed"] is None  # greedy draws none


@honoured("generate", "repetition_penalty", "frequency_penalty")
def _tgi_penalties(api):
    plain = api.generate(max_new_tokens=30)["generated_text"]
    for penalty in ({"repetition_penalty": 3.0}, {"frequency_penalty": 2.0}):
        assert api.generate(max_new_tokens=30, **penalty)["generated_text"] != plain, penalty


@honoured("generate", "stop", "return_full_text", "truncate")
def _tgi_text(api):
    text = api.generate(max_new_tokens=16)["generated_text"]
    stop = text[4:6]  # TGI keeps the stop sequence in generated_text
    assert api.generate(max_new_tokens=16, stop=[stop])["generated_text"] == text[: text.index(stop) + len(stop)]
    assert api.generate(max_new_tokens=16, return_full_text=True)["generated_text"] == "Hello world" + text
    assert api.generate(max_new_tokens=16, truncate=1)["generated_text"] != text


@honoured("both", "cache_salt")
def _cache_salt(api):
    """Cached prompt blocks are reused only under the same salt (the hit counter moves only then)."""
    from server import metrics

    def hits():
        return sum(s.value for f in metrics.REGISTRY.collect() if f.name == "vllm:prefix_cache_hits"
                   for s in f.samples if s.name.endswith("_total"))

    prompt = "Hello world! " * 12
    api.complete(prompt=prompt, max_tokens=1, cache_salt="tenant-a")
    before = hits()
    api.complete(prompt=prompt, max_tokens=1, cache_salt="tenant-b")
    assert hits() == before  # another salt: nothing shared
    api.complete(prompt=prompt, max_tokens=1, cache_salt="tenant-a")
    assert hits() > before


# Parametrized here, below every @honoured registration.
@pytest.mark.parametrize("key", sorted(HONOURED), ids=lambda k: f"{k[0]}-{k[1]}")
def test_honoured_parameters_have_their_effect(api, key):
    HONOURED[key](api)


def test_several_prompts_and_n_share_the_prompt_blocks(api):
    prompts = ["Hello world", "Good morning to you"]
    both = api.complete(prompt=prompts, n=2)
    assert [c["index"] for c in both["choices"]] == [0, 1, 2, 3]
    singles = [api.complete(prompt=p) for p in prompts]
    assert [c["text"] for c in both["choices"]] == [s["choices"][0]["text"] for s in singles for _ in range(2)]
    assert both["usage"]["prompt_tokens"] == sum(s["usage"]["prompt_tokens"] for s in singles)
    echoed = api.complete(prompt=prompts, echo=True, max_tokens=2)["choices"]
    assert [c["text"][: len(p)] for c, p in zip(echoed, prompts, strict=True)] == prompts

    def hits() -> float:
        text = api.client.get("/metrics").text
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("vllm:prefix_cache_hits_total"))

    long_prompt = " ".join(f"word{i}" for i in range(12)) + " (shared, n=4)"
    before = hits()
    api.complete(prompt=long_prompt, n=4, max_tokens=2)
    prompt_tokens = len(api.tokenizer.encode(long_prompt))
    # The three siblings start after the first one's prefill: each finds the prompt's full blocks cached.
    assert hits() - before >= 3 * (prompt_tokens // 16) * 16 > 0
    assert_error(api.client.post("/v1/completions", json={"model": BASE_ID, "prompt": ["a"] * 3, "n": 50}),
                 400, "150 choices")


def test_tgi_root_route_serves_huggingface_hub(server, api):
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=server.url)
    expected = api.generate(max_new_tokens=6)["generated_text"]
    assert client.text_generation("Hello world", max_new_tokens=6) == expected
    details = client.text_generation("Hello world", max_new_tokens=6, details=True)
    assert details.generated_text == expected and details.details.generated_tokens == 6
    streamed = "".join(client.text_generation("Hello world", max_new_tokens=6, stream=True))
    assert streamed == expected


# ---- limits: the numbers are in the message ----------------------------------------------------------

def test_max_tokens_past_the_context_is_400_with_the_numbers(api):
    prompt_tokens = api.complete()["usage"]["prompt_tokens"]
    response = api.client.post("/v1/completions", json={"model": BASE_ID, "prompt": "Hello world", "max_tokens": 300})
    error = assert_error(response, 400, "256", str(prompt_tokens), "300", str(prompt_tokens + 300))
    assert error["param"] == "max_tokens"
    response = api.client.post("/v1/chat/completions", json={
        "model": BASE_ID, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 1000})
    assert assert_error(response, 400, "256", "1000")["param"] == "max_completion_tokens"
    response = api.client.post("/generate", json={"inputs": "Hello world", "parameters": {"max_new_tokens": 500}})
    assert assert_error(response, 400, "256", "500")["param"] == "max_new_tokens"
    assert api.complete(max_tokens=256 - prompt_tokens, temperature=0)["usage"]["prompt_tokens"] == prompt_tokens


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1])
def test_out_of_range_seeds_are_400(api, seed):
    for path, body in (("/v1/completions", {"prompt": "x"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
        error = assert_error(api.client.post(path, json={"model": BASE_ID, "seed": seed, **body}), 400, "seed")
        assert error["param"] == "seed"
    assert api.complete(seed=2**63 - 1, temperature=1.0)["choices"]
    assert api.complete(seed=-(2**63), temperature=1.0)["choices"]
    response = api.client.post("/generate", json={"inputs": "x", "parameters": {"seed": -1}})
    assert assert_error(response, 400, "seed")["param"] == "parameters.seed"

