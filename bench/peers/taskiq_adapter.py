"""taskiq under benchmark: ``taskiq worker`` with RedisStreamBroker and result backend.

taskiq has no status counter: completion is the presence of the result keys,
checked oldest first (one multi-key EXISTS per poll). Results are waited for
with ``wait_result(check_interval=5 ms)``: taskiq polls, its default is 200 ms.
Per-task INFO logging is turned off (``--log-level WARNING``). No bulk enqueue.

| layout | command |
|---|---|
| w1 | ``taskiq worker --workers 2 --max-async-tasks 100`` (the default) |
| w3 | ``taskiq worker --workers 1 --max-async-tasks 100`` |
| w4 | ``taskiq worker --workers 2 --max-async-tasks 100`` |
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from taskiq import AsyncTaskiqTask
from taskiq.exceptions import TaskiqResultTimeoutError

from bench.common import (
    SLEEP_SECONDS,
    Adapter,
    CommandWorkers,
    KeyCounter,
    TaskKind,
    WorkerLayout,
)
from bench.peers import taskiq_tasks

LAYOUTS: dict[WorkerLayout, tuple[int, int]] = {"w1": (2, 100), "w3": (1, 100), "w4": (2, 100)}
#: How often ``wait_result`` checks for the result (taskiq's default: 0.2 s).
CHECK_INTERVAL = 0.005

Task = AsyncTaskiqTask[Any]


class TaskiqAdapter(Adapter[Task]):
    name = "taskiq"
    async_producer = True

    _app: taskiq_tasks.TaskiqApp | None = None
    _counter: KeyCounter | None = None
    _keys: list[str] | None = None

    @property
    def app(self) -> taskiq_tasks.TaskiqApp:
        if self._app is None:
            raise RuntimeError("taskiq adapter: connect() first")
        return self._app

    async def connect(self, layout: WorkerLayout) -> None:
        self._app = taskiq_tasks.build(self.url)
        await self._app.broker.startup()  # creates the consumer group before any XADD
        self._counter = KeyCounter(self.url, self.harness)

    async def close(self) -> None:
        if self._counter is not None:
            await self._counter.close()
        if self._app is not None:
            await self._app.broker.shutdown()
            self._app = None

    def start_workers(self, layout: WorkerLayout, processes: int | None = None) -> CommandWorkers:
        default_processes, concurrency = LAYOUTS[layout]
        processes = processes or default_processes
        args = ["--workers", str(processes), "--max-async-tasks", str(concurrency)]
        workers = CommandWorkers(
            [
                [
                    sys.executable,
                    "-m",
                    "taskiq",
                    "worker",
                    "bench.peers.taskiq_tasks:broker",
                    *args,
                    "--log-level",
                    "WARNING",
                ]
            ],
            {taskiq_tasks.URL_ENV: self.url},
            self.workdir / "workers.log",
        )
        workers.description = f"`taskiq worker {' '.join(args)}` (uvloop)"
        return workers.start()

    async def enqueue(self, kind: TaskKind, index: int) -> Task:
        if kind == "noop":
            return await self.app.noop.kiq(index)
        return await self.app.sleep.kiq(SLEEP_SECONDS)

    async def done_count(self, handles: Sequence[Task]) -> int:
        if self._counter is None:
            raise RuntimeError("taskiq adapter: connect() first")
        if self._keys is None or len(self._keys) != len(handles):
            self._keys = [handle.task_id for handle in handles]
        return await self._counter.count(self._keys)

    async def wait(self, handle: Task, timeout: float) -> bool:
        try:
            result = await handle.wait_result(check_interval=CHECK_INTERVAL, timeout=timeout)
        except TaskiqResultTimeoutError:
            return False
        return not result.is_err

    async def result(self, handle: Task) -> object:
        return (await handle.get_result()).return_value
