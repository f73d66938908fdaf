"""Politeness rate limits, the 429 pause and the circuit breaker (docs/rate-limits.md).

Most tests drive the claim script directly, the way a worker does, and read
each task's ``started_at`` (the Redis clock) back, so the GCRA bound is
checked on the very times Redis admitted the starts. The 429 tests run real
Worker actors in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
from collections.abc import AsyncIterator, Collection
from pathlib import Path
from typing import Any

import pytest
from helpers import admin, wait_for
from supervisor_harness import configured, write_config

from actors.exceptions import RateLimited
from actors.models import ScrapingRequest, TaskStatus
from actors.queue import RedisQueue, TaskManager, time_ms
from actors.scripts import current_attempt, script
from actors.store import Completion, Lease
from actors.worker import Worker
from config.settings import Settings
from supervisor.cli import run

pytestmark = pytest.mark.usefixtures("restore_signals")

#: Slack for the Redis clock's whole milliseconds in the GCRA arithmetic.
CLOCK_SLACK_MS = 2


# -- helpers ---------------------------------------------------------------------------------


def on(host: str | None, n: int, **fields: Any) -> list[ScrapingRequest]:
    """``n`` echo requests for ``host`` (a ``parameters["url"]`` on it), or with no URL at all."""
    return [
        ScrapingRequest(
            script_name="echo",
            parameters={"url": f"http://{host}/{i}"} if host else {"n": i},
            **fields,
        )
        for i in range(n)
    ]


async def publish(queue: RedisQueue, settings: Settings, rates: dict[str, float]) -> None:
    """What ``supervisor start`` does: publish ``[rate_limits]`` (and the breaker) to Redis.

    The rates alone: these tests start more tasks of one domain at once than
    the default in-flight cap allows (tests/test_politeness.py covers it).
    """
    politeness = settings.politeness.model_copy(update={"max_in_flight_per_domain": 0})
    await queue.store.set_limits(configured(settings, rate_limits=rates, politeness=politeness))


async def started_at(queue: RedisQueue, ids: Collection[str]) -> dict[str, int]:
    """request id -> the time its (last) attempt started, Redis clock ms."""
    pipe = admin(queue).pipeline(transaction=False)
    for request_id in ids:
        pipe.hget(queue.keys.task(request_id), "started_at")
    return {rid: int(ms) for rid, ms in zip(ids, await pipe.execute(), strict=True)}


async def complete(queue: RedisQueue, leases: list[Lease], worker: str = "w1") -> None:
    done = [Completion(lease.request_id, lease.attempt, "null", 0.0) for lease in leases]
    assert all(await queue.store.complete(worker, done))


async def drive(
    queue: RedisQueue, wanted: Collection[str], *, count: int = 64, timeout: float = 10
) -> dict[str, int]:
    """Claim as a worker does until every ``wanted`` task started, completing each at once.

    Sleeps as long as claim's ``wait_ms`` says (at most 50 ms) when nothing is due.
    Returns every task started meanwhile: request id -> started_at (Redis ms).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    started: list[str] = []
    missing = set(wanted)
    while missing:
        assert loop.time() < deadline, f"{len(missing)} of {len(wanted)} never started"
        claim = await queue.store.claim("w1", count)
        if claim.leases:
            await complete(queue, claim.leases)
            started += [lease.request_id for lease in claim.leases]
            missing -= {lease.request_id for lease in claim.leases}
        else:
            await asyncio.sleep(0.05 if claim.wait_ms < 0 else min(claim.wait_ms, 50) / 1000)
    return await started_at(queue, started)


def over_rate(times_ms: Collection[int], rate: float) -> float:
    """How far the busiest window exceeds the GCRA bound ``rate * t + ceil(rate)``.

    Every stretch from the i-th to the j-th start is checked; <= 0 means conforming.
    """
    times = sorted(times_ms)
    burst = max(1, math.ceil(rate))
    worst = -math.inf
    for i, first in enumerate(times):
        for j in range(i, len(times)):
            allowed = rate * (times[j] - first + CLOCK_SLACK_MS) / 1000 + burst
            worst = max(worst, j - i + 1 - allowed)
    return worst


def busiest_second(times_ms: Collection[int]) -> int:
    """The most starts in any closed one-second window."""
    times = sorted(times_ms)
    return max(sum(1 for t in times[i:] if t <= first + 1000) for i, first in enumerate(times))


