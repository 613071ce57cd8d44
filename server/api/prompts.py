"""Turn request bodies into prompt token ids: plain text, token-id lists, and chat templates.

The cheap checks run first, on the event loop: every string of the body must be valid Unicode (a
lone surrogate such as "\\ud800" is a 400 naming its field; no tokenizer accepts it) and a prompt may
hold at most max_prompt_chars characters. Only then is the prompt rendered and tokenized, on a small
pool of worker threads, at most `tokenizer_threads` prompts at once. Fast tokenizers release the
interpreter lock while they encode, but hold it while they build and free the token list, a pause
that grows with the number of tokens: max_prompt_chars is what keeps it short for the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
from concurrent.futures import ThreadPoolExecutor

from pydantic import BaseModel

from server.api.errors import INVALID_UNICODE, APIError
from server.api.schemas import ChatMessage

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _first_invalid_text(value: object) -> list[str] | None:
    """The path (innermost name first) of the first string in `value` that holds a lone surrogate, or
    None. Names are only made on the way out of a hit: a prompt of token ids is a list of thousands of
    ints, and naming each item cost ~0.5 ms per 2,000 tokens."""
    if isinstance(value, str):
        return [] if _LONE_SURROGATE.search(value) else None
    if isinstance(value, BaseModel):
        items = ((name, getattr(value, name)) for name in type(value).model_fields)
    elif isinstance(value, dict):
        items = [*((key, key) for key in value), *value.items()]
    elif isinstance(value, (list, tuple)):
        if all(type(item) is int for item in value):  # token ids: half the loop below's time (65 us at 2,000)
            return None
        items = enumerate(value)
    else:
        return None
    for name, item in items:
        if isinstance(item, (int, float, bool)) or item is None:
            continue
        found = _first_invalid_text(item)
        if found is not None:
            return [*found, str(name)]
    return None


def reject_invalid_text(body: BaseModel) -> None:
    """400 naming the first field of `body` whose text is not valid Unicode (a lone surrogate)."""
    path = _first_invalid_text(body)
    if path is not None:
        field = ".".join(reversed(path))
        raise APIError(400, f"{field} {INVALID_UNICODE}", param=field)


def _message_text(index: int, message: ChatMessage) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    texts = []
    for part_index, part in enumerate(message.content):
        if part.type != "text" or part.text is None:
            raise APIError(400, f"content part type {part.type!r} is not supported; only 'text'",
                           param=f"messages.{index}.content.{part_index}.type")
        texts.append(part.text)
    return "\n".join(texts)


def _message_dict(index: int, message: ChatMessage) -> dict:
    entry = {"role": message.role, "content": _message_text(index, message)}
    for key in ("name", "tool_call_id"):
        if getattr(message, key) is not None:
            entry[key] = getattr(message, key)
    if message.tool_calls:
        entry["tool_calls"] = [_template_call(call) for call in message.tool_calls]
    return entry


def _template_call(call: dict) -> dict:
    """An earlier tool call as templates read it: OpenAI sends arguments as a JSON string, templates
    (Llama 3, Qwen, Hermes) render them with `tojson`, so a parseable string becomes its object."""
    function = dict(call.get("function") or {})
    if isinstance(function.get("arguments"), str):
        with contextlib.suppress(json.JSONDecodeError):
            function["arguments"] = json.loads(function["arguments"])
    return {**call, "function": function}


# apply_chat_template's own arguments: chat_template_kwargs may only add template variables.
_TEMPLATE_CALL_ARGS = frozenset((
    "conversation", "tools", "documents", "chat_template", "add_generation_prompt", "continue_final_message",
    "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs", "processor_kwargs",
))


class PromptEncoder:
    """Checks prompt lengths, then renders and tokenizes prompts on a bounded pool of worker threads."""

    def __init__(self, tokenizer, max_prompt_chars: int, num_threads: int):
        self.tokenizer = tokenizer
        self.max_prompt_chars = max_prompt_chars
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="loraplex-tokenize")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def check_length(self, num_chars: int, field: str) -> None:
        """400 naming `field` and the limit when a prompt is longer than max_prompt_chars."""
        if num_chars > self.max_prompt_chars:
            raise APIError(400, f"{field} has {num_chars} characters, more than max_prompt_chars "
                           f"({self.max_prompt_chars})", param=field)

    async def encode_text(self, text: str, field: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text` after the length check; `field` names it in errors."""
        self.check_length(len(text), field)
        return await self._run(self.tokenizer.encode, text, add_special_tokens=add_special_tokens)

    async def encode_completion_prompts(self, prompts: list[str | list[int]], add_special_tokens: bool = True
                                        ) -> list[list[int]]:
        """Token ids of each completion prompt (CompletionRequest.prompt_list): text is tokenized."""
        self.check_length(sum(len(p) for p in prompts if isinstance(p, str)), "prompt")
        encoded = []
        for index, one in enumerate(prompts):
            field = "prompt" if len(prompts) == 1 else f"prompt[{index}]"
            if not one:
                raise APIError(400, f"{field} is empty", param="prompt")
            encoded.append(await self.encode_text(one, field, add_special_tokens) if isinstance(one, str)
                           else list(one))
        return encoded

    async def encode_chat(self, messages: list[ChatMessage], add_generation_prompt: bool,
                          continue_final_message: bool = False, add_special_tokens: bool = False,
                          template_kwargs: dict | None = None, tools: list[dict] | None = None) -> list[int]:
        """Render `messages` with the model's chat template and tokenize the result. Any role is passed
        on: the template decides (its error is the 400). `template_kwargs` are extra template variables."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
        conversation = [_message_dict(i, m) for i, m in enumerate(messages)]
        self.check_length(sum(len(m["content"]) for m in conversation), "messages")
        template_kwargs = dict(template_kwargs or {})
        for key in template_kwargs:
            if key in _TEMPLATE_CALL_ARGS:
                raise APIError(400, f"chat_template_kwargs may not set {key!r}, an argument of the template call",
                               param=f"chat_template_kwargs.{key}")
        if tools is not None:
            template_kwargs["tools"] = tools
        try:
            text = await self._run(self.tokenizer.apply_chat_template, conversation, tokenize=False,
                                   add_generation_prompt=add_generation_prompt,
                                   continue_final_message=continue_final_message, **template_kwargs)
        except Exception as exc:  # jinja2 TemplateError and raise_exception() in templates
            raise APIError(400, f"the chat template rejected the messages: {exc}", param="messages") from None
        return await self._run(self.tokenizer.encode, text, add_special_tokens=add_special_tokens)

    async def _run(self, fn, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))
