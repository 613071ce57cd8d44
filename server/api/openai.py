"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions and /v1/models.

Streaming responses are OpenAI chunks (`data: {...}`) ending with `data: [DONE]`; with
`stream_options.include_usage` every chunk carries `"usage": null` and a last chunk with no choices
carries the usage; with `continuous_usage_stats` every chunk carries the usage so far instead.
Logprobs are those of the model's raw distribution: the chosen token's, and with `logprobs=k`
(completions) or `top_logprobs=k` (chat) the k likeliest tokens at each step.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.api.choices import Choices, check_count
from server.api.deps import Caller, GenerateCaller, StateDep
from server.api.errors import ERROR_RESPONSES, APIError
from server.api.generation import Generation, SSEResponse, resolve_model, stream_events
from server.api.prompts import reject_invalid_text
from server.api.schemas import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from server.api.state import ServerState
from server.api.structured import openai_grammar
from server.api.tools import check_tools, finish_reason, parse_tool_calls, tool_grammar, tools_offered
from server.engine.grammar import Grammar
from server.engine.request import RequestOutput, SamplingParams

router = APIRouter(prefix="/v1", tags=["openai"], responses=ERROR_RESPONSES)


def _sampling_params(body: CompletionRequest | ChatCompletionRequest, max_tokens: int, logprobs: bool,
                     top_logprobs: int, seed: int | None, grammar: Grammar | None,
                     prompt_logprobs: int | None, defaults: dict[str, float]) -> SamplingParams:
    """The request's sampling; where it leaves a value unset, the model's default (`defaults`, from its
    generation_config.json: server.api.generation_defaults) or else the OpenAI one."""

    def unset_or(value, name: str, fallback):
        return defaults.get(name, fallback) if value is None else value

    return SamplingParams(
        max_tokens=max_tokens,
        temperature=unset_or(body.temperature, "temperature", 1.0),
        top_p=unset_or(body.top_p, "top_p", 1.0),
        top_k=max(0, unset_or(body.top_k, "top_k", 0)),
        min_p=unset_or(body.min_p, "min_p", 0.0),
        repetition_penalty=unset_or(body.repetition_penalty, "repetition_penalty", 1.0),
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logit_bias=dict(body.logit_bias or {}),
        seed=seed,
        stop=body.stop_list,
        stop_token_ids=list(body.stop_token_ids or []),
        include_stop_str_in_output=body.include_stop_str_in_output,
        ignore_eos=body.ignore_eos,
        min_tokens=body.min_tokens,
        allowed_token_ids=None if body.allowed_token_ids is None else sorted(set(body.allowed_token_ids)),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        cache_salt=body.cache_salt,
        grammar=grammar,
        prompt_logprobs=prompt_logprobs,
    )


def _check_request(body: CompletionRequest | ChatCompletionRequest) -> None:
    """Cross-field rules of the OpenAI and vLLM servers (400 naming the field)."""
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options can only be set when stream is true", param="stream_options")


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish_reason(output: RequestOutput) -> str | None:
    return output.finish_reason.value if output.finished and output.finish_reason else None


class _TokenText:
    """How logprob entries name tokens: their text, or 'token_id:<id>' (return_tokens_as_token_ids)."""

    def __init__(self, tokenizer, as_ids: bool):
        self.tokenizer, self.as_ids = tokenizer, as_ids

    def __call__(self, token: int) -> str:
        return f"token_id:{token}" if self.as_ids else self.tokenizer.decode([token])


def _steps(outputs: list[RequestOutput]):
    """(token id, logprob, alternatives) of every new token of `outputs`."""
    for output in outputs:
        tops = output.new_top_logprobs or [[] for _ in output.new_token_ids]
        yield from zip(output.new_token_ids, output.new_logprobs or [], tops, strict=False)


class _CompletionLogprobs:
    """Accumulates the legacy completions `logprobs` object, chunk by chunk. Each `top_logprobs`
    entry maps the k likeliest tokens (and the chosen one, as vLLM does) to their logprobs."""

    def __init__(self, name: _TokenText, offset: int = 0):
        self.name, self.offset = name, offset

    def render_prompt(self, prompt_ids: list[int], entries: list) -> dict:
        """The echoed prompt's part: its tokens, None for the first, then each one's logprob."""
        tokens, values, offsets, tops = [], [], [], []
        for token, entry in zip(prompt_ids, entries, strict=True):
            text = self.name(token)
            tokens.append(text)
            offsets.append(self.offset)
            self.offset += len(text)
            if entry is None:
                values.append(None)
                tops.append(None)
            else:
                values.append(entry[0])
                tops.append({**{self.name(t): v for t, v in entry[2]}, text: entry[0]})
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def render(self, outputs: list[RequestOutput]) -> dict:
        tokens, values, offsets, tops = [], [], [], []
        for token, value, alternatives in _steps(outputs):
            text = self.name(token)
            tokens.append(text)
            values.append(value)
            offsets.append(self.offset)
            tops.append({**{self.name(t): v for t, v in alternatives}, text: value})
            self.offset += len(text)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def _merge_logprobs(first: dict, second: dict) -> dict:
    return {key: first[key] + second[key] for key in first}


