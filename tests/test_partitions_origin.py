"""Per-domain limits hold with ``partitions = 3`` exactly as with 1, at a loopback origin.

Two ``supervisor start`` processes crawl tests/origin.py's sites with real HTTP
requests: a configured rate limit (free.test, 10/s), a hidden rate answered
with 429 + Retry-After (hidden.test), a site that slows under load within the
in-flight cap (slow.test) and an unlimited one (c.test). The three domains
with limits land in different partitions; what the sites saw, and when Redis
started each task, is the judge, for one partition and for three.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from helpers import admin
from origin import Origin
from supervisor_harness import DRAIN_TIMEOUT, Launcher, config_file, configured, wait_for_workers
from test_politeness import (
    CAP,
    HIDDEN_RATE,
    TESTS,
    completed,
    inside_retry_after,
    pages,
    started_while_paused,
)
from test_rate_limits import busiest_second, over_rate

from actors.partitions import place
from actors.queue import RedisQueue, TaskManager
from config.settings import Settings

LIMITED_RATE = 10.0


@pytest.mark.timeout(240)
# The one-partition run is opt-in (-m slow) to keep the suite's time: the same
# sites at one partition are in the default suite through tests/test_politeness.py
# and tests/test_rate_limits_hosts.py; run both to compare side by side.
@pytest.mark.parametrize("partitions", [pytest.param(1, marks=pytest.mark.slow), 3])
async def test_per_domain_limits_at_an_origin_hold_with_three_partitions_as_with_one(
    settings: Settings, launch: Launcher, tmp_path: Path, partitions: int
) -> None:
    polite = configured(
        settings,
        redis={"partitions": partitions},
        heartbeat={"interval": 0.5, "timeout": 5.0},
        worker={"concurrency": 8, "scripts": ["polite_scripts"]},
        politeness={"max_in_flight_per_domain": CAP, "max_retry_after": 2.0},
        rate_limits={"domain:free.test": LIMITED_RATE},
    )
    homes = {place(f"domain:{host} script:fetch", "", partitions) for host in HOSTS}
    assert len(homes) == min(partitions, 3)
    config = config_file(tmp_path, polite, 1)
    env = {"PYTHONPATH": str(TESTS)}
    async with RedisQueue(polite, adopt_layout=True) as queue:
        manager = TaskManager(queue)
        with Origin(HIDDEN_RATE) as origin:
            hosts = [launch(config, env), launch(config, env)]
            for supervisor in hosts:
                await wait_for_workers(queue, supervisor, 1)
            hidden = await queue.enqueue_many(pages(origin, "hidden.test", 30))
            limited = await queue.enqueue_many(pages(origin, "free.test", 30))
            slow = await queue.enqueue_many(pages(origin, "slow.test", 20))
            free = await queue.enqueue_many(pages(origin, "c.test", 30))
            await completed(manager, [*hidden, *limited, *slow, *free], 150)
            started = [await started_at(queue, request_id) for request_id in limited]
            pauses, paused_starts = await started_while_paused(queue, "hidden.test", hidden)
            for supervisor in hosts:
                supervisor.send(signal.SIGTERM)
            for supervisor in hosts:
                assert await supervisor.exit_code(DRAIN_TIMEOUT + 10) == 0, supervisor.output()

    crawl = origin.of("hidden.test")
    refused = [h for h in crawl if h.status == 429]
    span = (max(started) - min(started)) / 1000
    print(
        f"\npartitions={partitions}: free.test 30 starts over {span:.2f} s at "
        f"{LIMITED_RATE:g}/s (busiest second {busiest_second(started)}, GCRA excess "
        f"{over_rate(started, LIMITED_RATE):.2f}); hidden.test {len(refused)} x 429, "
        f"{len(inside_retry_after(crawl))} inside Retry-After; peak in flight "
        f"{dict(origin.peak_in_flight)}"
    )
    assert over_rate(started, LIMITED_RATE) <= 0
    assert busiest_second(started) <= LIMITED_RATE + 10
    assert pauses >= 1
    assert paused_starts == []  # no task of hidden.test started while it was paused
    assert len(refused) / len(crawl) <= 0.2
    assert all(peak <= CAP for peak in origin.peak_in_flight.values())


HOSTS = ("hidden.test", "free.test", "c.test")


async def started_at(queue: RedisQueue, request_id: str) -> int:
    """When Redis started the task's last attempt (ms), from whichever partition holds it."""
    index = await queue.locate(request_id)
    assert index is not None
    raw = await admin(queue).hget(queue.partitions[index].task(request_id), "started_at")
    return int(raw or 0)
