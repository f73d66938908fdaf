"""scrapeq under benchmark: worker actor processes started directly, no supervisor.

Workers are spawned the way the supervisor spawns them (``spawn`` start
method, ``actors.runtime.actor_main``), only with their log sent to a file and,
on request, the first one run under cProfile. The noop task is the built-in
``echo`` script with empty parameters, the I/O task the built-in ``sleep``.

| layout | processes | worker.concurrency |
|---|---|---|
| w1 | 2 | 50 (the default) |
| w3 | 1 | 50 (the default) |
| w4 | 2 | 100 |
| memory | 1 | 50 (the default) |
"""

from __future__ import annotations

import cProfile
import logging
import multiprocessing
import os
import signal
from collections.abc import Sequence
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from actors.exceptions import TaskTimeoutException
from actors.lifecycle import die_with_parent
from actors.models import ScrapingRequest, TaskStatus
from actors.queue import RedisQueue, TaskManager, WorkerMonitor
from actors.runtime import ActorSpec, actor_main, configure_child_logging, run_actor
from bench.common import SLEEP_SECONDS, Adapter, TaskKind, WorkerGroup, WorkerLayout, log_tail
from config.settings import Settings

LAYOUTS: dict[WorkerLayout, tuple[int, int]] = {
    "w1": (2, 50),
    "w3": (1, 50),
    "w4": (2, 100),
    "memory": (1, 50),
}
KEY_PREFIX = "bench"


def bench_settings(url: str, concurrency: int = 50) -> Settings:
    return Settings.model_validate(
        {
            "redis": {"url": url, "key_prefix": KEY_PREFIX, "embedded": "never"},
            "worker": {"concurrency": concurrency},
            "supervisor": {"metrics_port": 0},
        }
    )


def run_worker(spec: ActorSpec, log_path: str, profile_path: str | None) -> None:
    """Process target: ``actor_main`` with stdout/stderr sent to ``log_path``.

    With ``profile_path`` the actor runs under cProfile and the stats are
    written there when it stops (before the hard exit ``actor_main`` ends with).
    """
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    if profile_path is None:
        actor_main(spec)
        return
    die_with_parent(spec.parent_pid)
    configure_child_logging(spec.actor_id)
    profiler = cProfile.Profile()
    code = profiler.runcall(run_actor, spec)
    profiler.dump_stats(profile_path)
    logging.shutdown()
    os._exit(code)


class ActorWorkers(WorkerGroup):
    """scrapeq worker actors, each one a spawned process."""

    def __init__(self, settings: Settings, count: int, log: Path, profile: Path | None) -> None:
        self.description = (
            f"{count} x worker actor process, concurrency={settings.worker.concurrency}"
        )
        self.log = log
        context = multiprocessing.get_context("spawn")
        self._processes: list[BaseProcess] = []
        for index in range(count):
            spec = ActorSpec("worker", f"bench-{index}", settings.to_json(), os.getpid())
            profile_path = str(profile) if profile is not None and index == 0 else None
            process = context.Process(target=run_worker, args=(spec, str(log), profile_path))
            process.start()
            self._processes.append(process)

    def pids(self) -> list[int]:
        return [process.pid for process in self._processes if process.pid is not None]

    def check_alive(self) -> None:
        for process in self._processes:
            if not process.is_alive():
                raise RuntimeError(
                    f"worker exited with code {process.exitcode}: {log_tail(self.log)}"
                )

    def stop(self) -> None:
        for process in self._processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)  # drain: finish, report, exit
        for process in self._processes:
            process.join(15)
            if process.is_alive():
                process.kill()
                process.join(5)


class ScrapeqAdapter(Adapter[str]):
    name = "scrapeq"
    bulk_api = "enqueue_many"
    async_producer = True

    def __init__(
        self,
        url: str,
        workdir: Path,
        *,
        profile: Path | None = None,
        domains: int = 0,
        polite: bool = True,
        history: bool = True,
    ) -> None:
        super().__init__(url, workdir)
        self.profile = profile
        self.domains = domains  # > 0: noop tasks name one of this many sites (politeness)
        self.polite = polite  # False: [politeness] off, to tell its cost from the domain's
        self.history = history  # False: no event history, to tell its cost (issue #16)
        if domains:
            self.name = "scrapeq-domains" if polite else "scrapeq-domains-off"
        if not history:
            self.name = "scrapeq-history-off"
        self._queue: RedisQueue | None = None

    @property
    def queue(self) -> RedisQueue:
        if self._queue is None:
            raise RuntimeError("scrapeq adapter: connect() first")
        return self._queue

    async def connect(self, layout: WorkerLayout) -> None:
        settings = bench_settings(self.url)
        if not self.polite:
            settings = settings.model_copy(
                update={
                    "politeness": settings.politeness.model_copy(
                        update={"max_in_flight_per_domain": 0, "adaptive": False}
                    )
                }
            )
        self._queue = RedisQueue(settings)
        await self._queue.connect()
        # What `supervisor start` publishes: the breaker and politeness settings,
        # and the event history it keeps.
        await self._queue.store.set_limits(settings)
        await self._queue.store.keep_history(
            settings.events if self.history else settings.events.model_copy(update={"history": 0})
        )

    async def close(self) -> None:
        if self._queue is not None:
            await self._queue.close()
            self._queue = None

    def start_workers(self, layout: WorkerLayout, processes: int | None = None) -> WorkerGroup:
        default_processes, concurrency = LAYOUTS[layout]
        processes = processes or default_processes
        settings = bench_settings(self.url, concurrency)
        return ActorWorkers(settings, processes, self.workdir / "workers.log", self.profile)

    def request(self, kind: TaskKind, index: int) -> ScrapingRequest:
        if kind == "noop" and self.domains:
            url = f"http://d{index % self.domains}.test/{index}"
            return ScrapingRequest(script_name="echo", parameters={"url": url})
        if kind == "noop":
            return ScrapingRequest(script_name="echo")
        return ScrapingRequest(script_name="sleep", parameters={"seconds": SLEEP_SECONDS})

    async def enqueue(self, kind: TaskKind, index: int) -> str:
        return await self.queue.enqueue_task(self.request(kind, index))

    async def enqueue_bulk(self, kind: TaskKind, count: int) -> list[str]:
        return await self.queue.enqueue_many([self.request(kind, i) for i in range(count)])

    async def done_count(self, handles: Sequence[str]) -> int:
        stats = await TaskManager(self.queue).queue_stats()
        self.harness.add("zcard", 4, reads=0)
        self.harness.add("hgetall")  # one pipeline: one request
        return stats["completed"]

    async def wait(self, handle: str, timeout: float) -> bool:
        try:
            response = await self.queue.wait_for_response(handle, timeout)
        except TaskTimeoutException:
            return False
        return response.status is TaskStatus.COMPLETED

    async def result(self, handle: str) -> object:
        response = await TaskManager(self.queue).get_response(handle)
        return None if response is None else response.data

    def expected(self, kind: TaskKind, index: int) -> object:
        if kind == "noop":
            return dict(self.request(kind, index).parameters)  # echo returns its parameters
        return {"slept": SLEEP_SECONDS}

    async def active_workers(self) -> list[dict[str, Any]]:
        return await WorkerMonitor(self.queue).get_active_workers()
