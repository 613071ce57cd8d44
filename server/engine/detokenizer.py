"""Incremental detokenization with stop strings that are never emitted, even in part."""

from __future__ import annotations

from server.engine.request import FinishReason, Request


def update_text(request: Request, tokenizer) -> str:
    """Re-decode the output, apply stop strings, and return the newly emittable text."""
    text = tokenizer.decode(request.output_token_ids, skip_special_tokens=True)
    stops = request.params.stop
    if stops:
        search_from = max(0, request.num_emitted_chars - max(len(s) for s in stops))
        hits = [i for i in (text.find(s, search_from) for s in stops) if i >= 0]
        if hits:
            text = text[: min(hits)]
            request.finish_reason = FinishReason.STOP
    request.text = text
    emit_until = len(text)
    if request.finish_reason is None:
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            emit_until = len(text.rstrip("\ufffd"))
        if stops:  # hold back a tail that could still grow into a stop string
            held = max(len(s) for s in stops) - 1
            emit_until = min(emit_until, len(text) - held)
    emit_until = max(emit_until, request.num_emitted_chars)
    new_text = text[request.num_emitted_chars : emit_until]
    request.num_emitted_chars = emit_until
    return new_text
