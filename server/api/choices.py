"""Several completions in one OpenAI request: `n` samples of each prompt, and a list of prompts.

Each choice is its own engine request (a Generation); choice index = prompt index * n + sample index,
as vLLM numbers them. The siblings of a prompt start once its first choice has its first token: the
prompt's full KV blocks are then in the prefix cache, so the other n - 1 reuse them instead of
computing and storing copies. Started together, they would all miss the cache in the same prefill.

A request seed gives sample j the seed `seed + j` (wrapping inside the signed 64-bit range), so each
choice differs and the whole response is reproducible; greedy choices are all the same, as in vLLM.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import Request as HTTPRequest

from server.api.errors import APIError
from server.api.generation import Generation, collect_until_disconnect
from server.api.schemas import SEED_MAX, SEED_MIN
from server.engine.request import RequestOutput

MAX_CHOICES = 128  # n x prompts in one request (OpenAI caps n at 128)

Starter = Callable[[int, int | None], Awaitable[Generation]]  # (choice index, seed) -> started Generation


def sample_seed(seed: int | None, sample: int) -> int | None:
    """The seed of sample `sample` of a prompt: `seed + sample`, wrapped into [SEED_MIN, SEED_MAX]."""
    if seed is None:
        return None
    span = SEED_MAX - SEED_MIN + 1
    return (seed + sample - SEED_MIN) % span + SEED_MIN


def check_count(num_prompts: int, n: int) -> None:
    if num_prompts * n > MAX_CHOICES:
        raise APIError(400, f"{num_prompts} prompt(s) x n={n} is {num_prompts * n} choices; at most "
                       f"{MAX_CHOICES} per request", param="n")


class Choices:
    """The generations of one request, in choice order, closed together."""

    def __init__(self, generations: list[Generation], n: int):
        self.generations = generations
        self.n = n

    @classmethod
    async def start(cls, num_prompts: int, n: int, seed: int | None, starter: Starter) -> Choices:
        """Start every choice (first sample of each prompt, then its siblings); on any failure close
        those already started and raise that failure."""
        check_count(num_prompts, n)
        if num_prompts == 1 and n == 1:  # in this task: a task of its own started a turn of the event loop later
            return cls([await starter(0, sample_seed(seed, 0))], 1)
        started: dict[int, Generation] = {}

        async def start_one(index: int) -> None:
            started[index] = await starter(index, sample_seed(seed, index % n))

        async def start_prompt(prompt: int) -> None:
            await start_one(prompt * n)
            # every sibling settles before a failure is raised: one still starting after the close below
            # would never be closed (its rate-limiter place and its engine request kept)
            siblings = await asyncio.gather(*(start_one(prompt * n + j) for j in range(1, n)),
                                            return_exceptions=True)
            if (failure := _first_failure(siblings)) is not None:
                raise failure

        results = await asyncio.gather(*(start_prompt(p) for p in range(num_prompts)), return_exceptions=True)
        if (failure := _first_failure(results)) is not None:
            for generation in list(started.values()):
                await generation.aclose()
            raise failure
        return cls([started[i] for i in range(num_prompts * n)], n)

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens counted once per prompt (siblings share them), as the OpenAI usage does."""
        return sum(g.prompt_tokens for g in self.generations[:: self.n])

    @property
    def completion_tokens(self) -> int:
        return sum(g.completion_tokens for g in self.generations)

    def prompt_index(self, choice: int) -> int:
        return choice // self.n

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) as they come, every choice to its end; the first error raises."""
        if len(self.generations) == 1:
            async for output in self.generations[0].outputs():
                yield 0, output
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, generation: Generation) -> None:
            try:
                async for output in generation.outputs():
                    queue.put_nowait((index, output))
                queue.put_nowait((index, None))
            except Exception as exc:
                queue.put_nowait((index, exc))

        tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(self.generations)]
        remaining = len(tasks)
        try:
            while remaining:
                index, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield index, item
        finally:
            self.abort()  # before the cancels: a pump's cancel can be swallowed by an arriving output
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def collect(self, http_request: HTTPRequest) -> list[list[RequestOutput]]:
        """Every choice's outputs, in choice order; 499 (and aborts) if the client disconnects."""
        async def gather() -> list[list[RequestOutput]]:
            per_choice: list[list[RequestOutput]] = [[] for _ in self.generations]
            async for index, output in self.outputs():
                per_choice[index].append(output)
            return per_choice

        return await collect_until_disconnect(gather(), http_request, self.abort, self.aclose)

    def abort(self) -> None:
        for generation in self.generations:
            generation.abort()

    async def aclose(self) -> None:
        """Close every generation in turn, inline: gathered as tasks, a cancellation of the closing
        response (a client gone) cancelled them before they gave their rate-limiter places back."""
        self.abort()
        for generation in self.generations:
            await generation.aclose()


def _first_failure(results: list) -> BaseException | None:
    """The first exception among gather(..., return_exceptions=True)'s results, if any."""
    return next((r for r in results if isinstance(r, BaseException)), None)
