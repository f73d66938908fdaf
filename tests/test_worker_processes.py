"""Actor processes started as the supervisor starts them (spawn + actor_main), under faults."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import admin, count, event_log, wait_for
from supervisor_harness import Launcher, config_file, configured, wait_for_workers

from actors.exit_codes import ChildExit
from actors.models import ScrapingRequest, TaskStatus
from actors.queue import RedisQueue, TaskManager, WorkerMonitor
from actors.runtime import ActorSpec, actor_main
from config.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
SPAWN = multiprocessing.get_context("spawn")
#: Each actor is a fresh interpreter: slow CI machines need a while to start one.
START_TIMEOUT = 20.0

Spawn = Callable[[str, str], BaseProcess]


@pytest.fixture
def spawn(settings: Settings) -> Iterator[Spawn]:
    """Start actors as the supervisor does; every one is killed and joined afterwards."""
    started: list[BaseProcess] = []

    def start(kind: str, actor_id: str) -> BaseProcess:
        spec = ActorSpec(kind, actor_id, settings.to_json(), os.getpid())
        process = SPAWN.Process(target=actor_main, args=(spec,), name=actor_id)
        process.start()
        started.append(process)
        return process

    yield start
    for process in started:
        if process.is_alive():
            process.kill()  # SIGKILL also ends a SIGSTOPped process
        process.join(5)


async def workers_up(queue: RedisQueue, *actor_ids: str) -> None:
    monitor = WorkerMonitor(queue)

    async def registered() -> bool:
        known = {w["worker_id"] for w in await monitor.get_active_workers()}
        return set(actor_ids) <= known

    await wait_for(registered, START_TIMEOUT, message=f"{actor_ids} never registered")


async def holder_of(queue: RedisQueue, request_id: str) -> str:
    """The worker running the task, once one has claimed it."""
    key = queue.keys.task(request_id)

    async def claimed() -> bool:
        return await admin(queue).hget(key, "worker") is not None

    await wait_for(claimed, 10, message=f"{request_id} was never claimed")
    worker = await admin(queue).hget(key, "worker")
    assert isinstance(worker, bytes)
    return worker.decode()


async def status_is(manager: TaskManager, request_id: str, status: TaskStatus) -> None:
    async def reached() -> bool:
        return await manager.get_task_status(request_id) is status

    await wait_for(reached, 10, message=f"{request_id} never became {status}")


async def enqueue(queue: RedisQueue, script_name: str, **parameters: Any) -> str:
    return await queue.enqueue_task(ScrapingRequest(script_name=script_name, parameters=parameters))


def is_gone(pid: int) -> bool:
    """True once ``pid`` has exited (an unreaped zombie counts: it runs nothing)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# -- crashes and kills ----------------------------------------------------------------------


async def test_task_that_crashes_its_worker_completes_on_the_other_worker(
    spawn: Spawn, queue: RedisQueue
) -> None:
    workers = [spawn("worker", "w-a"), spawn("worker", "w-b")]
    spawn("heartbeat", "hb")
    await workers_up(queue, "w-a", "w-b")

    request_id = await enqueue(queue, "crash", times=1)
    response = await queue.wait_for_response(request_id, 15)

    assert response.status is TaskStatus.COMPLETED
    assert response.data == {"attempts": 2}
    await wait_for(lambda: any(not w.is_alive() for w in workers), 5)
    assert [w.exitcode for w in workers if w.exitcode is not None] == [1]


async def test_task_of_a_sigkilled_worker_is_redelivered_and_completes_once(
    spawn: Spawn, queue: RedisQueue, manager: TaskManager
) -> None:
    workers = {"w-a": spawn("worker", "w-a"), "w-b": spawn("worker", "w-b")}
    spawn("heartbeat", "hb")
    await workers_up(queue, *workers)

    async with event_log(queue) as events:
        request_id = await enqueue(queue, "sleep", seconds=2)
        holder = await holder_of(queue, request_id)
        workers[holder].kill()
        response = await queue.wait_for_response(request_id, 15)
        await wait_for(lambda: count(events, "task.completed", request_id=request_id) > 0, 3)

    assert response.status is TaskStatus.COMPLETED
    assert count(events, "worker.lost", worker_id=holder) == 1
    assert count(events, "task.completed", request_id=request_id) == 1
    assert (await manager.queue_stats())["completed"] == 1
    task = await manager.get_task(request_id)
    assert task is not None
    assert task["worker"] != holder
    assert task["attempt"] == 2


