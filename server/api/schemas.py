"""Request and response bodies: OpenAI completions/chat, TGI generate, adapter management.

Unknown fields are ignored (as vLLM does); known fields this server cannot honour are rejected with
a 400 naming the field, never silently dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


def _unsupported(accept: Callable[[Any], bool], message: str) -> AfterValidator:
    """Validator for a known field this server cannot honour: a value `accept` refuses is a 400 whose
    message (formatted with the value) names the problem."""

    def check(value: Any) -> Any:
        if not accept(value):
            raise ValueError(message.format(value=value))
        return value

    return AfterValidator(check)


_ONLY_BEST_OF_ONE = _unsupported(lambda v: v in (None, 1), "only best_of=1 is supported, got {value}")
_NO_TOOLS = "tool calling is not supported"


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _OpenAISampling(_Body):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str = Field(min_length=1, max_length=256, description="base model id or adapter name")
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy; default 1")
    top_p: float | None = Field(None, gt=0, le=1)
    n: Annotated[int, _unsupported(lambda v: v == 1, "only n=1 is supported, got {value}")] = Field(
        1, description="only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description="up to 16 stop strings")
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[int, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, description="token id -> bias added to its logit")
    user: str | None = Field(None, description="ignored")
    # vLLM extensions
    top_k: int | None = Field(None, ge=-1, description="0 or -1 = off")
    min_p: float | None = Field(None, ge=0, le=1, description="0 = off")
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = Field(None, max_length=64)

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_OpenAISampling):
    """POST /v1/completions."""

    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        description="one prompt: a string or a list of token ids (a one-element list of either works)"
    )
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5, description="log-probability of each chosen token")
    echo: Annotated[bool, _unsupported(lambda v: not v, "echo=true is not supported")] = Field(
        False, description="not supported")
    suffix: Annotated[str | None, _unsupported(lambda v: not v, "suffix is not supported")] = Field(
        None, description="not supported")
    best_of: Annotated[int | None, _ONLY_BEST_OF_ONE] = Field(None, description="only 1 is supported")


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ResponseFormat(_Body):
    type: str = "text"


class ChatCompletionRequest(_OpenAISampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="deprecated alias of max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20, description="only the chosen token is returned")
    tools: Annotated[list[dict[str, Any]] | None, _unsupported(lambda v: not v, _NO_TOOLS)] = Field(
        None, description="not supported")
    tool_choice: Annotated[
        str | dict[str, Any] | None, _unsupported(lambda v: v in (None, "none", "auto"), _NO_TOOLS)
    ] = Field(None, description="only 'none' is supported")
    response_format: Annotated[
        ResponseFormat | None,
        _unsupported(lambda v: v is None or v.type == "text",
                     "response_format type {value.type!r} is not supported; only 'text'"),
    ] = Field(None, description="only type 'text' is supported")
    add_generation_prompt: bool = True


class GenerateParameters(_Body):
    """TGI / LoRAX `parameters`."""

    adapter_id: str | None = Field(None, max_length=256, description="adapter name; none = base model")
    max_new_tokens: int | None = Field(None, ge=1, description="default 20")
    temperature: float | None = Field(None, gt=0, le=100)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    do_sample: bool = False
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: list[str] = Field(default_factory=list, max_length=16)
    details: bool = False
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    return_full_text: bool = False
    truncate: int | None = Field(None, ge=1, description="keep only the last N prompt tokens")
    decoder_input_details: bool = Field(False, description="ignored")
    best_of: Annotated[int | None, _ONLY_BEST_OF_ONE] = Field(None, description="only 1 is supported")
    typical_p: Annotated[float | None, _unsupported(lambda v: v in (None, 1.0), "typical_p is not supported")] = Field(
        None, description="not supported")
    watermark: Annotated[bool, _unsupported(lambda v: not v, "watermark is not supported")] = Field(
        False, description="not supported")


class GenerateRequest(_Body):
    """POST /generate and /generate_stream."""

    inputs: str = Field(min_length=1)
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)


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
