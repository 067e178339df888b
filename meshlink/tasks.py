"""asyncio helpers the components share: coalescing, periodic jobs, and signals.

- ``Coalescer``: one task runs a job after ``wake()``; wakes during a run cause exactly
  one more run, so a burst of changes costs one or two runs, and the job always sees the
  latest state (it reads it, nobody hands it an old one).
- ``every``: a job on a fixed interval, as a task of its own (no tick arithmetic).
- ``cancel_on_signals``: SIGINT and SIGTERM cancel the calling task (a clean shutdown);
  ``on_signal``: another signal calls a function (SIGHUP: read the configuration again).
- ``expected_error``: the one error of a TaskGroup's group to show a user, if it is one.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable
from typing import NoReturn, TypeVar

E = TypeVar("E", bound=BaseException)


def no_pause(_elapsed: float) -> float:
    return 0.0


def pace(elapsed: float) -> float:
    """Wait as long as the last run took (at most 1 s): a job that gets expensive under a
    burst of changes (thousands of imports) then costs at most half a core."""
    return min(elapsed, 1.0)


class Coalescer:
    """Runs ``job`` after ``wake()``, one run at a time (see the module docstring). After
    each run it waits ``pause(seconds the run took)`` before the next."""

    def __init__(
        self,
        job: Callable[[], Awaitable[None]],
        *,
        pause: Callable[[float], float] = no_pause,
        awake: bool = False,
    ) -> None:
        self._job = job
        self._pause = pause
        self._wanted = asyncio.Event()
        if awake:
            self._wanted.set()

    def wake(self) -> None:
        """Ask for a run (cheap; callable from any callback of the loop)."""
        self._wanted.set()

    async def run(self) -> NoReturn:
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            t0 = time.monotonic()
            await self._job()
            delay = self._pause(time.monotonic() - t0)
            if delay > 0:
                await asyncio.sleep(delay)


async def every(interval: float, job: Callable[[], object], *, first: float = 0.0) -> NoReturn:
    """Call ``job`` after ``first`` seconds, then every ``interval`` seconds, until cancelled
    (an awaitable it returns is awaited). Its exceptions are its own to handle: one that
    escapes ends the task."""
    await asyncio.sleep(first)
    while True:
        result = job()
        if isinstance(result, Awaitable):
            await result
        await asyncio.sleep(interval)


def cancel_on_signals() -> None:
    """SIGINT and SIGTERM cancel the calling task (where the loop supports signal handlers)."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, task.cancel)


def on_signal(sig: signal.Signals, handler: Callable[[], object]) -> None:
    """``sig`` calls ``handler`` in the loop (where the loop supports signal handlers)."""
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(sig, handler)


def expected_error(group: BaseExceptionGroup[BaseException], expected: type[E]) -> E | None:
    """The first ``expected`` error of a TaskGroup's group when every error in it is one
    (a listener that cannot bind, a bad ClusterProperty, ...): the one line to show. A
    group with anything else in it is a bug and keeps its traceback (None)."""
    match, rest = group.split(expected)
    if match is None or rest is not None:
        return None
    first: BaseException = match
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    assert isinstance(first, expected)
    return first
