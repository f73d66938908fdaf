"""The backpressure governor: its pure decisions, and the actor run in-process."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
from helpers import admin, event_log, wait_for
from supervisor_harness import configured

from actors.exceptions import BackpressureException
from actors.governor import INTERVAL, MIN_RATE, Governor, admitted_rate, decide_state
from actors.models import ScrapingRequest
from actors.queue import RedisQueue
from config.settings import BackpressureSettings, Settings

pytestmark = pytest.mark.usefixtures("restore_signals")

LIMITS = BackpressureSettings(high_watermark=100, low_watermark=60, throttle_at=50)


# -- decide_state and admitted_rate ---------------------------------------------------------


@pytest.mark.parametrize(
    ("previous", "depth", "expected"),
    [
        ("", 0, "open"),
        ("open", 49, "open"),
        ("open", 50, "throttled"),
        ("open", 99, "throttled"),
        ("open", 100, "closed"),
        ("", 150, "closed"),
        ("throttled", 100, "closed"),
        ("throttled", 49, "open"),
        ("closed", 99, "closed"),  # hysteresis: closed until below low_watermark
        ("closed", 60, "closed"),
        ("closed", 59, "throttled"),
        ("closed", 10, "open"),
    ],
)
def test_decide_state_closes_at_the_high_watermark_and_reopens_below_the_low(
    previous: str, depth: int, expected: str
) -> None:
    assert decide_state(previous, depth, LIMITS) == expected


def test_throttle_at_equal_to_the_high_watermark_never_throttles() -> None:
    no_throttle = BackpressureSettings(high_watermark=100, low_watermark=60, throttle_at=100)

    assert [decide_state("open", depth, no_throttle) for depth in (0, 99, 100)] == [
        "open",
        "open",
        "closed",
    ]


@pytest.mark.parametrize(
    ("depth", "drain", "expected"),
    [
        (50, 40.0, 80.0),  # 2x the drain rate at throttle_at
        (75, 40.0, 40.0),  # halfway: the drain rate itself
        (100, 40.0, MIN_RATE),  # at the high watermark
        (150, 40.0, MIN_RATE),
        (60, 0.0, MIN_RATE),  # nothing drains: still a trickle
    ],
)
def test_admitted_rate_falls_linearly_from_twice_the_drain_to_the_minimum(
    depth: int, drain: float, expected: float
) -> None:
    assert admitted_rate(depth, drain, LIMITS) == pytest.approx(expected)


@pytest.mark.parametrize("drain", [0.0, 0.5, 7.0, 1000.0])
def test_admitted_rate_never_rises_with_depth_nor_falls_below_the_minimum(drain: float) -> None:
    rates = [admitted_rate(depth, drain, LIMITS) for depth in range(0, 130)]

    assert all(later <= earlier for earlier, later in itertools.pairwise(rates))
    assert min(rates) >= MIN_RATE


# -- the actor ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def governing(settings: Settings) -> AsyncIterator[Governor]:
    """A Governor actor on this loop until the block ends."""
    governor = Governor("g1", settings, os.getppid())
    main = asyncio.create_task(governor.main())
    try:
        yield governor
    finally:
        governor.request_stop()
        await asyncio.wait_for(main, 10)


def state_changes(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The backpressure.changed events among ``events``."""
    return [e for e in events if e["event"] == "backpressure.changed"]


def tasks(n: int) -> list[ScrapingRequest]:
    return [ScrapingRequest(script_name="echo") for _ in range(n)]


async def published_state(queue: RedisQueue) -> str:
    state: Any = await admin(queue).hget(queue.keys.backpressure, "state")
    return state.decode() if state else ""


async def test_every_state_change_publishes_backpressure_changed_and_only_changes_do(
    settings: Settings,
) -> None:
    watermarks = configured(
        settings, backpressure={"high_watermark": 20, "low_watermark": 5, "throttle_at": 10}
    )
    async with (
        RedisQueue(watermarks) as queue,
        event_log(queue) as events,
        governing(watermarks),
    ):
        await wait_for(lambda: len(state_changes(events)) == 1, 5, message="no first state")
        await queue.enqueue_many(tasks(12))
        await wait_for(lambda: len(state_changes(events)) == 2, 5, message="never throttled")
        await queue.enqueue_many(tasks(8))  # a fresh bucket admits one whole batch
        await wait_for(lambda: len(state_changes(events)) == 3, 5, message="never closed")

        await queue.store.claim("w1", 12)  # depth 8: above low_watermark
        await asyncio.sleep(4 * INTERVAL)
        assert await published_state(queue) == "closed"
        assert len(state_changes(events)) == 3
        await queue.store.claim("w1", 5)  # depth 3
        await wait_for(lambda: len(state_changes(events)) == 4, 5, message="never reopened")

    seen = state_changes(events)

    assert [(e["previous"], e["state"]) for e in seen] == [
        ("", "open"),
        ("open", "throttled"),
        ("throttled", "closed"),
        ("closed", "open"),
    ]
    assert [e["depth"] for e in seen[1:]] == [12, 20, 3]
    assert seen[1]["rate"] >= MIN_RATE


async def test_dead_governors_closed_state_is_ignored_after_stale_after(
    settings: Settings,
) -> None:
    watermarks = configured(
        settings,
        backpressure={
            "high_watermark": 20,
            "low_watermark": 5,
            "throttle_at": 20,
            "stale_after": 1.0,
        },
    )
    async with RedisQueue(watermarks) as queue:
        async with governing(watermarks):
            await queue.enqueue_many(tasks(20))

            async def closed() -> bool:
                return await published_state(queue) == "closed"

            await wait_for(closed, 5, message="never closed")
        # The governor is gone and the queue drains; its last word was "closed".
        await queue.store.claim("w1", 18)
        with pytest.raises(BackpressureException):
            await queue.enqueue_task(tasks(1)[0])

        await asyncio.sleep(1.1)
        await queue.enqueue_task(tasks(1)[0])  # fail open, to the hard cap

        assert await admin(queue).zcard(queue.keys.pending) == 3
