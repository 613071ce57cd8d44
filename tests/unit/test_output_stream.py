"""OutputStream: a request's outputs from the engine's thread to its consumer, merged when they pile up."""

import asyncio
import random

import pytest

from server.engine.output_stream import OutputStream, merge_outputs
from server.engine.request import FinishReason, RequestOutput


def _output(token: int, *, finished: bool = False, logprobs: bool = False, top: bool = False,
            prompt_logprobs=None) -> RequestOutput:
    return RequestOutput("r", [token], f"<{token}>", [-0.1 * token] if logprobs else None, finished=finished,
                         finish_reason=FinishReason.LENGTH if finished else None, prompt_tokens=5,
                         completion_tokens=token, new_top_logprobs=[[(token, -0.5)]] if top else None,
                         prompt_logprobs=prompt_logprobs)


def test_merge_joins_tokens_text_and_logprobs_in_order_and_keeps_the_last_state():
    first = _output(1, logprobs=True, top=True, prompt_logprobs=[None, (-1.0, 1, [])])
    merged = merge_outputs([first, _output(2, logprobs=True, top=True), _output(3, logprobs=True, top=True,
                                                                                finished=True)])
    assert merged.new_token_ids == [1, 2, 3]
    assert merged.new_text == "<1><2><3>"
    assert merged.new_logprobs == pytest.approx([-0.1, -0.2, -0.3])
    assert merged.new_top_logprobs == [[(1, -0.5)], [(2, -0.5)], [(3, -0.5)]]
    assert merged.prompt_logprobs == first.prompt_logprobs
    assert merged.finished and merged.finish_reason is FinishReason.LENGTH
    assert (merged.prompt_tokens, merged.completion_tokens) == (5, 3)


def test_merge_without_logprobs_keeps_none():
    merged = merge_outputs([_output(1), _output(2)])
    assert merged.new_logprobs is None and merged.new_top_logprobs is None


def test_get_returns_one_output_when_the_consumer_keeps_up():
    async def main():
        stream = OutputStream(asyncio.get_running_loop())
        got = []

        async def consume():
            for _ in range(3):
                got.append(await stream.get())

        task = asyncio.ensure_future(consume())
        for token in (1, 2, 3):
            await asyncio.sleep(0)  # the consumer is waiting before each put
            stream.put(_output(token, finished=token == 3))
        await task
        return got

    got = asyncio.run(main())
    assert [o.new_token_ids for o in got] == [[1], [2], [3]]


def test_waiting_outputs_merge_up_to_a_finished_one_and_an_exception_comes_after_them():
    async def main():
        stream = OutputStream(asyncio.get_running_loop())
        for token in (1, 2):
            stream.put(_output(token))
        error = RuntimeError("engine gone")
        stream.put(error)
        first, second = await stream.get(), await stream.get()
        stream.put(_output(3))
        stream.put(_output(4, finished=True))
        stream.put(_output(5))  # never happens after a finished output; must not merge past it
        third, fourth = await stream.get(), await stream.get()
        return first, second, error, third, fourth

    first, second, error, third, fourth = asyncio.run(main())
    assert first.new_token_ids == [1, 2] and first.new_text == "<1><2>"
    assert second is error
    assert third.new_token_ids == [3, 4] and third.finished
    assert fourth.new_token_ids == [5]


def test_an_aborted_or_failed_output_comes_alone_after_the_tokens_before_it():
    async def main():
        stream = OutputStream(asyncio.get_running_loop())
        got = []
        for reason in (FinishReason.ABORT, FinishReason.ERROR):
            stream.put(_output(1))
            stream.put(_output(2))
            stream.put(RequestOutput("r", [], "", None, finished=True, finish_reason=reason, error="x"))
            got.append((await stream.get(), await stream.get()))
        return got

    for tokens, end in asyncio.run(main()):
        assert tokens.new_token_ids == [1, 2] and not tokens.finished
        assert end.finished and end.new_token_ids == []


def test_a_cancelled_get_leaves_no_waiter_and_loses_nothing():
    async def main():
        stream = OutputStream(asyncio.get_running_loop())
        task = asyncio.ensure_future(stream.get())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        stream.put(_output(1))
        return await stream.get()

    assert asyncio.run(main()).new_token_ids == [1]


def test_random_interleavings_deliver_every_token_once_in_order():
    rng = random.Random(0)

    async def main():
        stream = OutputStream(asyncio.get_running_loop())
        total = 200

        async def produce():
            for token in range(1, total + 1):
                stream.put(_output(token, finished=token == total))
                if rng.random() < 0.5:
                    await asyncio.sleep(0)

        producer = asyncio.ensure_future(produce())
        tokens, chunks = [], 0
        while not tokens or tokens[-1] != total:
            output = await stream.get()
            tokens += output.new_token_ids
            chunks += 1
            assert output.completion_tokens == tokens[-1]
            if rng.random() < 0.5:
                await asyncio.sleep(0)
        await producer
        return tokens, chunks

    tokens, chunks = asyncio.run(main())
    assert tokens == list(range(1, 201))
    assert chunks < 200  # some outputs waited and were merged
