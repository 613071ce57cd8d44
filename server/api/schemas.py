"""Request and response bodies: OpenAI completions/chat, TGI generate, adapter management.

Unknown fields are ignored (as vLLM does). Every parameter of the OpenAI completions and chat APIs
and of vLLM's extensions is a field here: honoured, or (a `_refused` field) accepted only at its
neutral value and otherwise refused with a 400 naming it, never silently dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from server.engine.request import MAX_TOP_LOGPROBS

SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # a signed 64-bit integer, as vLLM and OpenAI
TGI_SEED_MAX = 2**64 - 1  # TGI's seed is an unsigned 64-bit integer
MAX_TOKEN_ID_LIST = 100_000


def _unsupported(accept: Callable[[Any], bool], message: str) -> AfterValidator:
    """Validator for a known field this server cannot honour: a value `accept` refuses is a 400 whose
    message (formatted with the value) names the problem."""

    def check(value: Any) -> Any:
        if not accept(value):
            raise ValueError(message.format(value=value))
        return value

    return AfterValidator(check)


def _is_neutral(value: Any, neutral: tuple) -> bool:
    return any(value is n or (type(value) is type(n) and value == n) for n in neutral)


def _refused(name: str, reason: str, *neutral: Any) -> Any:
    """A known parameter this server does not honour: None or one of the `neutral` values (which ask
    for nothing) is accepted; any other value is a 400 naming it."""
    message = f"{name} is not supported: {reason}"
    return Annotated[Any, _unsupported(lambda v: v is None or _is_neutral(v, neutral), message),
                     Field(None, description=f"not supported ({reason}); only {neutral or 'null'} accepted")]


_ONLY_BEST_OF_ONE = _unsupported(lambda v: v in (None, 1), "only best_of=1 is supported, got {value}")
_NO_TOOLS = "tool calling is not supported"
_TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=MAX_TOKEN_ID_LIST)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = Field(False, description="usage (so far) in every chunk")


class JsonSchemaFormat(_Body):
    name: str | None = Field(None, max_length=256)
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema", description="the JSON schema")
    strict: bool | None = Field(None, description="no effect: the schema is always enforced")


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Body):
    """vLLM's structured_outputs: exactly one of json, regex, choice, grammar, json_object."""

    json_: dict[str, Any] | str | None = Field(None, alias="json", description="a JSON schema")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1, max_length=1024)
    grammar: str | None = Field(None, description="a Lark grammar (llguidance)")
    json_object: bool | None = None
    whitespace_pattern: _refused("structured_outputs.whitespace_pattern", "not supported")
    structural_tag: _refused("structured_outputs.structural_tag", "not supported")


