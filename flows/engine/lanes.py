"""Stage 2: lanes: the warm threads a worker runs flow runs in.

Each lane is one thread with its own asyncio event loop and one async and one sync Prefect client,
opened when the lane starts and kept for the worker's life (``AsyncClientContext`` and
``SyncClientContext``, which Prefect's flow engine and tasks reuse when they find them). So a
resumed run costs only its API calls: no fresh interpreter, no event loop, no HTTP client with
its TLS set-up per resume (40-100 ms each here), which is where a resume's time went before
(``Pending -> Running`` 0.4-1.8 s in bench/engine.py). One flow run at a time per lane: the flow
does blocking database work, so runs in parallel need lanes in parallel.

Each flow run executes in a task of its own (a copy of the lane's context), so nothing one run
leaves in a context variable reaches the next.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import Any

__all__ = ["Lane", "Lanes"]

log = logging.getLogger("sopflow.lanes")

Work = Callable[[], Awaitable[Any]]


class Lane:
    """One warm thread; ``submit`` runs a coroutine function on its loop and returns a Future."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.loop = asyncio.new_event_loop()
        self._inbox: asyncio.Queue[tuple[Work, Future[Any]] | None] | None = None
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"run-sop-{index}", daemon=True)
        self.thread.start()
        self._ready.wait()
        if self._failed is not None:
            raise self._failed

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._main())
        finally:
            self.loop.close()

    async def _main(self) -> None:
        from prefect.context import AsyncClientContext, SyncClientContext

        try:
            sync_ctx = SyncClientContext.get_or_create()
            sync_ctx.__enter__()
        except BaseException as exc:  # e.g. no API URL: say so to whoever built the lane
            self._failed = exc
            self._ready.set()
            return
        try:
            async with AsyncClientContext.get_or_create():
                self._inbox = asyncio.Queue()
                self._ready.set()
                while (item := await self._inbox.get()) is not None:
                    work, future = item
                    if not future.set_running_or_notify_cancel():
                        continue
                    try:
                        # A task of its own: a copy of this context (the clients), nothing of the last run.
                        future.set_result(await asyncio.create_task(work()))  # type: ignore[arg-type]
                    except BaseException as exc:
                        future.set_exception(exc)
        finally:
            sync_ctx.__exit__(None, None, None)

    def submit(self, work: Work) -> Future[Any]:
        future: Future[Any] = Future()
        inbox = self._inbox
        if inbox is None:
            raise RuntimeError(f"lane {self.index} is not running")
        self.loop.call_soon_threadsafe(inbox.put_nowait, (work, future))
        return future

    def stop(self) -> None:
        if self._inbox is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._inbox.put_nowait, None)


class Lanes:
    """A fixed set of lanes, started one by one as they are first needed; ``run`` gives work to the
    idle lane used last (its connections are open and warm), or None when all are busy."""

    def __init__(self, count: int) -> None:
        self._count = count
        self._all: list[Lane] = []
        self._idle: list[Lane] = []
        self._lock = threading.Lock()

    @property
    def free(self) -> int:
        with self._lock:
            return len(self._idle) + self._count - len(self._all)

    def _take(self) -> Lane | None:
        with self._lock:
            if self._idle:
                return self._idle.pop()  # the most recently used: warm
            if len(self._all) < self._count:
                lane = Lane(len(self._all))
                self._all.append(lane)
                return lane
            return None

    def run(self, work: Work, done: Callable[[Future[Any]], None]) -> Future[Any] | None:
        lane = self._take()
        if lane is None:
            return None
        future = lane.submit(work)

        def _back(f: Future[Any]) -> None:
            with self._lock:
                self._idle.append(lane)  # free again before ``done`` runs: it may claim the next run
            done(f)

        future.add_done_callback(_back)
        return future

    def stop(self, wait: bool = True) -> None:
        for lane in self._all:
            lane.stop()
        if wait:
            for lane in self._all:
                lane.thread.join(timeout=60)