def of(started: dict[str, int], ids: Collection[str]) -> list[int]:
    return [ms for rid, ms in started.items() if rid in ids]


# -- GCRA -----------------------------------------------------------------------------------


async def test_domain_limit_admits_a_burst_then_its_rate_and_never_more_in_any_second(
    settings: Settings, queue: RedisQueue
) -> None:
    await publish(queue, settings, {"domain:a.test": 5.0})
    ids = await queue.enqueue_many(on("a.test", 15))

    started = await drive(queue, ids)

    times = sorted(started.values())
    assert len(times) == 15
    assert busiest_second(times) <= 5 + 5
    assert over_rate(times, 5.0) <= 0
    # The burst of 5 at once, then one every 200 ms: (15 - 5) / 5 = 2 s.
    assert times[4] - times[0] < 50
    assert 2000 - CLOCK_SLACK_MS <= times[-1] - times[0] < 2400


async def test_script_limit_holds_tasks_that_name_no_site(
    settings: Settings, queue: RedisQueue
) -> None:
    await publish(queue, settings, {"script:echo": 10.0})
    ids = await queue.enqueue_many(on(None, 25))

    first = (await queue.store.claim("w1", 100)).leases
    await complete(queue, first)
    await drive(queue, set(ids) - {lease.request_id for lease in first})

    assert len(first) == 10  # the burst: ceil(10)
    times = (await started_at(queue, ids)).values()
    assert over_rate(times, 10.0) <= 0
    # (25 - 10) / 10 = 1.5 s
    assert max(times) - min(times) >= 1500 - CLOCK_SLACK_MS


async def test_default_domain_limits_hosts_without_an_entry_and_not_hosts_with_one(
    settings: Settings, queue: RedisQueue
) -> None:
    await publish(queue, settings, {"default_domain": 2.0, "domain:own.test": 50.0})
    other = await queue.enqueue_many(on("other.test", 10))
    own = await queue.enqueue_many(on("own.test", 10))
    bare = await queue.enqueue_many(on(None, 5))

    claimed = {lease.request_id for lease in (await queue.store.claim("w1", 100)).leases}

    assert len(claimed & set(other)) == 2  # default_domain's burst
    assert claimed >= set(own)  # own.test's own rate (50/s) admits all 10
    assert claimed >= set(bare)  # no domain, no domain limit


async def test_rate_key_overrides_the_url_host(settings: Settings, queue: RedisQueue) -> None:
    await publish(queue, settings, {"domain:a.test": 2.0})
    keyed = await queue.enqueue_many(on("b.test", 6, rate_key="a.test"))
    plain = await queue.enqueue_many(on("b.test", 6))

    claimed = {lease.request_id for lease in (await queue.store.claim("w1", 100)).leases}

    assert len(claimed & set(keyed)) == 2
    assert claimed >= set(plain)
    record = await TaskManager(queue).get_task(keyed[0])
    assert record is not None
    assert record["rate_keys"] == "domain:a.test script:echo"


async def test_task_limited_on_its_script_and_its_domain_obeys_both(
    settings: Settings, queue: RedisQueue
) -> None:
    await publish(queue, settings, {"script:echo": 6.0, "domain:a.test": 3.0})
    limited = await queue.enqueue_many(on("a.test", 8))
    elsewhere = await queue.enqueue_many(on("b.test", 8))

    started = await drive(queue, [*limited, *elsewhere])

    assert over_rate(of(started, limited), 3.0) <= 0  # domain:a.test
    assert over_rate(started.values(), 6.0) <= 0  # script:echo, over both domains
    # Each limit binds: a.test's 8 need (8 - 3) / 3 s, echo's 16 need (16 - 6) / 6 s.
    assert max(of(started, limited)) - min(of(started, limited)) >= 1667 - CLOCK_SLACK_MS
    assert max(started.values()) - min(started.values()) >= 1667 - CLOCK_SLACK_MS


async def test_a_gate_keeps_priority_order_then_fifo(settings: Settings, queue: RedisQueue) -> None:
    await publish(queue, settings, {"domain:a.test": 5.0})
    low = await queue.enqueue_many(on("a.test", 3))
    (urgent,) = await queue.enqueue_many(on("a.test", 1, priority=5))
    later = await queue.enqueue_many(on("a.test", 1))

    claimed = (await queue.store.claim("w1", 10)).leases

    assert [lease.request_id for lease in claimed] == [urgent, *low, *later]