class _OpenAISampling(_Body):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str = Field(min_length=1, max_length=256, description="base model id or adapter name")
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy; default 1")
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=128, description="completions per prompt (their KV blocks of the prompt shared)")
    stream: bool = False
    stream_options: StreamOptions | None = Field(None, description="only with stream: true")
    stop: str | list[str] | None = Field(None, description="up to 16 stop strings")
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[int, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, description="token id -> bias added to its logit")
    user: str | None = Field(None, description="end-user id for abuse tracking; recorded nowhere, no effect")
    service_tier: _refused("service_tier", "there is one tier", "auto", "default")
    store: _refused("store", "this server stores no completions", False)
    metadata: _refused("metadata", "this server stores no completions", {})
    # vLLM extensions
    top_k: int | None = Field(None, ge=-1, description="0 or -1 = off")
    min_p: float | None = Field(None, ge=0, le=1, description="0 = off")
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, max_length=64)
    min_tokens: int = Field(0, ge=0, description="EOS and stop_token_ids are masked, and stop strings not looked "
                            "for, until this many tokens are out")
    allowed_token_ids: _TokenIds | None = Field(None, description="only these token ids may be generated")
    truncate_prompt_tokens: int | None = Field(None, ge=1, description="keep only the last N prompt tokens")
    return_tokens_as_token_ids: bool = Field(False, description="logprob tokens as 'token_id:<id>'")
    cache_salt: str | None = Field(None, min_length=1, max_length=256,
                                   description="cached prompt blocks are shared only under the same salt")
    best_of: Annotated[int | None, _ONLY_BEST_OF_ONE] = Field(None, description="only 1 is supported")
    use_beam_search: _refused("use_beam_search", "no beam search", False)
    length_penalty: _refused("length_penalty", "it applies to beam search only", 1, 1.0)
    include_stop_str_in_output: bool = Field(
        False, description="keep a stop string found and the text of the stop token that ended the output")
    skip_special_tokens: _refused("skip_special_tokens", "special tokens are always skipped", True)
    spaces_between_special_tokens: _refused("spaces_between_special_tokens", "special tokens are skipped", True)
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                        description="each prompt token's logprob and the N likeliest alternatives")
    bad_words: _refused("bad_words", "not implemented", [])
    logits_processors: _refused("logits_processors", "no custom logits processors", [])
    response_format: ResponseFormat | None = Field(None, description="text, json_object or json_schema")
    guided_json: dict[str, Any] | str | None = Field(None, description="a JSON schema the output follows")
    guided_regex: str | None = Field(None, description="a regular expression the output matches")
    guided_choice: list[str] | None = Field(None, min_length=1, max_length=1024, description="one of these")
    guided_grammar: str | None = Field(None, description="a Lark grammar the output follows (llguidance)")
    guided_decoding_backend: Annotated[
        str | None, _unsupported(lambda v: v in (None, "auto", "guidance", "llguidance"),
                                 "guided_decoding_backend {value!r} is not available; this server uses llguidance")
    ] = Field(None, description="auto, guidance or llguidance (the only backend)")
    guided_whitespace_pattern: _refused("guided_whitespace_pattern", "not supported")
    structured_outputs: StructuredOutputs | None = Field(None, description="vLLM's structured outputs")
    priority: _refused("priority", "requests are served first come, first served", 0)
    request_id: _refused("request_id", "the server names requests (X-Request-Id)")
    return_token_ids: _refused("return_token_ids", "not implemented", False)
    kv_transfer_params: _refused("kv_transfer_params", "no disaggregated prefill")
    vllm_xargs: _refused("vllm_xargs", "no custom extensions", {})
    prompt_embeds: _refused("prompt_embeds", "prompts are text or token ids")

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.continuous_usage_stats)


class CompletionRequest(_OpenAISampling):
    """POST /v1/completions."""

    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        description="a prompt (text or token ids) or a list of prompts; choice i * n + j is sample j of prompt i"
    )
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                 description="logprob of each chosen token and of the N likeliest alternatives")
    echo: bool = Field(False, description="prepend the prompt to the completion (with logprobs: the prompt's too)")
    suffix: Annotated[str | None, _unsupported(lambda v: not v, "suffix is not supported")] = Field(
        None, description="not supported")
    add_special_tokens: bool = Field(True, description="add the tokenizer's special tokens (BOS) to the prompt")

    @property
    def prompt_list(self) -> list[str | list[int]]:
        """The request's prompts: one string or token-id list, or each of a list of them."""
        prompt = self.prompt
        return prompt if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) else [prompt]


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str = Field(min_length=1, max_length=64, description="any role the model's chat template accepts")
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = Field(None, description="an assistant's earlier tool calls")


