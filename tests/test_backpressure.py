"""Backpressure at enqueue (docs/backpressure.md): the hard cap, the governor's states.

The enqueue script enforces ``high_watermark`` itself and reads the governor's
published state atomically with the write; these tests check both through
the public queue API, through ``supervisor submit``, and end to end under a
producer much faster than the workers with a real Governor and Worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from helpers import admin, looping
from supervisor_harness import configured, write_config

from actors.exceptions import BackpressureException
from actors.governor import Governor
from actors.models import ScrapingRequest, TaskStatus
from actors.queue import RedisQueue, TaskManager, time_ms
from actors.worker import Worker
from config.settings import Settings
from supervisor.cli import run

pytestmark = pytest.mark.usefixtures("restore_signals")


def capped(settings: Settings, high: int, **backpressure: Any) -> Settings:
    """``settings`` with ``high_watermark = high`` (and the other watermarks below it)."""
    values = {"high_watermark": high, "low_watermark": high // 2, "throttle_at": high}
    return configured(settings, backpressure={**values, **backpressure})


def tasks(n: int, **fields: Any) -> list[ScrapingRequest]:
    return [ScrapingRequest(script_name="echo", **fields) for _ in range(n)]


async def depth(queue: RedisQueue) -> int:
    """pending + gated, read in one transaction as the enqueue script sees it."""
    pipe = admin(queue).pipeline(transaction=True)
    pipe.zcard(queue.keys.pending)
    pipe.hget(queue.keys.stats, "gated")
    pending, gated = await pipe.execute()
    return int(pending) + int(gated or 0)


async def stored(queue: RedisQueue, requests: list[ScrapingRequest]) -> int:
    """How many of ``requests`` have a task record."""
    return int(await admin(queue).exists(*(queue.keys.task(r.request_id) for r in requests)))


@pytest.fixture
async def queue50(settings: Settings) -> AsyncIterator[RedisQueue]:
    """A queue whose high watermark is 50."""
    async with RedisQueue(capped(settings, 50)) as queue:
        yield queue


# -- the hard cap ---------------------------------------------------------------------------


async def test_enqueue_past_the_high_watermark_is_refused_with_a_retry_after(
    queue50: RedisQueue,
) -> None:
    await queue50.enqueue_many(tasks(50))
    refused = tasks(1)[0]

    with pytest.raises(BackpressureException) as caught:
        await queue50.enqueue_task(refused)

    assert caught.value.retry_after > 0
    assert await stored(queue50, [refused]) == 0
    assert await depth(queue50) == 50


async def test_batch_that_would_cross_the_cap_is_refused_whole_and_one_that_fits_is_not(
    queue50: RedisQueue,
) -> None:
    await queue50.enqueue_many(tasks(45))
    too_many, fitting = tasks(10), tasks(5)

    with pytest.raises(BackpressureException):
        await queue50.enqueue_many(too_many)
    await queue50.enqueue_many(fitting)

    assert await stored(queue50, too_many) == 0
    assert await stored(queue50, fitting) == 5
    assert await depth(queue50) == 50


async def test_tasks_waiting_in_rate_limit_gates_count_toward_the_cap(
    settings: Settings, queue50: RedisQueue, manager: TaskManager
) -> None:
    await queue50.store.set_limits(configured(settings, rate_limits={"domain:a.test": 1.0}))
    await queue50.enqueue_many(tasks(50, parameters={"url": "http://a.test/"}))
    assert await admin(queue50).zcard(queue50.keys.pending) == 0  # all gated

    with pytest.raises(BackpressureException):
        await queue50.enqueue_task(tasks(1, parameters={"url": "http://b.test/"})[0])

    assert (await manager.queue_stats())["pending"] == 50


async def test_retry_after_of_a_cap_refusal_is_the_time_the_drain_needs_to_make_room(
    queue50: RedisQueue,
) -> None:
    await queue50.enqueue_many(tasks(50))
    await queue50.store.publish_backpressure("open", 50, 0.0, 10.0)  # draining 10 tasks/s

    with pytest.raises(BackpressureException) as caught:
        await queue50.enqueue_many(tasks(30))

    assert caught.value.retry_after == pytest.approx(3.0)  # 30 over the cap at 10/s


# -- the governor's published state ---------------------------------------------------------


async def test_closed_state_refuses_every_enqueue_and_writes_nothing(queue: RedisQueue) -> None:
    await queue.store.publish_backpressure("closed", 10, 0.0, 5.0)
    one, batch = tasks(1), tasks(3)

    for requests in (one, batch):
        with pytest.raises(BackpressureException) as caught:
            await queue.enqueue_many(requests)
        assert caught.value.retry_after > 0
        assert await stored(queue, requests) == 0
    assert await depth(queue) == 0


async def test_throttled_state_admits_single_enqueues_at_about_its_rate(
    queue: RedisQueue,
) -> None:
    rate, seconds = 20.0, 1.5
    await queue.store.publish_backpressure("throttled", 60000, rate, 10.0)
    accepted, waits = 0, []

    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while loop.time() < deadline:
        try:
            await queue.enqueue_task(tasks(1)[0])
            accepted += 1
        except BackpressureException as exc:
            waits.append(exc.retry_after)
        await asyncio.sleep(0.001)

    expected = max(1, rate / 10) + rate * seconds  # a full bucket, then the rate
    assert 0.7 * expected <= accepted <= 1.1 * expected  # a stalled loop only loses tokens
    assert waits
    assert all(0 < wait <= 1 / rate + 0.001 for wait in waits)


@pytest.mark.parametrize(("age", "refused"), [(0.0, True), (4.0, True), (6.0, False)])
async def test_a_closed_state_older_than_stale_after_is_ignored(
    queue: RedisQueue, age: float, refused: bool
) -> None:
    await queue.store.publish_backpressure("closed", 10, 0.0, 5.0)
    published_at = time_ms(await queue.connection.execute("TIME")) - int(age * 1000)
    await admin(queue).hset(queue.keys.backpressure, "updated_at", published_at)
    request = tasks(1)[0]

    if refused:  # stale_after is 5 s by default
        with pytest.raises(BackpressureException):
            await queue.enqueue_task(request)
    else:
        await queue.enqueue_task(request)

    assert await stored(queue, [request]) == (0 if refused else 1)


async def test_submit_exits_4_and_prints_the_retry_after_when_refused(
    settings: Settings,
    queue: RedisQueue,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = write_config(tmp_path / "capped.toml", capped(settings, 3), processes=0)
    await queue.enqueue_many(tasks(3))

    code = await asyncio.to_thread(run, ["submit", "echo", "--config", str(config)])

    assert code == 4
    assert "retry after 1.00s" in capsys.readouterr().err
    assert await depth(queue) == 3


# -- end to end: a fast producer, slow workers, the governor running --------------------------


@contextlib.asynccontextmanager
async def actors(settings: Settings) -> AsyncIterator[None]:
    """A Governor and a Worker actor on this loop until the block ends."""
    running = [Governor("g1", settings, os.getppid()), Worker("w1", settings, os.getppid())]
    mains = [asyncio.create_task(actor.main()) for actor in running]
    try:
        yield
    finally:
        for actor in running:
            actor.request_stop()
        await asyncio.wait_for(asyncio.gather(*mains), 15)


async def test_fast_producers_never_push_the_depth_past_the_high_watermark(
    settings: Settings,
) -> None:
    high, seconds = 150, 3.0
    slow = configured(
        capped(settings, high, low_watermark=75, throttle_at=100), worker={"concurrency": 10}
    )
    accepted: list[str] = []
    waits: list[float] = []
    depths: list[int] = []

    async def produce(until: float) -> None:
        while time.monotonic() < until:
            batch = [
                ScrapingRequest(script_name="sleep", parameters={"seconds": 0.05}) for _ in range(5)
            ]
            try:
                accepted.extend(await queue.enqueue_many(batch))
            except BackpressureException as exc:
                waits.append(exc.retry_after)
                await asyncio.sleep(min(exc.retry_after, 0.01))  # impatient

    async def sample() -> None:
        depths.append(await depth(queue))

    async with RedisQueue(slow) as queue, actors(slow):
        async with looping(sample, 0.001):
            until = time.monotonic() + seconds
            await asyncio.gather(*(produce(until) for _ in range(4)))

            manager = TaskManager(queue)

            async def drained() -> bool:
                return (await manager.queue_stats())["completed"] >= len(accepted)

            loop = asyncio.get_running_loop()
            deadline = loop.time() + 15
            while not await drained():
                assert loop.time() < deadline, "accepted tasks did not all complete"
                await asyncio.sleep(0.05)
        statuses = [await manager.get_task_status(rid) for rid in accepted]

    overshoot = max(depths) - high
    print(
        f"\nbackpressure e2e: {len(accepted)} accepted, {len(waits)} refused, "
        f"{len(depths)} samples, max depth {max(depths)} (overshoot {overshoot})"
    )
    assert overshoot <= 0
    assert max(depths) >= 100  # the producers did reach the throttled zone
    assert waits
    assert all(wait > 0 for wait in waits)
    assert statuses == [TaskStatus.COMPLETED] * len(accepted)
