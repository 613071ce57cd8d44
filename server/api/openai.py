"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions and /v1/models.

Streaming responses are OpenAI chunks (`data: {...}`) ending with `data: [DONE]`; with
`stream_options.include_usage` every chunk carries `"usage": null` and a last chunk with no choices
carries the usage. Logprobs are those of the chosen tokens; `top_logprobs` lists only the chosen one.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.api.deps import Caller, GenerateCaller, StateDep
from server.api.errors import ERROR_RESPONSES
from server.api.generation import Generation, SSEResponse, resolve_model, stream_events
from server.api.prompts import encode_chat, encode_completion_prompt
from server.api.schemas import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from server.api.state import ServerState
from server.engine.request import RequestOutput, SamplingParams

router = APIRouter(prefix="/v1", tags=["openai"], responses=ERROR_RESPONSES)


def _sampling_params(body: CompletionRequest | ChatCompletionRequest, max_tokens: int,
                     logprobs: bool) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(0, body.top_k or 0),
        min_p=body.min_p or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logit_bias=dict(body.logit_bias or {}),
        seed=body.seed,
        stop=body.stop_list,
        stop_token_ids=list(body.stop_token_ids or []),
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
    )


def _usage(generation: Generation) -> dict:
    prompt, completion = generation.prompt_tokens, generation.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish_reason(output: RequestOutput) -> str | None:
    return output.finish_reason.value if output.finished and output.finish_reason else None


def _token_texts(tokenizer, token_ids: list[int]) -> list[str]:
    return [tokenizer.decode([token]) for token in token_ids]


class _CompletionLogprobs:
    """Accumulates the legacy completions `logprobs` object, chunk by chunk."""

    def __init__(self, tokenizer, with_top: bool):
        self.tokenizer, self.with_top, self.offset = tokenizer, with_top, 0

    def render(self, outputs: list[RequestOutput]) -> dict:
        tokens, values, offsets = [], [], []
        for output in outputs:
            for text, value in zip(_token_texts(self.tokenizer, output.new_token_ids),
                                   output.new_logprobs or [], strict=False):
                tokens.append(text)
                values.append(value)
                offsets.append(self.offset)
                self.offset += len(text)
        top = [{t: v} for t, v in zip(tokens, values, strict=True)] if self.with_top else None
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": top, "text_offset": offsets}


def _chat_logprobs(tokenizer, outputs: list[RequestOutput], with_top: bool) -> dict:
    content = []
    for output in outputs:
        for text, value in zip(_token_texts(tokenizer, output.new_token_ids), output.new_logprobs or [],
                               strict=False):
            entry = {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}
            entry["top_logprobs"] = [dict(entry)] if with_top else []
            content.append(entry)
    return {"content": content, "refusal": None}


async def _start(state: ServerState, caller, body, adapter, prompt_ids: list[int], max_tokens: int | None,
                 logprobs: bool, request_id: str, prompt_field: str) -> Generation:
    if max_tokens is None:
        max_tokens = max(1, state.max_model_len - len(prompt_ids))
    params = _sampling_params(body, max_tokens, logprobs)
    return await Generation.start(state, caller, prompt_ids, params, adapter, request_id, prompt_field)


@router.post("/completions", summary="Text completion (OpenAI)")
async def create_completion(body: CompletionRequest, state: StateDep, caller: GenerateCaller,
                            http_request: Request):
    tokenizer = state.engine.tokenizer
    adapter = await resolve_model(state, caller, body.model)
    prompt_ids = await encode_completion_prompt(tokenizer, body.prompt)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    generation = await _start(state, caller, body, adapter, prompt_ids, body.max_tokens,
                              body.logprobs is not None, request_id, "prompt")
    created, logprobs = int(time.time()), _CompletionLogprobs(tokenizer, bool(body.logprobs))
    base = {"id": request_id, "object": "text_completion", "created": created, "model": body.model,
            "system_fingerprint": None}
    headers = {"X-Request-Id": request_id}

    async def chunks() -> AsyncIterator[dict]:
        async for output in generation.outputs():
            choice = {"index": 0, "text": output.new_text, "finish_reason": _finish_reason(output),
                      "logprobs": logprobs.render([output]) if body.logprobs is not None else None}
            yield {**base, "choices": [choice], **({"usage": None} if body.include_usage else {})}
        if body.include_usage:
            yield {**base, "choices": [], "usage": _usage(generation)}

    if body.stream:
        return SSEResponse(stream_events(generation, chunks(), done_marker=True), headers=headers)
    outputs = await generation.collect(http_request)
    choice = {"index": 0, "text": "".join(o.new_text for o in outputs),
              "finish_reason": _finish_reason(outputs[-1]),
              "logprobs": logprobs.render(outputs) if body.logprobs is not None else None}
    return JSONResponse({**base, "choices": [choice], "usage": _usage(generation)}, headers=headers)


@router.post("/chat/completions", summary="Chat completion (OpenAI)")
async def create_chat_completion(body: ChatCompletionRequest, state: StateDep, caller: GenerateCaller,
                                 http_request: Request):
    tokenizer = state.engine.tokenizer
    adapter = await resolve_model(state, caller, body.model)
    prompt_ids = await encode_chat(tokenizer, body.messages, body.add_generation_prompt)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    max_tokens = body.max_completion_tokens or body.max_tokens
    generation = await _start(state, caller, body, adapter, prompt_ids, max_tokens, body.logprobs, request_id,
                              "messages")
    with_top = bool(body.top_logprobs)
    base = {"id": request_id, "created": int(time.time()), "model": body.model, "system_fingerprint": None}
    headers = {"X-Request-Id": request_id}

    async def chunks() -> AsyncIterator[dict]:
        base_chunk = {**base, "object": "chat.completion.chunk"}
        usage = {"usage": None} if body.include_usage else {}
        first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}
        yield {**base_chunk, "choices": [first], **usage}
        async for output in generation.outputs():
            choice = {"index": 0, "delta": {"content": output.new_text} if output.new_text else {},
                      "logprobs": _chat_logprobs(tokenizer, [output], with_top) if body.logprobs else None,
                      "finish_reason": _finish_reason(output)}
            yield {**base_chunk, "choices": [choice], **usage}
        if body.include_usage:
            yield {**base_chunk, "choices": [], "usage": _usage(generation)}

    if body.stream:
        return SSEResponse(stream_events(generation, chunks(), done_marker=True), headers=headers)
    outputs = await generation.collect(http_request)
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": "".join(o.new_text for o in outputs)},
        "logprobs": _chat_logprobs(tokenizer, outputs, with_top) if body.logprobs else None,
        "finish_reason": _finish_reason(outputs[-1]),
    }
    payload = {**base, "object": "chat.completion", "choices": [choice], "usage": _usage(generation)}
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

