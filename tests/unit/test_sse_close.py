"""Requests are closed whatever happens to their response: an SSE body never iterated, a sibling choice that
fails to start."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import ClientDisconnect

from server.api.choices import Choices
from server.api.generation import SSEResponse, stream_events


class FakeGeneration:
    def __init__(self):
        self.closed = 0

    async def aclose(self):
        self.closed += 1

    def abort(self):
        pass


async def _events():
    yield {"x": 1}


def test_an_sse_body_never_iterated_still_closes_its_request():
    """The client is gone before the response starts: the start message fails to send, so the body's
    generator never runs, and its own `finally` with it."""
    generation = FakeGeneration()
    response = SSEResponse(stream_events(generation, _events(), done_marker=True))

    async def receive():
        await asyncio.sleep(3600)

    async def send(message):
        raise OSError("the client is gone")

    async def main():
        with pytest.raises((OSError, ClientDisconnect)):  # Starlette may turn the send's OSError into its own
            await response({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send)

    asyncio.run(main())
    assert generation.closed >= 1


def test_an_sse_body_read_to_its_end_closes_its_request_once_more_harmlessly():
    generation = FakeGeneration()
    body = stream_events(generation, _events(), done_marker=True)

    async def main():
        lines = [line async for line in body]
        await body.aclose()
        return lines

    assert asyncio.run(main()) == [b'data: {"x":1}\n\n', b"data: [DONE]\n\n"]
    assert generation.closed >= 1


def test_a_failing_choice_closes_every_sibling_even_one_that_starts_later():
    """n = 3: choice 1 fails at once while choice 2 is still starting; choice 2 must be closed too."""
    generations = {}

    async def starter(index, seed):
        if index == 1:
            raise RuntimeError("refused")
        if index == 2:
            await asyncio.sleep(0.05)
        generations[index] = FakeGeneration()
        return generations[index]

    async def main():
        with pytest.raises(RuntimeError, match="refused"):
            await Choices.start(1, 3, None, starter)

    asyncio.run(main())
    assert sorted(generations) == [0, 2]
    assert all(g.closed == 1 for g in generations.values())