# -- no head-of-line blocking, fairness -------------------------------------------------------


async def test_limited_tasks_queued_first_do_not_delay_unlimited_ones_behind_them(
    settings: Settings, queue: RedisQueue
) -> None:
    await publish(queue, settings, {"domain:a.test": 1.0})
    limited = await queue.enqueue_many(on("a.test", 30))
    free = await queue.enqueue_many(on("b.test", 10))

    claimed: list[str] = []
    for _ in range(11):  # one task per claim, back to back: no claim comes back empty
        (lease,) = (await queue.store.claim("w1", 1)).leases
        claimed.append(lease.request_id)

    assert claimed[0] == limited[0]  # a.test's burst of 1
    assert claimed[1:] == free


async def test_a_quiet_domain_keeps_its_own_rate_beside_a_backlogged_one(
    settings: Settings, queue: RedisQueue
) -> None:
    await publish(queue, settings, {"domain:busy.test": 5.0, "domain:quiet.test": 5.0})
    backlog = await queue.enqueue_many(on("busy.test", 60))
    quiet = await queue.enqueue_many(on("quiet.test", 10))
    enqueued_at = time_ms(await queue.connection.execute("TIME"))

    started = await drive(queue, quiet, count=1)  # the hardest case: one task per claim

    quiet_times = of(started, quiet)
    busy_times = of(started, backlog)
    # quiet.test: its burst of 5 at once, the other 5 within (10 - 5) / 5 s.
    assert min(quiet_times) - enqueued_at < 100
    assert max(quiet_times) - enqueued_at < 1000 + 300
    # busy.test is served at its own rate meanwhile, not starved and not faster.
    assert over_rate(busy_times, 5.0) <= 0
    span = (max(quiet_times) - enqueued_at) / 1000
    assert len(busy_times) >= 5 + 5 * span - 2


# -- gated tasks: cancel and expiry --------------------------------------------------------------


async def test_cancelled_gated_task_leaves_its_gate_and_never_starts(
    settings: Settings, queue: RedisQueue, manager: TaskManager
) -> None:
    await publish(queue, settings, {"domain:a.test": 5.0})
    ids = await queue.enqueue_many(on("a.test", 3))

    assert await queue.cancel_task(ids[1])

    assert (await manager.queue_stats())["gated"] == 2
    claimed = (await queue.store.claim("w1", 10)).leases
    assert [lease.request_id for lease in claimed] == [ids[0], ids[2]]
    assert await manager.get_task_status(ids[1]) is TaskStatus.CANCELLED


async def test_expired_gated_tasks_do_not_use_up_the_rate_of_live_ones(
    settings: Settings, queue: RedisQueue, manager: TaskManager
) -> None:
    await publish(queue, settings, {"domain:a.test": 2.0})
    expiring = await queue.enqueue_many(on("a.test", 4, expires_in=0.3))
    live = await queue.enqueue_many(on("a.test", 2))
    burst = (await queue.store.claim("w1", 10)).leases
    assert [lease.request_id for lease in burst] == expiring[:2]
    await complete(queue, burst)
    await asyncio.sleep(0.5)  # the other two expired; a.test's next start is due now

    started = await drive(queue, live[:1])

    first = min((await started_at(queue, expiring[:2])).values())
    assert started[live[0]] - first < 500 + 200
    assert [await manager.get_task_status(rid) for rid in expiring[2:]] == [
        TaskStatus.CANCELLED
    ] * 2


# -- reload ---------------------------------------------------------------------------------


async def test_new_limit_applies_to_tasks_queued_before_it(
    settings: Settings, queue: RedisQueue, manager: TaskManager
) -> None:
    limited = await queue.enqueue_many(on("a.test", 12))
    free = await queue.enqueue_many(on("b.test", 5))
    await publish(queue, settings, {"domain:a.test": 5.0})

    first = await queue.store.claim("w1", 100)
    await complete(queue, first.leases)
    claimed = {lease.request_id for lease in first.leases}
    assert claimed >= set(free)  # not held back by the a.test tasks ahead of them
    assert len(claimed & set(limited)) == 5
    assert (await manager.queue_stats())["gated"] == 7  # diverted into a.test's gate

    started = await drive(queue, set(limited) - claimed)
    times = list((await started_at(queue, limited)).values())
    assert over_rate(times, 5.0) <= 0
    assert len(started) == 7