async def test_late_completion_of_a_stopped_worker_is_refused(
    spawn: Spawn, queue: RedisQueue, manager: TaskManager
) -> None:
    workers = {"w-a": spawn("worker", "w-a"), "w-b": spawn("worker", "w-b")}
    spawn("heartbeat", "hb")
    await workers_up(queue, *workers)
    monitor = WorkerMonitor(queue)

    async with event_log(queue) as events:
        request_id = await enqueue(queue, "sleep", seconds=1.5)
        holder = await holder_of(queue, request_id)
        (other,) = set(workers) - {holder}
        stopped = workers[holder].pid
        assert stopped is not None
        os.kill(stopped, signal.SIGSTOP)  # past its 1 s lease: taken over by the other
        try:
            response = await queue.wait_for_response(request_id, 15)
        finally:
            os.kill(stopped, signal.SIGCONT)

        async def stopped_one_finished_its_run() -> bool:
            # Back and beating with nothing running: its stale run either
            # finished (and its report was refused) or was stopped when the
            # renewal found the lease lost; either way it is over.
            found = {w["worker_id"]: w for w in await monitor.get_active_workers()}
            record = found[holder]
            return record["status"] == "active" and record.get("running") == "0"

        await wait_for(stopped_one_finished_its_run, 5)
        await asyncio.sleep(0.5)  # room for a wrongly accepted report to show up

    assert response.status is TaskStatus.COMPLETED
    assert count(events, "task.completed", request_id=request_id) == 1
    assert count(events, "task.completed", request_id=request_id, worker_id=other) == 1
    task = await manager.get_task(request_id)
    assert task is not None
    assert (task["status"], task["worker"]) == ("completed", other)
    assert (await manager.queue_stats())["completed"] == 1


# -- signals --------------------------------------------------------------------------------


async def test_sigterm_lets_the_running_task_finish_then_exits_zero(
    spawn: Spawn, queue: RedisQueue, manager: TaskManager
) -> None:
    worker = spawn("worker", "w1")
    request_id = await enqueue(queue, "sleep", seconds=1)
    await status_is(manager, request_id, TaskStatus.RUNNING)
    worker.terminate()
    await asyncio.to_thread(worker.join, 10)

    assert worker.exitcode == ChildExit.OK
    assert await manager.get_task_status(request_id) is TaskStatus.COMPLETED


async def test_sigusr1_exits_zero_at_once_and_hands_the_task_back(
    spawn: Spawn, queue: RedisQueue, manager: TaskManager
) -> None:
    worker = spawn("worker", "w1")
    request_id = await enqueue(queue, "sleep", seconds=30)
    await status_is(manager, request_id, TaskStatus.RUNNING)
    assert worker.pid is not None
    signalled = time.monotonic()
    os.kill(worker.pid, signal.SIGUSR1)
    await asyncio.to_thread(worker.join, 5)

    assert worker.exitcode == ChildExit.OK
    assert time.monotonic() - signalled < 2
    task = await manager.get_task(request_id)
    assert task is not None
    assert (task["status"], task["attempt"]) == ("pending", 0)


_INTERMEDIATE = """
import multiprocessing, os, sys, time
from actors.runtime import ActorSpec, actor_main

spec = ActorSpec("worker", "orphan", sys.argv[1], os.getpid())
actor = multiprocessing.get_context("spawn").Process(target=actor_main, args=(spec,))
actor.start()
print(actor.pid, flush=True)
time.sleep(60)
"""


async def test_actor_exits_when_its_parent_is_killed(
    settings: Settings, queue: RedisQueue, tmp_path: Path
) -> None:
    with (tmp_path / "intermediate.log").open("wb") as log:
        parent = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _INTERMEDIATE,
            settings.to_json(),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
        )
    actor_pid = 0
    try:
        assert parent.stdout is not None
        actor_pid = int(await asyncio.wait_for(parent.stdout.readline(), START_TIMEOUT))
        await workers_up(queue, "orphan")
        parent.kill()
        await parent.wait()

        await wait_for(lambda: is_gone(actor_pid), 2, message="the orphaned actor lives on")
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()
        if actor_pid and not is_gone(actor_pid):
            os.kill(actor_pid, signal.SIGKILL)


async def test_a_recycled_worker_ends_the_processes_its_scripts_left_running(
    settings: Settings, queue: RedisQueue, launch: Launcher, tmp_path: Path
) -> None:
    recycling = configured(
        settings, worker={"scripts": ["faults.misbehaving"], "max_tasks_per_child": 1}
    )
    config = config_file(tmp_path, recycling, processes=1)
    supervisor = launch(config, env={"PYTHONPATH": str(Path(__file__).parent)})
    await wait_for_workers(queue, supervisor, 1)

    request_id = await queue.enqueue_task(ScrapingRequest(script_name="spawn"))
    response = await queue.wait_for_response(request_id, 20)

    assert response.data is not None
    left = response.data["pid"]
    await wait_for(
        lambda: gone(left),
        15,
        message=f"sleep {left} outlived its recycled worker\n{supervisor.output()}",
    )


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
