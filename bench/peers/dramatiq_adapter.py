"""Dramatiq under benchmark: ``dramatiq --processes N --threads T``, results stored.

Dramatiq's client API is synchronous; the adapter calls it directly (the
harness runs nothing else meanwhile). Completion is the presence of the result
keys, checked oldest first; results are waited for with
``Message.get_result(block=True)`` (BRPOPLPUSH). Bulk enqueue is
``group(...).run()``, which sends message by message.

| layout | command |
|---|---|
| w1 | ``dramatiq --processes 2 --threads 8`` (the default threads) |
| w3 | ``dramatiq --processes 1 --threads 8`` |
| w4 | ``dramatiq --processes 2 --threads 100`` |
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import dramatiq
from dramatiq.results import ResultTimeout

from bench.common import (
    SLEEP_SECONDS,
    Adapter,
    CommandWorkers,
    KeyCounter,
    TaskKind,
    WorkerLayout,
)
from bench.peers import dramatiq_tasks

LAYOUTS: dict[WorkerLayout, tuple[int, int]] = {"w1": (2, 8), "w3": (1, 8), "w4": (2, 100)}

Message = dramatiq.Message[Any]


class DramatiqAdapter(Adapter[Message]):
    name = "dramatiq"
    bulk_api = "group().run()"

    _app: dramatiq_tasks.DramatiqApp | None = None
    _counter: KeyCounter | None = None
    _keys: list[str] | None = None

    @property
    def app(self) -> dramatiq_tasks.DramatiqApp:
        if self._app is None:
            raise RuntimeError("dramatiq adapter: connect() first")
        return self._app

    async def connect(self, layout: WorkerLayout) -> None:
        self._app = dramatiq_tasks.build(self.url)
        self._counter = KeyCounter(self.url, self.harness)

    async def close(self) -> None:
        if self._counter is not None:
            await self._counter.close()
        if self._app is not None:
            self._app.broker.client.close()
            self._app.backend.client.close()
            self._app = None

    def start_workers(self, layout: WorkerLayout, processes: int | None = None) -> CommandWorkers:
        default_processes, threads = LAYOUTS[layout]
        processes = processes or default_processes
        args = ["--processes", str(processes), "--threads", str(threads)]
        command = [sys.executable, "-m", "dramatiq", "bench.peers.dramatiq_tasks:broker"]
        workers = CommandWorkers(
            [[*command, *args]],
            {dramatiq_tasks.URL_ENV: self.url},
            self.workdir / "workers.log",
        )
        workers.description = f"`dramatiq {' '.join(args)}`, Results(RedisBackend)"
        return workers.start()

    def _message(self, kind: TaskKind, index: int) -> Message:
        if kind == "noop":
            return self.app.noop.message(index)
        return self.app.sleep.message(SLEEP_SECONDS)

    async def enqueue(self, kind: TaskKind, index: int) -> Message:
        return self.app.broker.enqueue(self._message(kind, index))

    async def enqueue_bulk(self, kind: TaskKind, count: int) -> list[Message]:
        messages = [self._message(kind, index) for index in range(count)]
        group = dramatiq.group(messages, broker=self.app.broker)  # type: ignore[no-untyped-call]
        group.run()  # type: ignore[no-untyped-call]
        return messages

    async def done_count(self, handles: Sequence[Message]) -> int:
        if self._counter is None:
            raise RuntimeError("dramatiq adapter: connect() first")
        if self._keys is None or len(self._keys) != len(handles):
            backend = self.app.backend
            self._keys = [backend.build_message_key(message) for message in handles]
        return await self._counter.count(self._keys)

    async def wait(self, handle: Message, timeout: float) -> bool:
        try:
            handle.get_result(backend=self.app.backend, block=True, timeout=int(timeout * 1000))
        except ResultTimeout:
            return False
        return True

    async def result(self, handle: Message) -> object:
        return handle.get_result(backend=self.app.backend)
