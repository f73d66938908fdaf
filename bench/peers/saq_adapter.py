"""SAQ under benchmark: ``saq --workers N`` with its ``concurrency`` setting.

Completion is SAQ's own ``Queue.count("incomplete")``; results are waited for
with ``Job.refresh(until_complete=...)`` (pub/sub). SAQ has no bulk enqueue.
The sweep upkeep is held off (see ``connect``).

| layout | command | concurrency |
|---|---|---|
| w1 | ``saq --workers 2`` | 10 (the default) |
| w3 | ``saq --workers 1`` | 10 (the default) |
| w4 | ``saq --workers 2`` | 100 |
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from saq import Job, Status
from saq.queue.redis import RedisQueue

from bench.common import SLEEP_SECONDS, Adapter, CommandWorkers, TaskKind, WorkerLayout
from bench.peers import saq_tasks

LAYOUTS: dict[WorkerLayout, tuple[int, int]] = {"w1": (2, 10), "w3": (1, 10), "w4": (2, 100)}
#: Longer than any one measurement (each runs on a fresh server).
SWEEP_LOCK_SECONDS = 3600


class SaqAdapter(Adapter[Job]):
    name = "saq"
    async_producer = True

    _queue: RedisQueue | None = None

    @property
    def queue(self) -> RedisQueue:
        if self._queue is None:
            raise RuntimeError("saq adapter: connect() first")
        return self._queue

    async def connect(self, layout: WorkerLayout) -> None:
        self._queue = saq_tasks.make_queue(self.url)
        await self._queue.connect()
        # SAQ's start-up sweep races with the first dequeues: it aborts jobs
        # that are in flight, even ones that then complete (perf-peers.md).
        # Holding the sweep lock, as if another worker had just swept, keeps
        # that upkeep out of every measurement.
        await self._queue.redis.set(self._queue.namespace("sweep"), 1, ex=SWEEP_LOCK_SECONDS)

    async def close(self) -> None:
        if self._queue is not None:
            await self._queue.disconnect()
            self._queue = None

    def start_workers(self, layout: WorkerLayout, processes: int | None = None) -> CommandWorkers:
        default_processes, concurrency = LAYOUTS[layout]
        processes = processes or default_processes
        command = [sys.executable, "-m", "saq", "bench.peers.saq_tasks.settings"]
        workers = CommandWorkers(
            [[*command, "--workers", str(processes)]],
            {saq_tasks.URL_ENV: self.url, saq_tasks.CONCURRENCY_ENV: str(concurrency)},
            self.workdir / "workers.log",
        )
        workers.description = f"`saq --workers {processes}`, concurrency={concurrency}"
        return workers.start()

    async def enqueue(self, kind: TaskKind, index: int) -> Job:
        if kind == "noop":
            job = await self.queue.enqueue("noop", i=index)
        else:
            job = await self.queue.enqueue("sleep", seconds=SLEEP_SECONDS)
        if job is None:
            raise RuntimeError(f"saq: task {index} was not enqueued (duplicate key)")
        return job

    async def done_count(self, handles: Sequence[Job]) -> int:
        incomplete = await self.queue.count("incomplete")
        self.harness.add("zcard")
        return len(handles) - incomplete

    async def wait(self, handle: Job, timeout: float) -> bool:
        try:
            await handle.refresh(until_complete=timeout)
        except TimeoutError:
            return False
        return handle.status == Status.COMPLETE

    async def result(self, handle: Job) -> object:
        await handle.refresh()
        return handle.result
