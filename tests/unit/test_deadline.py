"""The request deadline of server.api.generation: one timer for all of a request's outputs."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from server.api.generation import _HAS_UNCANCEL, _Deadline

pytestmark = pytest.mark.skipif(not _HAS_UNCANCEL, reason="Python 3.10 keeps a timeout per output")


def run(coro):
    return asyncio.run(coro)


def test_an_output_before_the_deadline_is_returned_and_the_timer_can_be_cancelled():
    async def main():
        deadline = _Deadline(time.monotonic() + 0.05)
        queue = asyncio.Queue()
        queue.put_nowait("a")
        assert await deadline.wait(queue.get) == "a"
        deadline.cancel()
        await asyncio.sleep(0.08)
        assert not deadline.expired

    run(main())


def test_the_deadline_passing_while_waiting_is_a_timeout_and_leaves_the_task_uncancelled():
    async def main():
        deadline = _Deadline(time.monotonic() + 0.02)
        queue = asyncio.Queue()
        started = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await deadline.wait(queue.get)
        assert 0.01 < time.monotonic() - started < 1.0
        assert asyncio.current_task().cancelling() == 0
        await asyncio.sleep(0)  # the task goes on: no cancellation left pending
        with pytest.raises(asyncio.TimeoutError):  # past the deadline: at once, without waiting
            await deadline.wait(queue.get)

    run(main())


def test_past_the_deadline_nothing_is_started():
    async def main():
        deadline = _Deadline(time.monotonic() - 1)
        await asyncio.sleep(0.01)  # the timer fires
        started = []

        async def start():
            started.append(1)

        with pytest.raises(asyncio.TimeoutError):
            await deadline.wait(start)
        assert not started

    run(main())


def test_a_cancellation_from_elsewhere_is_not_taken_for_the_deadline():
    async def waiter(deadline, queue):
        return await deadline.wait(queue.get)

    async def main():
        queue = asyncio.Queue()
        deadline = _Deadline(time.monotonic() + 60)
        task = asyncio.ensure_future(waiter(deadline, queue))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        deadline.cancel()
        # both at once: the deadline passes, and someone else cancels the same task: the cancellation stands
        deadline = _Deadline(time.monotonic() + 0.02)
        task = asyncio.ensure_future(waiter(deadline, queue))
        await asyncio.sleep(0.005)

        def cancel_with_the_deadline():
            deadline._expire()
            task.cancel()

        asyncio.get_running_loop().call_soon(cancel_with_the_deadline)
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())


def test_a_cancel_count_left_from_before_still_gives_the_timeout():
    """A task may carry a cancellation it swallowed earlier (cancelling() > 0): the deadline's own cancel is
    still told apart from it, as asyncio.timeout does."""
    async def main():
        task = asyncio.current_task()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):  # swallowed: the count stays at 1
            await asyncio.sleep(0)
        assert task.cancelling() == 1
        deadline = _Deadline(time.monotonic() + 0.02)
        with pytest.raises(asyncio.TimeoutError):
            await deadline.wait(asyncio.Queue().get)
        assert task.cancelling() == 1

    run(main())
