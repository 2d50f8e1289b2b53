"""Background loops end when stopped, even when a step swallows the cancellation."""

from __future__ import annotations

import asyncio

from cascade_server.gateway.stores import ControlStore, FileBackend
from cascade_server.gateway.supervise import Periodic


def test_stop_ends_a_loop_whose_step_swallowed_the_cancellation():
    """Python 3.11's wait_for loses a cancellation that arrives with its inner result; a step
    that loses one (simulated here by catching it) must not keep the loop, and shutdown,
    alive."""
    swallowed = []

    async def step() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            if swallowed:
                raise
            swallowed.append(1)  # the first one lost, as wait_for's race loses it

    async def main() -> bool:
        loop = Periodic("swallow", 0.001, step)
        loop.start()
        await asyncio.sleep(0.05)  # inside a step
        task = loop._task
        await asyncio.wait_for(loop.stop(), timeout=5)
        return task is not None and task.done()

    assert asyncio.run(main())
    assert swallowed == [1]


def test_a_control_store_call_cancelled_as_it_returns_is_still_cancelled(tmp_path):
    """The store's call ends with the task's cancellation however close to the thread's
    answer it comes (the controller's loop is stopped this way at shutdown)."""

    async def main() -> int:
        store = ControlStore(FileBackend(tmp_path), timeout_s=2.0)
        lost = 0
        for i in range(300):
            task = asyncio.ensure_future(store.call(lambda: 1))
            for _ in range(i % 7):  # cancel at every point of the thread's round trip
                await asyncio.sleep(0)
            requested = task.cancel()
            try:
                await task
                lost += requested  # cancelled while running, yet it returned: swallowed
            except asyncio.CancelledError:
                pass
        return lost

    assert asyncio.run(main()) == 0
