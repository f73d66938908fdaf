"""The reaper (singleton lease, expired leases) and heartbeat actors, in-process."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

import pytest
from faults.proxy import Proxy
from helpers import admin, count, event_log, looping, wait_for

from actors.backoff import BACKOFF_CAP
from actors.base import Actor
from actors.heartbeat import HeartbeatMonitor
from actors.models import ScrapingRequest, TaskStatus
from actors.queue import RedisQueue, TaskManager, WorkerMonitor
from actors.reaper import LOCK_LEASE, REAP_INTERVAL, Reaper
from actors.store import WORKER_FORGET_MS
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


# -- after an outage ------------------------------------------------------------------------


async def test_workers_silent_through_an_outage_keep_their_tasks_records_and_status(
    settings: Settings, queue: RedisQueue, manager: TaskManager
) -> None:
    """A worker that could not beat while Redis was away is not judged by its old beat.

    The reaper and the heartbeat actor reach Redis through a proxy that the
    test cuts, as if Redis were stopped; meanwhile the worker's last beat and
    its lease are made as old as after a 5-minute outage (longer than a lease,
    longer than the time after which a silent worker is forgotten). Once Redis
    is back, a live worker that beats within the grace (its backoff cap) keeps
    its lease (no rerun), its record (pid, registration) and is never lost.
    """
    monitor = WorkerMonitor(queue)
    await monitor.register_worker("w", pid=4242)
    request_id = await leased_task(queue, "w")
    attempt = int(await admin(queue).hget(queue.keys.task(request_id), "attempt") or 0)
    with Proxy.for_url(settings.redis.url) as proxy:
        via_proxy = settings.model_copy(
            update={"redis": settings.redis.model_copy(update={"url": proxy.url})}
        )
        actors = (
            Reaper("r", via_proxy, os.getppid()),
            HeartbeatMonitor("hb", via_proxy, os.getppid()),
        )
        lost: list[str] = []

        async def beat_and_renew() -> None:  # the worker's own heartbeat loop
            await monitor.update_heartbeat("w", pid=4242)
            lost.extend(await queue.store.renew("w", [(request_id, attempt)]))

        async with event_log(queue) as events, running(*actors):
            async with looping(beat_and_renew, settings.heartbeat.interval):
                await wait_for(lambda: lock_taken(queue), 5, message="the reaper took no lock")
            proxy.set_mode("reset")
            await asyncio.sleep(1.5)  # both actors fail and back off
            seconds, _ = await admin(queue).time()
            silent_since = int(seconds) * 1000 - WORKER_FORGET_MS - 60_000
            await admin(queue).zadd(queue.keys.workers, {"w": silent_since})
            await admin(queue).hset(queue.keys.worker("w"), "last_heartbeat", silent_since)
            await admin(queue).zadd(queue.keys.running, {request_id: 0}, xx=True)
            proxy.set_mode("pass")
            # The actors are back at once; the worker's loops may sleep out their
            # backoff cap first, as the slowest real worker would.
            await asyncio.sleep(BACKOFF_CAP - 0.5)
            async with looping(beat_and_renew, settings.heartbeat.interval):
                await asyncio.sleep(settings.heartbeat.timeout + 2.0)  # past the grace
            record = await admin(queue).hgetall(queue.keys.worker("w"))

    assert lost == []
    assert await manager.get_task_status(request_id) is TaskStatus.RUNNING
    assert count(events, "worker.lost", worker_id="w") == 0
    assert count(events, "task.requeued", request_id=request_id) == 0
    assert record[b"pid"] == b"4242"
    assert b"registered_at" in record