@pytest.mark.parametrize("loosened", [{"domain:a.test": 1000.0}, {}], ids=["raised", "removed"])
async def test_loosened_limit_lets_a_gated_backlog_through_within_one_old_interval(
    settings: Settings, queue: RedisQueue, loosened: dict[str, float]
) -> None:
    await publish(queue, settings, {"domain:a.test": 1.0})
    ids = await queue.enqueue_many(on("a.test", 10))
    first = (await queue.store.claim("w1", 100)).leases
    assert len(first) == 1
    await complete(queue, first)

    await publish(queue, settings, loosened)
    started = await drive(queue, ids[1:])

    assert max(started.values()) - (await started_at(queue, ids[:1]))[ids[0]] < 1000 + 300


# -- HTTP 429: a script raises RateLimited -----------------------------------------------------

TOO_MANY: set[str] = set()
"""Tags whose next run answers 429 (each only once)."""


@script("test-rl-429")
async def answers_429_once(parameters: dict[str, Any]) -> dict[str, int]:
    tag = parameters["tag"]
    if tag in TOO_MANY:
        TOO_MANY.discard(tag)
        raise RateLimited(retry_after=parameters["retry_after"])
    return {"attempt": current_attempt()}


@contextlib.asynccontextmanager
async def worker(settings: Settings, actor_id: str) -> AsyncIterator[Worker]:
    """A Worker actor on this loop, stopped at once (abort) on exit."""
    running = Worker(actor_id, settings, os.getppid())
    main = asyncio.create_task(running.main())
    try:
        yield running
    finally:
        running.request_stop(abort=True)
        await asyncio.wait_for(main, 15)


async def test_429_pauses_the_domain_on_every_worker_and_costs_no_attempt(
    settings: Settings, queue: RedisQueue, manager: TaskManager
) -> None:
    pause = 1.0
    first = ScrapingRequest(
        script_name="test-rl-429",
        parameters={"url": "http://r.test/1", "tag": "first", "retry_after": pause},
        max_retries=0,  # a burned attempt would dead-letter it
    )
    TOO_MANY.add("first")
    async with worker(settings, "w1"):
        await queue.enqueue_task(first)

        async def paused() -> bool:
            return "domain:r.test" in await manager.paused_keys()

        await wait_for(paused, 5, message="the 429 never paused domain:r.test")
        left = (await manager.paused_keys())["domain:r.test"]
        until_ms: Any = await admin(queue).hget(queue.keys.paused, "domain:r.test")
        until = int(until_ms)
    assert pause - 0.3 < left <= pause

    # w1 is gone: the pause must hold for a worker that never saw the 429.
    second = ScrapingRequest(
        script_name="test-rl-429", parameters={"url": "http://r.test/2", "tag": "second"}
    )
    async with worker(settings, "w2"):
        await queue.enqueue_task(second)
        answers = [await queue.wait_for_response(r.request_id, 10) for r in (first, second)]

    assert [a.status for a in answers] == [TaskStatus.COMPLETED] * 2
    assert answers[0].data == {"attempt": 1}
    starts = await started_at(queue, [first.request_id, second.request_id])
    assert min(starts.values()) >= until
    for request in (first, second):
        record = await manager.get_task(request.request_id)
        assert record is not None
        assert record["worker"] == "w2"
    assert await manager.paused_keys() == {}


# -- the circuit breaker --------------------------------------------------------------------

COOLDOWN = 1.0


@pytest.fixture
async def breaker(settings: Settings, queue: RedisQueue) -> RedisQueue:
    """The queue with [circuit_breaker] failures = 5, cooldown = 1 s published."""
    tripping = configured(settings, circuit_breaker={"failures": 5, "cooldown": COOLDOWN})
    await queue.store.set_limits(tripping)
    return queue


async def fail_next(queue: RedisQueue, *, permanent: bool = False) -> str:
    (lease,) = (await queue.store.claim("w1", 1)).leases
    await queue.store.fail("w1", lease.request_id, lease.attempt, "boom", permanent=permanent)
    return lease.request_id


async def trip(queue: RedisQueue, host: str) -> list[str]:
    """Five retryable failures in a row on ``host``; returns its tasks still waiting."""
    ids = await queue.enqueue_many(on(host, 8, max_retries=0))
    for _ in range(5):
        await fail_next(queue)
    return ids[5:]


