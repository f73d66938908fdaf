"""huey under benchmark: ``huey_consumer`` (RedisHuey, results stored).

huey's client API is synchronous; the adapter calls it directly. Completion is
huey's own ``result_count()``; results are waited for with
``Result.get(blocking=True)`` on a ``notify_result=True`` instance (BLPOP on a
per-task list; huey's default polls from 50 ms with backoff). Per-task INFO
logging is turned off (``-q``). Bulk enqueue is ``Task.map()``, which sends
task by task.

| layout | consumers |
|---|---|
| w1 | 1 x ``huey_consumer -k process -w 2`` (consumer + 2 worker processes) |
| w3 | 1 x ``huey_consumer -k thread -w 1``, notify_result=True |
| w4 | 2 x ``huey_consumer -k thread -w 100`` |
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from huey.exceptions import ResultTimeout  # type: ignore[import-untyped]

from bench.common import SLEEP_SECONDS, Adapter, CommandWorkers, TaskKind, WorkerLayout
from bench.peers import huey_tasks

#: Per layout: (consumers, worker type, workers per consumer).
LAYOUTS: dict[WorkerLayout, tuple[int, str, int]] = {
    "w1": (1, "process", 2),
    "w3": (1, "thread", 1),
    "w4": (2, "thread", 100),
}

Result = Any  # huey is untyped


class HueyAdapter(Adapter[Result]):
    name = "huey"
    bulk_api = "Task.map()"

    _app: huey_tasks.HueyApp | None = None

    @property
    def app(self) -> huey_tasks.HueyApp:
        if self._app is None:
            raise RuntimeError("huey adapter: connect() first")
        return self._app

    async def connect(self, layout: WorkerLayout) -> None:
        self._app = huey_tasks.build(self.url, notify=layout == "w3")

    async def close(self) -> None:
        if self._app is not None:
            self._app.huey.storage.conn.close()
            self._app = None

    def start_workers(self, layout: WorkerLayout, processes: int | None = None) -> CommandWorkers:
        consumers, kind, count = LAYOUTS[layout]
        if processes and kind == "process":
            count = processes  # one consumer with that many worker processes
        args = ["-k", kind, "-w", str(count)]
        command = [sys.executable, "-m", "huey.bin.huey_consumer", "bench.peers.huey_tasks.huey"]
        env = {huey_tasks.URL_ENV: self.url, huey_tasks.NOTIFY_ENV: "1" if layout == "w3" else "0"}
        workers = CommandWorkers(
            [[*command, *args, "-q"] for _ in range(consumers)], env, self.workdir / "workers.log"
        )
        notify = ", notify_result=True" if layout == "w3" else ""
        workers.description = f"{consumers} x `huey_consumer {' '.join(args)}`{notify}"
        return workers.start()

    def _task(self, kind: TaskKind) -> Any:
        return self.app.noop if kind == "noop" else self.app.sleep

    async def enqueue(self, kind: TaskKind, index: int) -> Result:
        return self._task(kind)(index if kind == "noop" else SLEEP_SECONDS)

    async def enqueue_bulk(self, kind: TaskKind, count: int) -> list[Result]:
        args = range(count) if kind == "noop" else [SLEEP_SECONDS] * count
        return list(self._task(kind).map(args))

    async def done_count(self, handles: Sequence[Result]) -> int:
        self.harness.add("hlen")
        return int(self.app.huey.result_count())

    async def wait(self, handle: Result, timeout: float) -> bool:
        try:
            handle.get(blocking=True, timeout=timeout)
        except ResultTimeout:
            return False
        return True

    async def result(self, handle: Result) -> object:
        value: object = handle.get(preserve=True)
        return value
