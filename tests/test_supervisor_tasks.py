"""Tasks survive what happens to the process tree of a real ``supervisor start``."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import count, event_log, wait_for
from supervisor_harness import (
    Launcher,
    config_file,
    configured,
    running,
    wait_for_workers,
    write_config,
)

from actors.models import ScrapingRequest, TaskStatus
from actors.queue import RedisQueue, TaskManager, WorkerMonitor
from config.settings import Settings


@pytest.fixture
async def completions(queue: RedisQueue) -> AsyncIterator[list[dict[str, Any]]]:
    """The events published while the test runs (task.completed ones are counted)."""
    async with event_log(queue) as events:
        yield events


async def all_completed(tasks: TaskManager, ids: list[str], timeout: float) -> None:
    async def done() -> bool:
        return all([await tasks.get_task_status(i) is TaskStatus.COMPLETED for i in ids])

    await wait_for(done, timeout=timeout, interval=0.1, message="every task completed")


async def running_on(queue: RedisQueue, request_id: str, timeout: float = 10) -> int:
    """Wait until the task runs; the pid of the worker process holding its lease."""
    tasks = TaskManager(queue)

    async def started() -> bool:
        return await tasks.get_task_status(request_id) is TaskStatus.RUNNING

    await wait_for(started, timeout=timeout)
    record = await tasks.get_task(request_id)
    assert record is not None
    workers = await WorkerMonitor(queue).get_active_workers()
    return next(int(w["pid"]) for w in workers if w["worker_id"] == record["worker"])


async def test_worker_sigkilled_mid_task_is_redelivered_once_and_the_pool_is_refilled(
    settings: Settings,
    queue: RedisQueue,
    launch: Launcher,
    tmp_path: Path,
    completions: list[dict[str, Any]],
) -> None:
    supervisor = launch(config_file(tmp_path, settings, processes=2))
    await wait_for_workers(queue, supervisor, 2)
    request_id = await queue.enqueue_task(
        ScrapingRequest(script_name="sleep", parameters={"seconds": 1.0})
    )
    pid = await running_on(queue, request_id)
    psutil.Process(pid).kill()

    await all_completed(TaskManager(queue), [request_id], timeout=20)
    await asyncio.sleep(0.5)  # a second completion would be published by now
    assert count(completions, "task.completed", request_id=request_id) == 1
    refilled = await wait_for_workers(queue, supervisor, 2)
    assert pid not in refilled


async def test_crashing_task_completes_on_its_second_attempt_under_the_supervisor(
    settings: Settings,
    queue: RedisQueue,
    launch: Launcher,
    tmp_path: Path,
) -> None:
    supervisor = launch(config_file(tmp_path, settings, processes=2))
    await wait_for_workers(queue, supervisor, 2)
    request_id = await queue.enqueue_task(
        ScrapingRequest(script_name="crash", parameters={"times": 1})
    )
    response = await queue.wait_for_response(request_id, 30)
    assert response.status is TaskStatus.COMPLETED
    assert response.data == {"attempts": 2}


async def test_sigterm_completes_running_tasks_and_leaves_pending_ones_pending(
    settings: Settings,
    queue: RedisQueue,
    launch: Launcher,
    tmp_path: Path,
) -> None:
    config = config_file(tmp_path, settings, processes=1, worker={"concurrency": 1})
    supervisor = launch(config)
    await wait_for_workers(queue, supervisor, 1)
    first, second = await queue.enqueue_many(
        [ScrapingRequest(script_name="sleep", parameters={"seconds": 1.0}) for _ in range(2)]
    )
    await running_on(queue, first)
    supervisor.send(signal.SIGTERM)

    assert await supervisor.exit_code(3 + 5) == 0, supervisor.output()
    tasks = TaskManager(queue)
    assert await tasks.get_task_status(first) is TaskStatus.COMPLETED
    assert await tasks.get_task_status(second) is TaskStatus.PENDING


async def test_child_crashing_at_start_makes_the_supervisor_give_up_with_exit_1(
    settings: Settings,
    queue: RedisQueue,
    launch: Launcher,
    tmp_path: Path,
) -> None:
    (tmp_path / "broken_scripts.py").write_text("raise RuntimeError('broken at import')\n")
    fragile = configured(
        settings,
        worker={"scripts": ["broken_scripts"]},
        supervisor={"max_restarts": 2, "restart_window": 60, "restart_backoff_max": 0.2},
    )
    config = write_config(tmp_path / "scrapeq.toml", fragile, processes=1)
    supervisor = launch(config, env={"PYTHONPATH": str(tmp_path)})
    children: list[psutil.Process] = []

    async def exited() -> bool:
        children.extend(c for c in supervisor.tree() if c not in children)
        return supervisor.process.poll() is not None

    await wait_for(exited, timeout=60, interval=0.1, message="the supervisor gives up")
    assert supervisor.process.returncode == 1, supervisor.output()
    await wait_for(lambda: not any(running(c) for c in children), timeout=2)


async def test_tasks_of_a_sigkilled_supervisor_are_all_finished_by_the_next_one(
    settings: Settings,
    queue: RedisQueue,
    launch: Launcher,
    tmp_path: Path,
    completions: list[dict[str, Any]],
) -> None:
    config = config_file(tmp_path, settings, processes=2, worker={"concurrency": 2})
    first = launch(config)
    await wait_for_workers(queue, first, 2)
    ids = await queue.enqueue_many(
        [ScrapingRequest(script_name="sleep", parameters={"seconds": 0.3}) for _ in range(20)]
    )
    await running_on(queue, ids[0])
    children = first.tree()
    first.process.kill()
    first.process.wait()
    await wait_for(lambda: not any(running(c) for c in children), timeout=2)

    second = launch(config)
    await all_completed(TaskManager(queue), ids, timeout=60)
    await asyncio.sleep(0.5)
    assert second.process.poll() is None, second.output()
    assert all(count(completions, "task.completed", request_id=i) == 1 for i in ids)
