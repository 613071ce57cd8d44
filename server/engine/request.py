"""A generation request, its sampling parameters, and what the engine streams back for it."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from server.engine.grammar import Grammar, GrammarError

_ids = itertools.count()
MAX_TOP_LOGPROBS = 20  # vLLM's default max_logprobs


class SamplingError(ValueError):
    """A sampling parameter is out of range; the message names the field."""


class PromptTooLongError(SamplingError):
    """The prompt leaves no room for generation within max_model_len."""


def check_prompt(token_ids: list[int], max_model_len: int, vocab_size: int) -> None:
    """Raise SamplingError (a 4xx) for an empty prompt, one too long to generate anything, or an id
    outside the vocabulary."""
    if not token_ids:
        raise SamplingError("prompt is empty")
    if len(token_ids) >= max_model_len:
        raise PromptTooLongError(f"prompt has {len(token_ids)} tokens; max_model_len is {max_model_len}")
    if any(t < 0 or t >= vocab_size for t in token_ids):
        raise SamplingError("prompt token id out of vocabulary range")


@dataclass
class SamplingParams:
    """Per-request decoding controls (OpenAI / TGI semantics)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # drop tokens whose probability is below min_p * the top probability; 0 = off
    repetition_penalty: float = 1.0  # CTRL-style, over prompt and output tokens; 1 = off
    presence_penalty: float = 0.0  # OpenAI: subtracted once from each token already in the output
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence of the token in the output
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    # vLLM's: keep a stop string found, and the text of the stop or EOS token that ended the request (both are
    # left out by default)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    # EOS (unless ignore_eos) and stop_token_ids are masked, and stop strings not looked for, until this many are out
    min_tokens: int = 0
    allowed_token_ids: list[int] | None = None  # only these tokens may be sampled; None = all
    logprobs: bool = False  # report the chosen tokens' logprobs
    top_logprobs: int = 0  # also report this many most likely alternatives per token (needs logprobs)
    cache_salt: str | None = None  # prefix-cache blocks are shared only under the same salt
    grammar: Grammar | None = None  # structured output: every sampled token must keep the grammar satisfiable
    prompt_logprobs: int | None = None  # each prompt token's logprob (+ this many alternatives); None = off

    def validate(self) -> None:
        """Raise SamplingError naming the first bad field."""
        if self.max_tokens < 1:
            raise SamplingError("max_tokens must be >= 1")
        if not 0.0 <= self.temperature <= 100.0:
            raise SamplingError("temperature must be in [0, 100]")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise SamplingError("top_k must be >= 0")
        if not 0.0 <= self.min_p <= 1.0:
            raise SamplingError("min_p must be in [0, 1]")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise SamplingError("repetition_penalty must be in (0, 10]")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise SamplingError("presence_penalty must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise SamplingError("frequency_penalty must be in [-2, 2]")
        if any(not isinstance(token, int) for token in self.logit_bias):
            raise SamplingError("logit_bias keys must be token ids")
        if any(not -100.0 <= bias <= 100.0 for bias in self.logit_bias.values()):
            raise SamplingError("logit_bias values must be in [-100, 100]")
        if len(self.stop) > 16 or any(not s for s in self.stop):
            raise SamplingError("stop must hold at most 16 non-empty strings")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise SamplingError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise SamplingError("allowed_token_ids must not be empty")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise SamplingError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        if self.top_logprobs and not self.logprobs:
            raise SamplingError("top_logprobs needs logprobs")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS:
            raise SamplingError(f"prompt_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.prompt_logprobs}")
        if self.grammar is not None:
            try:
                self.grammar.validate()
            except GrammarError as err:
                raise SamplingError(f"the {self.grammar.kind} grammar does not compile: {err}") from None

    def validate_token_ids(self, vocab_size: int) -> None:
        """Raise SamplingError if a token id named by the params is outside [0, vocab_size)."""
        for name, ids in (("logit_bias", self.logit_bias), ("allowed_token_ids", self.allowed_token_ids or ()),
                          ("stop_token_ids", self.stop_token_ids)):
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise SamplingError(f"{name} token id {bad[0]} is outside the vocabulary [0, {vocab_size})")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


class RequestStatus(enum.Enum):
    """Lifecycle of a request inside the engine."""

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    """Why a request stopped (OpenAI names, plus abort and error)."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


@dataclass
class AdapterRef:
    """The adapter version a request was admitted with; weights stay alive while it runs."""

    name: str
    version: int
    weights: Any  # server.model.lora.AdapterWeights


@dataclass
class RequestOutput:
    """One streamed increment for a request: new tokens and text, and a final record when done."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[float] | None
    finished: bool
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    new_top_logprobs: list[list[tuple[int, float]]] | None = None  # per new token: (id, logprob), best first
    # With params.prompt_logprobs, in the first output: per prompt position None (the first) or
    # (logprob of that prompt token, its rank (1 = likeliest), alternatives (id, logprob), best first).
    prompt_logprobs: list[tuple[float, int, list[tuple[int, float]]] | None] | None = None
    ends_on_stop_token: bool = False  # with finished: the last new token is the stop or EOS token that ended it


@dataclass(eq=False)
class Request:
    """A sequence inside the engine: prompt, generated tokens, adapter and KV blocks.

    Compared and hashed by identity (``eq=False``): the scheduler's ``in`` / ``remove`` must never
    compare two requests field by field, down to their adapters' tensors.
    """

    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: AdapterRef | None = None
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    # The last output token is a placeholder (-1): sampled on the device by a step whose tokens the host
    # has not read yet, while the next step runs ahead on it (server.engine.overlap).
    token_pending: bool = False
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # prefix-cache hash of each full block
    hash_space: bytes = b""  # the namespace block_hashes were computed in
    num_registered_blocks: int = 0  # leading blocks offered to the prefix cache
    num_prefix_hit_tokens: int = 0  # prompt tokens whose KV came from the prefix cache at admission
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    prefill_target: int = 0  # tokens to prefill before sampling (prompt, plus outputs after preemption)
    slot: int = -1  # GPU adapter slot while running (unmerged mode); -1 = base only
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_emitted_tokens: int = 0
    detokenizer: Any = None  # server.engine.detokenizer.IncrementalDetokenizer, made at the first token
    sampling_seed: int | None = None  # params.seed, or a random seed drawn at the first sampled token
    penalty_row: int = -1  # the request's row of the sampler's token-count table; -1 = none
    grammar_matcher: Any = None  # llguidance matcher of params.grammar, made at the first sampled token
    prompt_logprobs: list = field(default_factory=list)  # filled chunk by chunk during the first prefill
    tenant: str = ""  # who sent it (the API key's tenant): fair scheduling and per-tenant caps
    ends_on_stop_token: bool = False  # its last output token is the stop or EOS token that ended it

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def text(self) -> str:
        """The detokenized output so far (cut before a stop string)."""
        return "" if self.detokenizer is None else self.detokenizer.text

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.prefill_target

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def adapter_key(self) -> tuple[str, int] | None:
        return None if self.adapter is None else (self.adapter.name, self.adapter.version)

    def is_stop_token(self, token: int, eos_token_ids: frozenset[int] | set[int]) -> bool:
        """Whether `token` ends the request as a stop token (or EOS, unless ignore_eos)."""
        return token in self.params.stop_token_ids or (not self.params.ignore_eos and token in eos_token_ids)

    def finish_reason_after(self, token: int, eos_token_ids: frozenset[int] | set[int], max_model_len: int):
        """Why the request ends with `token` (just appended), or None: a stop or EOS token, a grammar that
        admits nothing longer, max_tokens or the model's length."""
        if self.is_stop_token(token, eos_token_ids):
            return FinishReason.STOP
        if self.grammar_matcher is not None and self.grammar_matcher.is_stopped():
            return FinishReason.STOP
        if self.reaches_length(max_model_len):
            return FinishReason.LENGTH
        return None

    def reaches_length(self, max_model_len: int, extra_tokens: int = 0) -> bool:
        """Whether `extra_tokens` more output tokens bring it to max_tokens or to the model's length."""
        return (len(self.output_token_ids) + extra_tokens >= self.params.max_tokens
                or self.num_tokens + extra_tokens >= max_model_len)

    def output(self, new_text: str, finished: bool, error: str | None = None) -> RequestOutput:
        """What the caller has not seen yet: tokens (and logprobs) since the last output, `new_text`."""
        start = self.num_emitted_tokens
        self.num_emitted_tokens = len(self.output_token_ids)
        is_first = start == 0 and self.params.prompt_logprobs is not None
        return RequestOutput(
            request_id=self.request_id,
            new_token_ids=self.output_token_ids[start:],
            new_text=new_text,
            new_logprobs=self.output_logprobs[start:] if self.params.logprobs else None,
            new_top_logprobs=self.output_top_logprobs[start:] if self.params.top_logprobs else None,
            finished=finished,
            finish_reason=self.finish_reason if finished else None,
            prompt_tokens=len(self.prompt_token_ids),
            completion_tokens=len(self.output_token_ids),
            error=error,
            prompt_logprobs=list(self.prompt_logprobs) if is_first else None,
            ends_on_stop_token=finished and self.ends_on_stop_token,
        )