class ChatCompletionRequest(_OpenAISampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="deprecated alias of max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                     description="the N likeliest alternatives of each token (with logprobs)")
    tools: list[dict[str, Any]] | None = Field(None, max_length=128, description="functions the model may call")
    tool_choice: Annotated[
        str | dict[str, Any] | None,
        _unsupported(lambda v: v in (None, "none", "auto", "required") or (
            isinstance(v, dict) and v.get("type") == "function" and isinstance(v.get("function"), dict)),
            "tool_choice must be none, auto, required or {{type: function, function: {{name}}}}, got {value!r}"),
    ] = Field(None, description="none, auto (default with tools), required, or a named function")
    functions: _refused("functions", _NO_TOOLS, [])
    function_call: _refused("function_call", _NO_TOOLS, "none", "auto")
    parallel_tool_calls: bool | None = Field(None, description="false: at most one tool call")
    add_generation_prompt: bool = True
    continue_final_message: bool = Field(False, description="continue the last (assistant) message")
    add_special_tokens: bool = Field(False, description="add special tokens on top of the template's")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="extra variables for the template")
    include_reasoning: bool = Field(True, description="no effect: no reasoning parser")
    prompt_cache_key: str | None = Field(None, max_length=1024, description="a routing hint; no effect")
    safety_identifier: str | None = Field(None, max_length=1024, description="like user: no effect")
    modalities: Annotated[
        list[str] | None, _unsupported(lambda v: v in (None, ["text"]), "modalities: only ['text'] is supported")
    ] = None
    audio: _refused("audio", "text only")
    prediction: _refused("prediction", "no predicted outputs")
    reasoning_effort: _refused("reasoning_effort", "not a reasoning model server")
    verbosity: _refused("verbosity", "not implemented")
    web_search_options: _refused("web_search_options", "no web search")
    chat_template: _refused("chat_template", "the model's own template is used")
    documents: _refused("documents", "not implemented", [])
    mm_processor_kwargs: _refused("mm_processor_kwargs", "text only", {})
    echo: _refused("echo", "chat echo is not supported", False)


class TgiGrammar(_Body):
    type: Literal["json", "regex", "json_object"]
    value: dict[str, Any] | str | None = None


class GenerateParameters(_Body):
    """TGI / LoRAX `parameters`."""

    adapter_id: str | None = Field(None, max_length=256, description="adapter name; none = base model")
    max_new_tokens: int | None = Field(None, ge=1, description="default 20")
    temperature: float | None = Field(None, gt=0, le=100)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    do_sample: bool = False
    seed: int | None = Field(None, ge=0, le=TGI_SEED_MAX)
    stop: list[str] = Field(default_factory=list, max_length=16)
    details: bool = False
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    return_full_text: bool = False
    truncate: int | None = Field(None, ge=1, description="keep only the last N prompt tokens")
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    top_n_tokens: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                     description="details: the N likeliest alternatives of each token")
    decoder_input_details: bool = Field(
        False, description="details.prefill: each prompt token's id, text and logprob (the first's null)")
    grammar: TgiGrammar | None = Field(None, description="TGI: {type: json | regex, value}")
    adapter_source: _refused("adapter_source", "adapters come from this server's store", "hub", "local")
    adapter_parameters: _refused("adapter_parameters", "no adapter merging per request")
    best_of: Annotated[int | None, _ONLY_BEST_OF_ONE] = Field(None, description="only 1 is supported")
    typical_p: Annotated[float | None, _unsupported(lambda v: v in (None, 1.0), "typical_p is not supported")] = Field(
        None, description="not supported")
    watermark: Annotated[bool, _unsupported(lambda v: not v, "watermark is not supported")] = Field(
        False, description="not supported")


class GenerateRequest(_Body):
    """POST /generate and /generate_stream."""

    inputs: str = Field(min_length=1)
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)


class CompatGenerateRequest(GenerateRequest):
    """POST / (TGI's root route, used by huggingface_hub's InferenceClient.text_generation)."""

    stream: bool = False


class AdapterOut(BaseModel):
    """A stored adapter version."""

    name: str
    version: int
    sha256: str
    rank: int
    alpha: float
    target_modules: list[str]
    size_bytes: int
    created: int


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterOut]


class LoadLoraRequest(_Body):
    """vLLM's POST /v1/load_lora_adapter."""

    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoraRequest(_Body):
    """vLLM's POST /v1/unload_lora_adapter."""

    lora_name: str = Field(min_length=1, max_length=256)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    """The body of every 4xx and 5xx."""

    error: ErrorDetail