async def next_claim(queue: RedisQueue, timeout: float) -> tuple[list[Lease], float]:
    """Claim until something starts; the leases and how long it took (s)."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    while loop.time() - began < timeout:
        leases = (await queue.store.claim("w1", 10)).leases
        if leases:
            return leases, loop.time() - began
        await asyncio.sleep(0.02)
    return [], timeout


async def test_five_failures_in_a_row_pause_the_domain_and_only_that_domain(
    breaker: RedisQueue, manager: TaskManager
) -> None:
    await trip(breaker, "down.test")

    paused = await manager.paused_keys()
    assert set(paused) == {"domain:down.test"}
    assert COOLDOWN - 0.3 < paused["domain:down.test"] <= COOLDOWN
    other = await breaker.enqueue_task(on("up.test", 1)[0])
    leases = (await breaker.store.claim("w1", 10)).leases
    assert [lease.request_id for lease in leases] == [other]


async def test_after_the_cooldown_exactly_one_probe_starts(
    breaker: RedisQueue, manager: TaskManager
) -> None:
    waiting = await trip(breaker, "down.test")

    probe, after = await next_claim(breaker, 3 * COOLDOWN)

    assert [lease.request_id for lease in probe] == waiting[:1]
    assert after >= COOLDOWN - 0.3
    await asyncio.sleep(0.3)  # while the probe runs, nothing else on the domain starts
    assert (await breaker.store.claim("w1", 10)).leases == []
    assert "domain:down.test" in await manager.paused_keys()


async def test_successful_probe_resumes_the_domain(
    breaker: RedisQueue, manager: TaskManager
) -> None:
    await trip(breaker, "down.test")
    probe, _ = await next_claim(breaker, 3 * COOLDOWN)

    await complete(breaker, probe)

    assert await manager.paused_keys() == {}
    assert not await admin(breaker).hexists(breaker.keys.breaker, "domain:down.test")


async def test_after_a_successful_probe_the_domains_waiting_tasks_start_at_once(
    breaker: RedisQueue,
) -> None:
    waiting = await trip(breaker, "down.test")
    probe, _ = await next_claim(breaker, 3 * COOLDOWN)
    await complete(breaker, probe)

    rest, after = await next_claim(breaker, COOLDOWN / 2)

    assert sorted(lease.request_id for lease in rest) == sorted(waiting[1:])
    assert after < COOLDOWN / 2


async def test_failed_probe_pauses_the_domain_for_another_cooldown(
    breaker: RedisQueue, manager: TaskManager
) -> None:
    await trip(breaker, "down.test")
    probe, _ = await next_claim(breaker, 3 * COOLDOWN)

    (lease,) = probe
    await breaker.store.fail("w1", lease.request_id, lease.attempt, "still down", permanent=False)

    paused = await manager.paused_keys()
    assert COOLDOWN - 0.3 < paused["domain:down.test"] <= COOLDOWN
    second, after = await next_claim(breaker, 3 * COOLDOWN)
    assert len(second) == 1  # the next probe, a cool-down later
    assert after >= COOLDOWN - 0.3


async def test_permanent_failures_do_not_open_the_breaker(
    breaker: RedisQueue, manager: TaskManager
) -> None:
    await breaker.enqueue_many(on("flaky.test", 7))
    for _ in range(6):
        await fail_next(breaker, permanent=True)

    assert await manager.paused_keys() == {}
    assert len((await breaker.store.claim("w1", 10)).leases) == 1


async def test_status_lists_the_paused_domain_and_the_gated_tasks(
    breaker: RedisQueue, settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await trip(breaker, "down.test")
    await breaker.store.claim("w1", 10)  # the three waiting tasks move into the gate
    config = write_config(tmp_path / "scrapeq.toml", settings, processes=0)

    code = await asyncio.to_thread(run, ["status", "--json", "--config", str(config)])

    assert code == 0
    state = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(state["paused_keys"]) == {"domain:down.test"}
    assert 0 < state["paused_keys"]["domain:down.test"] <= COOLDOWN
    assert (state["queue"]["gated"], state["queue"]["pending"]) == (3, 3)


async def test_a_success_between_failures_resets_the_count(
    breaker: RedisQueue, manager: TaskManager
) -> None:
    await breaker.enqueue_many(on("flaky.test", 10, max_retries=0))
    for _ in range(4):
        await fail_next(breaker)
    await complete(breaker, (await breaker.store.claim("w1", 1)).leases)
    for _ in range(4):
        await fail_next(breaker)

    assert await manager.paused_keys() == {}
