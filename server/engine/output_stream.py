"""One request's outputs on their way from the engine's thread to the task that streams them.

The API process's event loop handles every streamed token of every request: at 32 streams on the H200
(1B) that is ~11,000 outputs a second, and on that load the process spent ~100-150 us of CPU a token
(bench.http_capacity's `api_cpu_us_per_token`), so one core, one GIL, was the ceiling and requests queued
in front of it (client TTFT 25 ms at p50 for an engine TTFT of 7). Two things here cut that:

- A deque and one future instead of an asyncio.Queue: a put wakes the consumer only if it waits, and
  a get that finds outputs waiting takes them without a future at all.
- `get` takes everything waiting and merges consecutive outputs into one (vLLM's
  RequestOutputCollector does the same). A consumer that fell behind by a step then writes one chunk
  for two tokens instead of two chunks, so the cost of a chunk (formatting, the ASGI layers, the
  socket write) is paid once per wake-up rather than once per token, and a busy API process catches
  up instead of building a queue. A consumer that keeps up still gets one output a token.

Items are `RequestOutput`s or exceptions (a refusal, the engine gone); an exception, an aborted or a failed
output is returned alone, after the outputs queued before it.
"""

from __future__ import annotations

import asyncio
from collections import deque

from server.engine.request import FinishReason, RequestOutput


class OutputStream:
    """Written from the event loop's thread (`put`, through call_soon_threadsafe), read by one task."""

    __slots__ = ("loop", "_items", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._items: deque[RequestOutput | BaseException] = deque()
        self._waiter: asyncio.Future | None = None

    def put(self, item: RequestOutput | BaseException) -> None:
        self._items.append(item)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> RequestOutput | BaseException:
        """The next item: every output waiting, merged into one, or an exception."""
        while not self._items:
            self._waiter = waiter = self.loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        items = self._items
        merged = [items.popleft()]
        if _mergeable(merged[0]) and not merged[0].finished:
            while items and _mergeable(items[0]):
                merged.append(output := items.popleft())
                if output.finished:
                    break
        return merged[0] if len(merged) == 1 else merge_outputs(merged)


def put_all(items: list[tuple[OutputStream, RequestOutput | BaseException]]) -> None:
    """Hand each item to its stream (the engines' one call_soon_threadsafe per step and event loop)."""
    for stream, item in items:
        stream.put(item)


def _mergeable(item: RequestOutput | BaseException) -> bool:
    """An output that may join its neighbours: not an exception, nor an abort or an error (those end the
    stream with a status of their own, after every token before them)."""
    return isinstance(item, RequestOutput) and item.finish_reason not in (FinishReason.ABORT, FinishReason.ERROR)


def merge_outputs(outputs: list[RequestOutput]) -> RequestOutput:
    """Consecutive outputs of one request as one: tokens, text and logprobs joined in order; the finish
    state, counts and error of the last; the prompt's logprobs of the first (only a first output has them)."""
    first, last = outputs[0], outputs[-1]
    has_logprobs = any(o.new_logprobs is not None for o in outputs)
    has_top = any(o.new_top_logprobs is not None for o in outputs)
    return RequestOutput(
        first.request_id,
        [token for o in outputs for token in o.new_token_ids],
        "".join(o.new_text for o in outputs),
        [v for o in outputs for v in o.new_logprobs or ()] if has_logprobs else None,
        finished=last.finished,
        finish_reason=last.finish_reason,
        prompt_tokens=last.prompt_tokens or first.prompt_tokens,
        completion_tokens=last.completion_tokens,
        error=last.error,
        new_top_logprobs=[t for o in outputs for t in o.new_top_logprobs or ()] if has_top else None,
        prompt_logprobs=first.prompt_logprobs,
    )
