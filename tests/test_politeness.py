"""Politeness toward sites that publish no limit, end to end (docs/rate-limits.md).

Real HTTP requests from scripts run by two ``supervisor start`` processes
against tests/origin.py on loopback, with no rate limit configured: a site
with a hidden rate (429 + Retry-After beyond it), one that slows down under
load, one with an absurd Retry-After and one with no limit at all. What the
sites saw is the judge.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest
from helpers import admin, wait_for
from origin import Hit, Origin
from supervisor_harness import DRAIN_TIMEOUT, Launcher, config_file, configured, wait_for_workers

from actors.history import Event, EventHistory
from actors.models import ScrapingRequest, TaskStatus
from actors.queue import RedisQueue, TaskManager
from config.settings import Settings

TESTS = Path(__file__).resolve().parent
#: hidden.test's true rate (requests/s) and the crawl's size.
HIDDEN_RATE, PAGES = 2.0, 30
#: A request that arrives this soon after a 429 was under way before the site's
#: answer could be heard: the site-level count leaves it out.
IN_FLIGHT_GRACE = 0.25
CAP = 8


def pages(origin: Origin, host: str, n: int) -> list[ScrapingRequest]:
    return [
        ScrapingRequest(
            script_name="fetch",
            parameters={"url": f"http://{host}/page/{i}", "origin": origin.address},
            max_retries=0,
            timeout=30,
        )
        for i in range(n)
    ]


def inside_retry_after(hits: list[Hit]) -> list[Hit]:
    """Requests that arrived while a Retry-After the site had answered still ran.

    A pause cannot recall a task already started when the 429 came back (and it
    starts when the worker reports the 429, a moment after the site sent it;
    longer on a loaded box), so such requests are reported, and the judge of
    the scheduler is ``started_while_paused``.
    """
    windows = [
        (h.arrived + IN_FLIGHT_GRACE, h.arrived + h.retry_after) for h in hits if h.status == 429
    ]
    return [h for h in hits if any(start < h.arrived < end for start, end in windows)]


async def started_while_paused(
    queue: RedisQueue, domain: str, ids: list[str]
) -> tuple[int, list[float]]:
    """How many times ``domain`` was paused, and when tasks of ``ids`` started while it
    was (Redis time, s).

    From the event history: every ``rate.paused`` of the domain and every
    ``task.started`` of those tasks, each with the Redis time it happened.
    """
    history = EventHistory(queue.connection, queue.partitions)
    events: list[Event] = []
    cursor = history.beginning
    while page := await history.after(cursor):
        for cursor, batch in page:  # noqa: B007 - the last cursor resumes the next page
            events += batch
    pauses = [
        (float(e["ts"]), float(e["ts"]) + float(e["seconds"]))
        for e in events
        if e["event"] == "rate.paused" and e.get("key") == f"domain:{domain}"
    ]
    wanted = set(ids)
    starts = [
        float(e["ts"])
        for e in events
        if e["event"] == "task.started" and e.get("request_id") in wanted
    ]
    return len(pauses), [at for at in starts if any(begin < at < end for begin, end in pauses)]


async def completed(manager: TaskManager, ids: list[str], timeout: float) -> None:
    async def done() -> bool:
        statuses = [await manager.get_task_status(request_id) for request_id in ids]
        return all(status is TaskStatus.COMPLETED for status in statuses)

    await wait_for(done, timeout, interval=0.25, message=f"{len(ids)} pages never all completed")


@pytest.mark.timeout(240)
async def test_two_supervisors_learn_a_hidden_rate_and_spare_every_site(
    settings: Settings, queue: RedisQueue, manager: TaskManager, launch: Launcher, tmp_path: Path
) -> None:
    polite = configured(
        settings,
        heartbeat={"interval": 0.5, "timeout": 5.0},
        worker={"concurrency": 8, "scripts": ["polite_scripts"]},
        politeness={"max_in_flight_per_domain": CAP, "max_retry_after": 2.0},
    )
    config = config_file(tmp_path, polite, 1)
    env = {"PYTHONPATH": str(TESTS)}
    with Origin(HIDDEN_RATE) as origin:
        hosts = [launch(config, env), launch(config, env)]
        for supervisor in hosts:
            await wait_for_workers(queue, supervisor, 1)
        loop = asyncio.get_running_loop()
        began = loop.time()
        hidden = await queue.enqueue_many(pages(origin, "hidden.test", PAGES))
        free = await queue.enqueue_many(pages(origin, "free.test", PAGES))
        slow = await queue.enqueue_many(pages(origin, "slow.test", 20))
        banned = await queue.enqueue_many(pages(origin, "ban.test", 1))
        await completed(manager, free, 10)
        free_took = loop.time() - began
        await completed(manager, [*hidden, *slow, *banned], 120)
        crawl = origin.of("hidden.test")
        crawl_took = max(h.arrived for h in crawl) - min(h.arrived for h in crawl)
        learned = await admin(queue).hget(queue.keys.domain("domain:hidden.test"), "r")
        pauses, paused_starts = await started_while_paused(queue, "hidden.test", hidden)
        workers = {
            (await admin(queue).hget(queue.keys.task(request_id), "worker") or b"").decode()
            for request_id in hidden
        }
        for supervisor in hosts:
            supervisor.send(signal.SIGTERM)
        for supervisor in hosts:
            assert await supervisor.exit_code(DRAIN_TIMEOUT + 10) == 0, supervisor.output()

    refused = [h for h in crawl if h.status == 429]
    ban = origin.of("ban.test")
    print(
        f"\nhidden.test: {len(refused)} x 429 for {PAGES} pages, crawl {crawl_took:.1f} s "
        f"(true rate allows {PAGES / HIDDEN_RATE:.1f} s), learned {learned!r}; free.test "
        f"{free_took:.2f} s; peak in flight {dict(origin.peak_in_flight)}; "
        f"{len(inside_retry_after(crawl))} requests of tasks started before a pause took "
        "effect arrived inside its Retry-After"
    )
    assert len(refused) / PAGES <= 0.2
    assert crawl_took <= 2.5 * PAGES / HIDDEN_RATE
    assert pauses >= 1  # the history holds the 429s' pauses
    assert paused_starts == []  # the scheduler started no task of a paused domain
    assert all(peak <= CAP for peak in origin.peak_in_flight.values())
    assert origin.peak_in_flight["slow.test"] >= 2  # the window grew past slow start
    assert free_took < 10  # the unlimited site was not held back by the others
    # Both hosts crawled hidden.test, under the one rate they learned together.
    assert all(any(f"-{host.pid}-" in worker for worker in workers) for host in hosts)
    assert learned is not None
    # ban.test's Retry-After of 31 years was clamped to max_retry_after (2 s).
    assert len(ban) == 2
    assert ban[1].arrived - ban[0].arrived < 2.0 + 3.0
