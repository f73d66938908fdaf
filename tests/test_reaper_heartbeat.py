"""The reaper (singleton lease, expired leases) and heartbeat actors, in-process."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

import pytest
from helpers import admin, count, event_log, looping, wait_for

from actors.base import Actor
from actors.heartbeat import HeartbeatMonitor
from actors.models import ScrapingRequest, TaskStatus
from actors.queue import RedisQueue, TaskManager, WorkerMonitor
from actors.reaper import LOCK_LEASE, REAP_INTERVAL, Reaper
from config.settings import Settings

pytestmark = pytest.mark.usefixtures("restore_signals")


@contextlib.asynccontextmanager
async def running(*actors: Actor) -> AsyncIterator[dict[str, asyncio.Task[int]]]:
    """Run actors on this loop; each one still running at the end is stopped and awaited."""
    mains = {actor.actor_id: asyncio.create_task(actor.main()) for actor in actors}
    try:
        yield mains
    finally:
        for actor in actors:
            actor.request_stop()
        await asyncio.wait_for(asyncio.gather(*mains.values()), 10)


async def lock_holder(queue: RedisQueue) -> str | None:
    """The reaper holding the singleton lease, if any."""
    holder = await admin(queue).get(queue.keys.reaper_lock)
    return holder.decode() if isinstance(holder, bytes) else holder


async def leased_task(queue: RedisQueue, worker_id: str) -> str:
    """A task claimed by ``worker_id``, which will never report on it."""
    request_id = await queue.enqueue_task(ScrapingRequest(script_name="echo"))
    claim = await queue.store.claim(worker_id, 1)
    assert [lease.request_id for lease in claim.leases] == [request_id]
    return request_id


async def lock_taken(queue: RedisQueue) -> bool:
    return await lock_holder(queue) is not None


def reapers(settings: Settings) -> tuple[Reaper, Reaper]:
    # The parent pid is the one an actor watches: ours, as seen from this process.
    return Reaper("r-a", settings, os.getppid()), Reaper("r-b", settings, os.getppid())


# -- reaper ---------------------------------------------------------------------------------


async def test_of_two_reapers_only_one_holds_the_lock(
    settings: Settings, queue: RedisQueue
) -> None:
    async with running(*reapers(settings)):
        await wait_for(lambda: lock_taken(queue), 5, message="no reaper took the lock")
        leader = await lock_holder(queue)
        await asyncio.sleep(3 * REAP_INTERVAL)  # several passes of both

        assert await lock_holder(queue) == leader
        (standby,) = {"r-a", "r-b"} - {leader}
        assert not await queue.store.hold_lock(queue.keys.reaper_lock, standby, LOCK_LEASE)


async def test_expired_lease_is_requeued_exactly_once_with_two_reapers(
    settings: Settings, queue: RedisQueue, manager: TaskManager
) -> None:
    request_id = await leased_task(queue, "ghost")
    async with event_log(queue) as events, running(*reapers(settings)):
        await admin(queue).zadd(queue.keys.running, {request_id: 0}, xx=True)

        async def requeued() -> bool:
            return await manager.get_task_status(request_id) is TaskStatus.PENDING

        await wait_for(requeued, 5, message="the expired lease was never requeued")
        await asyncio.sleep(3 * REAP_INTERVAL)  # several more passes of both

    assert count(events, "task.requeued", request_id=request_id) == 1
    task = await manager.get_task(request_id)
    assert task is not None
    assert (task["status"], task["attempt"]) == ("pending", 1)
    assert "worker" not in task


async def test_standby_reaper_takes_over_when_the_leader_stops(
    settings: Settings, queue: RedisQueue
) -> None:
    first, second = reapers(settings)
    async with running(first, second) as mains:
        await wait_for(lambda: lock_taken(queue), 5, message="no reaper took the lock")
        leader, standby = (first, second) if await lock_holder(queue) == "r-a" else (second, first)
        leader.request_stop()
        await mains[leader.actor_id]

        async def taken_over() -> bool:
            return await lock_holder(queue) == standby.actor_id

        await wait_for(taken_over, LOCK_LEASE, message="the standby never took over")

        request_id = await leased_task(queue, "ghost")
        await admin(queue).zadd(queue.keys.running, {request_id: 0}, xx=True)

        async def requeued() -> bool:
            return await TaskManager(queue).get_task_status(request_id) is TaskStatus.PENDING

        await wait_for(requeued, 5, message="the new leader does not reap")


async def test_lock_left_by_a_dead_leader_is_taken_once_its_lease_runs_out(
    settings: Settings, queue: RedisQueue
) -> None:
    await admin(queue).set(queue.keys.reaper_lock, "r-dead", px=1000)
    async with running(*reapers(settings)):
        await asyncio.sleep(0.5)
        assert await lock_holder(queue) == "r-dead"

        async def taken_over() -> bool:
            return await lock_holder(queue) in ("r-a", "r-b")

        await wait_for(taken_over, 1 + 2 * REAP_INTERVAL, message="the lock was never taken over")


# -- heartbeat monitor ----------------------------------------------------------------------


async def test_silent_worker_is_marked_lost_once_and_its_task_requeued(
    settings: Settings, queue: RedisQueue, manager: TaskManager
) -> None:
    monitor = WorkerMonitor(queue)
    await monitor.register_worker("silent")
    await monitor.register_worker("alive")
    request_id = await leased_task(queue, "silent")

    async def beat() -> None:
        await monitor.update_heartbeat("alive")

    async with (
        looping(beat, settings.heartbeat.interval),
        event_log(queue) as events,
        running(HeartbeatMonitor("hb", settings, os.getppid())),
    ):

        async def requeued() -> bool:
            return await manager.get_task_status(request_id) is TaskStatus.PENDING

        await wait_for(requeued, 3, message="the silent worker's task was not requeued")
        await asyncio.sleep(5 * settings.heartbeat.interval)  # several more passes
        workers = {w["worker_id"]: w for w in await monitor.get_active_workers()}

    assert count(events, "worker.lost", worker_id="silent") == 1
    assert count(events, "worker.lost", worker_id="alive") == 0
    assert count(events, "task.requeued", request_id=request_id) == 1
    assert workers["silent"]["status"] == "inactive"
    assert workers["alive"]["status"] == "active"
