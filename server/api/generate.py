"""TGI / LoRAX-style routes: POST /generate, POST /generate_stream, and TGI's root route POST / (`stream` picks
one; huggingface_hub's InferenceClient(base_url).text_generation posts there).

Sampling follows TGI: greedy unless `do_sample` is true or temperature/top_p/top_k ask for sampling, a sampled
request without a seed drawing one here, which `details` reports as TGI does. `details` adds finish reason,
token count, seed and per-token logprobs, and with `top_n_tokens` the likeliest alternatives of each token,
and with `decoder_input_details` the prompt tokens' logprobs. As in TGI, `generated_text` keeps the stop
sequence that ended it.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request

from server.api.deps import GenerateCaller, StateDep
from server.api.errors import ERROR_RESPONSES, APIError
from server.api.generation import Generation, SSEResponse, resolve_model, stream_events
from server.api.prompts import reject_invalid_text
from server.api.schemas import CompatGenerateRequest, GenerateParameters, GenerateRequest
from server.api.state import ServerState
from server.api.structured import tgi_grammar
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
        frequency_penalty=p.frequency_penalty or 0.0,
        # TGI's: a u64, drawn here for a sampled request without one; none for a greedy request (details say null)
        seed=(secrets.randbits(64) if p.seed is None else p.seed) if sampling else None,
        stop=list(p.stop),
        include_stop_str_in_output=True,
        logprobs=True,
        top_logprobs=p.top_n_tokens or 0,
        grammar=tgi_grammar(p),
        prompt_logprobs=0 if p.decoder_input_details else None,
    )


async def _start(state: ServerState, caller, body: GenerateRequest) -> Generation:
    reject_invalid_text(body)
    params = body.parameters
    adapter = await resolve_model(state, caller, params.adapter_id or None, "parameters.adapter_id")
    prompt_ids = await state.prompts.encode_text(body.inputs, "inputs")
    if params.truncate:
        prompt_ids = prompt_ids[-params.truncate:]
    sampling = _sampling_params(params)
    total, context = len(prompt_ids) + sampling.max_tokens, state.max_model_len
    if len(prompt_ids) < context < total:  # a prompt too long alone: Generation says so
        raise APIError(400, f"`inputs` tokens + `max_new_tokens` must be <= {context}. Given: {len(prompt_ids)} "
                       f"`inputs` tokens and {sampling.max_tokens} `max_new_tokens`", param="max_new_tokens")
    request_id = f"gen-{uuid.uuid4().hex}"
    return await Generation.start(state, caller, prompt_ids, sampling, adapter, request_id, "inputs")


class _Tokens:
    """TGI token objects for each output (text on the last token of a multi-token output)."""

    def __init__(self, state: ServerState):
        self.tokenizer = state.engine.tokenizer
        self.special_ids = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        self.eos_ids = state.engine.eos_token_ids

    def render(self, output: RequestOutput) -> list[dict]:
        ids, logprobs = output.new_token_ids, output.new_logprobs or [None] * len(output.new_token_ids)
        return [
            {"id": token, "text": output.new_text if i == len(ids) - 1 else "", "logprob": logprob,
             "special": token in self.special_ids}
            for i, (token, logprob) in enumerate(zip(ids, logprobs, strict=False))
        ]

    def render_prefill(self, prompt_ids: list[int], entries: list | None) -> list[dict]:
        """decoder_input_details: each prompt token with its logprob (None for the first, as TGI)."""
        entries = entries or [None] * len(prompt_ids)
        return [{"id": token, "text": self.tokenizer.decode([token]), "logprob": None if entry is None else entry[0]}
                for token, entry in zip(prompt_ids, entries, strict=False)]

    def render_top(self, output: RequestOutput) -> list[list[dict]]:
        """top_n_tokens: for each new token, its alternatives, likeliest first."""
        return [[{"id": t, "text": self.tokenizer.decode([t]), "logprob": v, "special": t in self.special_ids}
                 for t, v in alternatives] for alternatives in output.new_top_logprobs or []]

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
            "seed": generation.request.params.seed,
            "prefill": (tokens.render_prefill(generation.request.prompt_token_ids, outputs[0].prompt_logprobs)
                        if body.parameters.decoder_input_details else []),
            "tokens": [t for o in outputs for t in tokens.render(o)],
        }
        if body.parameters.top_n_tokens:
            response["details"]["top_tokens"] = [t for o in outputs for t in tokens.render_top(o)]
    return response


@router.post("/generate_stream", summary="Generate text as server-sent events (TGI / LoRAX)")
async def generate_stream(body: GenerateRequest, state: StateDep, caller: GenerateCaller):
    generation = await _start(state, caller, body)
    tokens = _Tokens(state)
    prefix = body.inputs if body.parameters.return_full_text else ""
    with_top = bool(body.parameters.top_n_tokens)

    async def events() -> AsyncIterator[dict]:
        text, index = prefix, 0
        async for output in generation.outputs():
            text += output.new_text
            rendered = tokens.render(output)
            tops = tokens.render_top(output) if with_top else []
            for position, token in enumerate(rendered):
                index += 1
                last = output.finished and position == len(rendered) - 1
                details = None
                if last and body.parameters.details:
                    details = {"finish_reason": tokens.finish_reason(output),
                               "generated_tokens": generation.completion_tokens,
                               "seed": generation.request.params.seed}
                event = {"index": index, "token": token, "generated_text": text if last else None,
                         "details": details}
                if with_top:
                    event["top_tokens"] = tops[position] if position < len(tops) else []
                yield event

    return SSEResponse(stream_events(generation, events(), done_marker=False),
                       headers={"X-Request-Id": generation.request.request_id})


@router.post("/", summary="TGI's root route: /generate, or /generate_stream when stream is true")
async def compat_generate(body: CompatGenerateRequest, state: StateDep, caller: GenerateCaller,
                          http_request: Request):
    if body.stream:
        return await generate_stream(body, state, caller)
    return [await generate(body, state, caller, http_request)]  # TGI answers a list of one
