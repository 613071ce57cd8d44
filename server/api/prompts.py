"""Turn request bodies into prompt token ids: plain text, token-id lists, and chat templates."""

from __future__ import annotations

import asyncio

from server.api.errors import APIError
from server.api.schemas import ChatMessage


async def encode_text(tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    """Tokenize off the event loop (long prompts take milliseconds)."""
    return await asyncio.to_thread(tokenizer.encode, text, add_special_tokens=add_special_tokens)


async def encode_completion_prompt(tokenizer, prompt: str | list) -> list[int]:
    """One completion prompt: a string, token ids, or a one-element list of either."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(400, f"only one prompt per request is supported, got {len(prompt)}",
                           param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "prompt is empty", param="prompt")
        return await encode_text(tokenizer, prompt)
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    return list(prompt)


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


async def encode_chat(tokenizer, messages: list[ChatMessage], add_generation_prompt: bool) -> list[int]:
    """Render `messages` with the model's chat template and tokenize the result."""
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
    conversation = [{"role": m.role, "content": _message_text(i, m)} for i, m in enumerate(messages)]
    try:
        text = await asyncio.to_thread(
            tokenizer.apply_chat_template, conversation, tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    except Exception as exc:  # jinja2 TemplateError and raise_exception() in templates
        raise APIError(400, f"the chat template rejected the messages: {exc}", param="messages") from None
    return await encode_text(tokenizer, text, add_special_tokens=False)
