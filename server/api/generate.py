"""TGI / LoRAX-style routes: POST /generate and POST /generate_stream.

Sampling follows TGI: greedy unless `do_sample` is true or temperature/top_p/top_k ask for
sampling. `details` adds finish reason, token count, seed and per-token logprobs.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request

from server.api.deps import GenerateCaller, StateDep
from server.api.errors import ERROR_RESPONSES
from server.api.generation import Generation, SSEResponse, resolve_model, stream_events
from server.api.prompts import reject_invalid_text
from server.api.schemas import GenerateParameters, GenerateRequest
from server.api.state import ServerState
from server.engine.request import FinishReason, RequestOutput, SamplingParams

router = APIRouter(tags=["tgi"], responses=ERROR_RESPONSES)
DEFAULT_MAX_NEW_TOKENS = 20


def _sampling_params(p: GenerateParameters) -> SamplingParams:
    sampling = p.do_sample or (p.temperature not in (None, 1.0)) or bool(p.top_k) or (p.top_p or 1.0) < 1.0
    return SamplingParams(
        max_tokens=p.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        temperature=(p.temperature or 1.0) if sampling else 0.0,
        top_p=p.top_p or 1.0,
        top_k=p.top_k or 0,
        repetition_penalty=p.repetition_penalty or 1.0,
        seed=p.seed,
        stop=list(p.stop),
        logprobs=True,
    )


async def _start(state: ServerState, caller, body: GenerateRequest) -> Generation:
    reject_invalid_text(body)
    params = body.parameters
    adapter = await resolve_model(state, caller, params.adapter_id or None)
    prompt_ids = await state.prompts.encode_text(body.inputs, "inputs")
    if params.truncate:
        prompt_ids = prompt_ids[-params.truncate:]
    request_id = f"gen-{uuid.uuid4().hex}"
    return await Generation.start(state, caller, prompt_ids, _sampling_params(params), adapter, request_id,
                                  "inputs")


class _Tokens:
    """TGI token objects for each output (text on the last token of a multi-token output)."""

    def __init__(self, state: ServerState):
        tokenizer = state.engine.tokenizer
        self.special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
        self.eos_ids = state.engine.eos_token_ids

    def render(self, output: RequestOutput) -> list[dict]:
        ids, logprobs = output.new_token_ids, output.new_logprobs or [None] * len(output.new_token_ids)
        return [
            {"id": token, "text": output.new_text if i == len(ids) - 1 else "", "logprob": logprob,
             "special": token in self.special_ids}
            for i, (token, logprob) in enumerate(zip(ids, logprobs, strict=False))
        ]

    def finish_reason(self, output: RequestOutput) -> str:
        if output.finish_reason is FinishReason.LENGTH:
            return "length"
        last = output.new_token_ids[-1] if output.new_token_ids else None
        return "eos_token" if last in self.eos_ids else "stop_sequence"


@router.post("/generate", summary="Generate text (TGI / LoRAX)")
async def generate(body: GenerateRequest, state: StateDep, caller: GenerateCaller, http_request: Request):
    generation = await _start(state, caller, body)
    outputs = await generation.collect(http_request)
    text = "".join(o.new_text for o in outputs)
    response: dict = {"generated_text": body.inputs + text if body.parameters.return_full_text else text}
    if body.parameters.details:
        tokens = _Tokens(state)
        response["details"] = {
            "finish_reason": tokens.finish_reason(outputs[-1]),
            "generated_tokens": generation.completion_tokens,
            "seed": body.parameters.seed,
            "prefill": [],
            "tokens": [t for o in outputs for t in tokens.render(o)],
        }
    return response


@router.post("/generate_stream", summary="Generate text as server-sent events (TGI / LoRAX)")
async def generate_stream(body: GenerateRequest, state: StateDep, caller: GenerateCaller):
    generation = await _start(state, caller, body)
    tokens = _Tokens(state)
    prefix = body.inputs if body.parameters.return_full_text else ""

    async def events() -> AsyncIterator[dict]:
        text, index = prefix, 0
        async for output in generation.outputs():
            text += output.new_text
            rendered = tokens.render(output)
            for position, token in enumerate(rendered):
                index += 1
                last = output.finished and position == len(rendered) - 1
                details = None
                if last and body.parameters.details:
                    details = {"finish_reason": tokens.finish_reason(output),
                               "generated_tokens": generation.completion_tokens, "seed": body.parameters.seed}
                yield {"index": index, "token": token, "generated_text": text if last else None,
                       "details": details}

    return SSEResponse(stream_events(generation, events(), done_marker=False),
                       headers={"X-Request-Id": generation.request.request_id})
