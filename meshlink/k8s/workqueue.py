"""A keyed work queue with a fixed pool of workers (client-go's workqueue, in asyncio).

A key is queued at most once; a key being processed is never processed concurrently, and
if it is dirtied meanwhile it runs again afterwards. So bursts of events coalesce into one
reconcile per key, and concurrency is bounded by the number of workers. A failed key is
retried with per-key exponential backoff; errors are logged in one line, never raised.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Final, Generic, TypeVar

from meshlink.errors import MeshlinkError

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)

RETRY_MIN: Final = 0.1
RETRY_MAX: Final = 30.0


class WorkQueue(Generic[K]):
    def __init__(
        self,
        name: str,
        process: Callable[[K], Awaitable[None]],
        workers: int = 16,
        *,
        transient: Callable[[Exception], bool] = lambda e: False,
    ):
        """``transient(e)`` True means the error is not about the key (the API server is
        away, say) and is reported elsewhere: the key is retried without a log line."""
        self.name = name
        self.process = process
        self.workers = workers
        self.transient = transient
        self._queue: asyncio.Queue[K] = asyncio.Queue()
        self._queued: set[K] = set()
        self._active: set[K] = set()
        self._rerun: set[K] = set()
        self._failures: dict[K, int] = {}
        self._retry: dict[K, asyncio.TimerHandle] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self.errors = 0

    def add(self, key: K) -> None:
        timer = self._retry.pop(key, None)
        if timer is not None:
            timer.cancel()
        if key in self._active:
            self._rerun.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._queue.put_nowait(key)
        self._idle.clear()

    def __len__(self) -> int:
        return len(self._queued) + len(self._active) + len(self._retry)

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def _check_idle(self) -> None:
        if not len(self):
            self._idle.set()

    def _schedule_retry(self, key: K) -> None:
        n = self._failures.get(key, 0) + 1
        self._failures[key] = n
        delay = min(RETRY_MIN * 2 ** (n - 1), RETRY_MAX)
        loop = asyncio.get_running_loop()
        self._retry[key] = loop.call_later(delay, self._retry_now, key)

    def _retry_now(self, key: K) -> None:
        self._retry.pop(key, None)
        self.add(key)

    async def _worker(self) -> None:
        while True:
            key = await self._queue.get()
            self._queued.discard(key)
            self._active.add(key)
            try:
                await self.process(key)
                self._failures.pop(key, None)
            except asyncio.CancelledError:
                raise
            except MeshlinkError as e:
                self.errors += 1
                if self.transient(e):
                    log.debug("%s %s: %s (will retry)", self.name, key, e)
                elif self._failures.get(key, 0) == 0:
                    log.warning("%s %s: %s (will retry)", self.name, key, e)
                else:
                    log.debug("%s %s failed again: %s", self.name, key, e)
                self._schedule_retry(key)
            except Exception:
                self.errors += 1
                log.exception("%s %s failed (will retry)", self.name, key)
                self._schedule_retry(key)
            finally:
                self._active.discard(key)
                if key in self._rerun:
                    self._rerun.discard(key)
                    self.add(key)
                self._check_idle()

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                for _ in range(self.workers):
                    tg.create_task(self._worker())
        finally:
            for timer in self._retry.values():
                timer.cancel()
            self._retry.clear()