def _vllm_prompt_logprobs(name: _TokenText, prompt_ids: list[int], entries: list | None) -> list | None:
    """vLLM's prompt_logprobs: per prompt position None (the first) or {token id: {logprob, rank,
    decoded_token}} for the prompt token and the k likeliest."""
    if entries is None:
        return None
    rendered = []
    for token, entry in zip(prompt_ids, entries, strict=True):
        if entry is None:
            rendered.append(None)
            continue
        value, rank, alternatives = entry
        position = {str(t): {"logprob": v, "rank": r, "decoded_token": name(t)}
                    for r, (t, v) in enumerate(alternatives, start=1)}
        position[str(token)] = {"logprob": value, "rank": rank, "decoded_token": name(token)}
        rendered.append(position)
    return rendered


def _chat_logprobs(name: _TokenText, outputs: list[RequestOutput]) -> dict:
    def entry(token: int, value: float) -> dict:
        text = name(token)
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    content = [{**entry(token, value), "top_logprobs": [entry(t, v) for t, v in alternatives]}
               for token, value, alternatives in _steps(outputs)]
    return {"content": content, "refusal": None}


async def _start(state: ServerState, caller, body, adapter, prompt_ids: list[int], max_tokens: int | None,
                 max_tokens_field: str, logprobs: bool, top_logprobs: int, request_id: str,
                 prompt_field: str, seed: int | None, grammar: Grammar | None,
                 prompt_logprobs: int | None = None) -> Generation:
    context = state.max_model_len
    if max_tokens is None:
        max_tokens = max(1, context - len(prompt_ids))
    elif len(prompt_ids) < context < len(prompt_ids) + max_tokens:  # a prompt too long alone: Generation says so
        raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                       f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the {prompt_field}, "
                       f"{max_tokens} in the completion). Please reduce the length of the {prompt_field} or "
                       f"{max_tokens_field}.", param=max_tokens_field)
    params = _sampling_params(body, max_tokens, logprobs, top_logprobs, seed, grammar, prompt_logprobs,
                              state.sampling_defaults)
    return await Generation.start(state, caller, prompt_ids, params, adapter, request_id, prompt_field)


def _truncated(prompt_ids: list[int], body: CompletionRequest | ChatCompletionRequest) -> list[int]:
    """The last truncate_prompt_tokens tokens of the prompt (vLLM truncates from the left)."""
    return prompt_ids[-body.truncate_prompt_tokens:] if body.truncate_prompt_tokens else prompt_ids


class _Usage:
    """The `usage` fields of streamed chunks: none, null until the end, or the running count (over every
    choice of the request)."""

    def __init__(self, body: CompletionRequest | ChatCompletionRequest, choices: Choices):
        self.body, self.choices = body, choices
        self._completion = [0] * len(choices.generations)

    def chunk(self, choice: int, completion_tokens: int) -> dict:
        self._completion[choice] = completion_tokens
        if self.body.continuous_usage:
            return {"usage": _usage(self.choices.prompt_tokens, sum(self._completion))}
        return {"usage": None} if self.body.include_usage else {}

    def final(self) -> dict | None:
        if not self.body.include_usage:
            return None
        return _usage(self.choices.prompt_tokens, self.choices.completion_tokens)


def _choice_request_id(request_id: str, choices: int, index: int) -> str:
    return request_id if choices == 1 else f"{request_id}-{index}"


@router.post("/completions", summary="Text completion (OpenAI)")
async def create_completion(body: CompletionRequest, state: StateDep, caller: GenerateCaller,
                            http_request: Request):
    reject_invalid_text(body)
    _check_request(body)
    tokenizer = state.engine.tokenizer
    adapter = await resolve_model(state, caller, body.model)
    texts = body.prompt_list
    check_count(len(texts), body.n)  # before tokenizing what would be refused
    encoded = await state.prompts.encode_completion_prompts(texts, body.add_special_tokens)
    prompts = [_truncated(ids, body) for ids in encoded]
    echoes = [""] * len(prompts)
    if body.echo:
        echoes = [text if isinstance(text, str) and len(ids) == len(full) else tokenizer.decode(ids)
                  for text, ids, full in zip(texts, prompts, encoded, strict=True)]
    request_id = f"cmpl-{uuid.uuid4().hex}"
    total = len(prompts) * body.n
    grammar = openai_grammar(body)
    echo_logprobs = body.echo and body.logprobs is not None  # the prompt's logprobs lead the logprobs object
    prompt_k = max(body.prompt_logprobs or 0, body.logprobs or 0) if echo_logprobs else body.prompt_logprobs

    def start(index: int, seed: int | None) -> Awaitable[Generation]:
        prompt = index // body.n
        field = "prompt" if len(prompts) == 1 else f"prompt[{prompt}]"
        return _start(state, caller, body, adapter, prompts[prompt], body.max_tokens, "max_tokens",
                      body.logprobs is not None, body.logprobs or 0, _choice_request_id(request_id, total, index),
                      field, seed, grammar, prompt_k)

    choices = await Choices.start(len(prompts), body.n, body.seed, start)
    names = _TokenText(tokenizer, body.return_tokens_as_token_ids)
    logprobs = [_CompletionLogprobs(names, offset=0 if echo_logprobs else len(echoes[i // body.n]))
                for i in range(total)]
    base = {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": body.model,
            "system_fingerprint": None}
    headers = {"X-Request-Id": request_id}

    def render(index: int, outputs: list[RequestOutput]) -> dict | None:
        if body.logprobs is None:
            return None
        if echo_logprobs and outputs and outputs[0].prompt_logprobs is not None:  # a choice's first output
            prompt = logprobs[index].render_prompt(prompts[index // body.n], outputs[0].prompt_logprobs)
            return _merge_logprobs(prompt, logprobs[index].render(outputs))
        return logprobs[index].render(outputs)

    def prompt_logprobs_of(index: int, outputs: list[RequestOutput]) -> dict:
        if body.prompt_logprobs is None or not outputs or outputs[0].prompt_logprobs is None:
            return {}
        return {"prompt_logprobs": _vllm_prompt_logprobs(names, prompts[index // body.n], outputs[0].prompt_logprobs)}

    async def chunks() -> AsyncIterator[dict]:
        usage = _Usage(body, choices)
        for index in range(total if body.echo else 0):
            choice = {"index": index, "text": echoes[index // body.n], "finish_reason": None, "logprobs": None}
            yield {**base, "choices": [choice], **usage.chunk(index, 0)}
        async for index, output in choices.outputs():
            choice = {"index": index, "text": output.new_text, "finish_reason": _finish_reason(output),
                      "logprobs": render(index, [output]), **prompt_logprobs_of(index, [output])}
            yield {**base, "choices": [choice], **usage.chunk(index, output.completion_tokens)}
        if (final := usage.final()) is not None:
            yield {**base, "choices": [], "usage": final}

    if body.stream:
        return SSEResponse(stream_events(choices, chunks(), done_marker=True), headers=headers)
    per_choice = await choices.collect(http_request)
    body_choices = [{"index": index, "text": echoes[index // body.n] + "".join(o.new_text for o in outputs),
                     "finish_reason": _finish_reason(outputs[-1]), "logprobs": render(index, outputs),
                     **prompt_logprobs_of(index, outputs)}
                    for index, outputs in enumerate(per_choice)]
    usage = _usage(choices.prompt_tokens, choices.completion_tokens)
    return JSONResponse({**base, "choices": body_choices, "usage": usage}, headers=headers)


@router.post("/chat/completions", summary="Chat completion (OpenAI)")
async def create_chat_completion(body: ChatCompletionRequest, state: StateDep, caller: GenerateCaller,
                                 http_request: Request):
    reject_invalid_text(body)
    _check_request(body)
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if body.continue_final_message and body.add_generation_prompt:
        raise APIError(400, "continue_final_message and add_generation_prompt cannot both be true "
                       "(set add_generation_prompt: false)", param="continue_final_message")
    check_tools(body.tools, body.tool_choice)
    tools = tools_offered(body.tools, body.tool_choice)
    tool_choice = None if tools is None else (body.tool_choice or "auto")
    tokenizer = state.engine.tokenizer
    adapter = await resolve_model(state, caller, body.model)
    prompt_ids = _truncated(await state.prompts.encode_chat(
        body.messages, body.add_generation_prompt, continue_final_message=body.continue_final_message,
        add_special_tokens=body.add_special_tokens, template_kwargs=body.chat_template_kwargs, tools=tools), body)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    max_tokens = body.max_completion_tokens or body.max_tokens
    max_tokens_field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    grammar = openai_grammar(body)
    if tool_choice is not None and (forced := tool_grammar(tools, tool_choice, body.parallel_tool_calls)):
        if grammar is not None:
            raise APIError(400, "a structured output constraint cannot be combined with tool_choice "
                           f"{tool_choice!r}", param="tool_choice")
        grammar = forced

    def start(index: int, seed: int | None) -> Awaitable[Generation]:
        return _start(state, caller, body, adapter, prompt_ids, max_tokens, max_tokens_field, body.logprobs,
                      body.top_logprobs or 0, _choice_request_id(request_id, body.n, index), "messages", seed,
                      grammar, body.prompt_logprobs)

    choices = await Choices.start(1, body.n, body.seed, start)
    names = _TokenText(tokenizer, body.return_tokens_as_token_ids)
    base = {"id": request_id, "created": int(time.time()), "model": body.model, "system_fingerprint": None}
    headers = {"X-Request-Id": request_id}

    def message(index: int, outputs: list[RequestOutput]) -> tuple[dict, str | None]:
        """The assistant message of one choice and its finish reason (tool calls parsed out)."""
        text = "".join(o.new_text for o in outputs)
        reason = _finish_reason(outputs[-1])
        if tool_choice is None:
            return {"role": "assistant", "content": text}, reason
        content, calls = parse_tool_calls(text, tool_choice)
        if body.parallel_tool_calls is False:
            calls = calls[:1]
        entry = {"role": "assistant", "content": content}
        if calls:
            entry["tool_calls"] = calls
        return entry, finish_reason(tool_choice, calls, reason)

    async def chunks() -> AsyncIterator[dict]:
        base_chunk = {**base, "object": "chat.completion.chunk"}
        usage = _Usage(body, choices)
        if tool_choice is not None:  # whether the text is a call is known at the end: one chunk a choice
            per_choice: list[list[RequestOutput]] = [[] for _ in range(body.n)]
            async for index, output in choices.outputs():
                per_choice[index].append(output)
            for index, outputs in enumerate(per_choice):
                entry, reason = message(index, outputs)
                if "tool_calls" in entry:
                    entry["tool_calls"] = [{"index": i, **call} for i, call in enumerate(entry["tool_calls"])]
                choice = {"index": index, "delta": entry, "logprobs": _chat_logprobs(names, outputs)
                          if body.logprobs else None, "finish_reason": reason}
                yield {**base_chunk, "choices": [choice], **usage.chunk(index, outputs[-1].completion_tokens)}
            if (final := usage.final()) is not None:
                yield {**base_chunk, "choices": [], "usage": final}
            return
        for index in range(body.n):
            first = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}
            yield {**base_chunk, "choices": [first], **usage.chunk(index, 0)}
        async for index, output in choices.outputs():
            choice = {"index": index, "delta": {"content": output.new_text} if output.new_text else {},
                      "logprobs": _chat_logprobs(names, [output]) if body.logprobs else None,
                      "finish_reason": _finish_reason(output)}
            extra = {}
            if index == 0 and output.prompt_logprobs is not None and body.prompt_logprobs is not None:
                extra = {"prompt_logprobs": _vllm_prompt_logprobs(names, prompt_ids, output.prompt_logprobs)}
            yield {**base_chunk, "choices": [choice], **extra, **usage.chunk(index, output.completion_tokens)}
        if (final := usage.final()) is not None:
            yield {**base_chunk, "choices": [], "usage": final}

    if body.stream:
        return SSEResponse(stream_events(choices, chunks(), done_marker=True), headers=headers)
    per_choice = await choices.collect(http_request)
    body_choices = []
    for index, outputs in enumerate(per_choice):
        entry, reason = message(index, outputs)
        body_choices.append({"index": index, "message": entry, "finish_reason": reason,
                             "logprobs": _chat_logprobs(names, outputs) if body.logprobs else None})
    payload = {**base, "object": "chat.completion", "choices": body_choices,
               "usage": _usage(choices.prompt_tokens, choices.completion_tokens)}
    if body.prompt_logprobs is not None:
        payload["prompt_logprobs"] = _vllm_prompt_logprobs(names, prompt_ids, per_choice[0][0].prompt_logprobs)
    return JSONResponse(payload, headers=headers)


@router.get("/models", response_model=ModelList, summary="Base model and the adapters you may use")
async def list_models(state: StateDep, caller: Caller) -> ModelList:
    records = await asyncio.to_thread(state.store.list)
    base = ModelCard(id=state.model_id, created=state.created, owned_by="loraplex", root=state.model_id,
                     max_model_len=state.max_model_len)
    adapters = [
        ModelCard(id=r.name, created=r.created, owned_by=r.owner or "unknown", root=r.name,
                  parent=state.model_id, max_model_len=state.max_model_len)
        for r in records if caller.may_use(r.name) and r.name != state.model_id  # the base id is the base
    ]
    return ModelList(data=[base, *adapters])

