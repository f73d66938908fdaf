"""The politeness state in Redis, script by script (docs/rate-limits.md).

The in-flight cap and its slots on every path out of ``running``, per-domain
caps, slow start, the learned rate, Retry-After clamping, decay and
forgetting, and what ``status`` and ``/metrics`` show of it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from helpers import admin, wait_for
from test_store_scripts import derive

from actors.models import ScrapingRequest
from actors.queue import SETTLED, RedisQueue, TaskManager
from actors.store import Completion, Lease
from config.settings import Settings

KEY = "domain:a.test"


def on(host: str, n: int) -> list[ScrapingRequest]:
    return [
        ScrapingRequest(script_name="echo", parameters={"url": f"http://{host}/{i}"})
        for i in range(n)
    ]


async def polite(queue: RedisQueue, settings: Settings, **politeness: Any) -> None:
    """Publish ``[politeness]`` (and no rate limits) as ``supervisor start`` does."""
    await queue.store.set_limits(derive(settings, politeness=politeness))


async def state(queue: RedisQueue, field: str) -> float | None:
    raw = await admin(queue).hget(queue.keys.domain(KEY), field)
    return None if raw is None else float(raw)


async def in_flight(queue: RedisQueue) -> float | None:
    """a.test's tasks running, as the scripts count them (``n`` is 1 + that, + SETTLED
    once its window reached the cap)."""
    n = await state(queue, "n")
    return None if n is None else n % SETTLED - 1


async def seed(queue: RedisQueue, key: str, seen_ms: int, **fields: float) -> None:
    """A domain's politeness state as the scripts leave it: its hash and its index entry
    (and, with a learned rate ``r``, its place in the paced set)."""
    await admin(queue).hset(queue.keys.domain(key), mapping={"n": 1, **fields})
    await admin(queue).zadd(queue.keys.domains, {key: seen_ms})
    if "r" in fields:
        await admin(queue).sadd(queue.keys.paced, key)


async def claim(queue: RedisQueue, n: int = 100, worker: str = "w1") -> list[Lease]:
    return (await queue.store.claim(worker, n)).leases


async def done(queue: RedisQueue, worker: str, lease: Lease) -> None:
    await queue.store.complete(worker, [Completion(lease.request_id, lease.attempt, "1", 0.1)])


async def test_cap_holds_across_workers_and_other_domains_are_not_held_back(
    settings: Settings, queue: RedisQueue
) -> None:
    await polite(queue, settings, max_in_flight_per_domain=4, initial_window=2, adaptive=False)
    await queue.enqueue_many(on("a.test", 10))
    # Slow start first: the initial window, then one more per success.
    first = await claim(queue)
    assert len(first) == 2
    await done(queue, "w1", first[0])
    assert len(await claim(queue, worker="w2")) == 2  # window 3, one still running
    assert await state(queue, "n") < SETTLED
    await done(queue, "w1", first[1])
    assert await state(queue, "n") > SETTLED  # window 4, the cap: only the cap binds now
    assert len(await claim(queue, worker="w2")) == 2  # two still running
    assert await claim(queue, worker="w2") == []  # four running: the cap
    free = await queue.enqueue_many(on("b.test", 3))
    later = await claim(queue, worker="w3")

    assert {lease.request_id for lease in later} == set(free[:2])  # b.test's own slow start
    assert await in_flight(queue) == 4
    assert await admin(queue).zscore(queue.keys.domains, KEY)  # indexed at its first start


async def test_one_claim_of_thousands_of_new_domains_indexes_every_one(
    settings: Settings, queue: RedisQueue
) -> None:
    await polite(queue, settings)
    await queue.enqueue_many(
        [
            ScrapingRequest(script_name="echo", parameters={"url": f"http://d{i}.test/"})
            for i in range(2500)
        ]
    )

    assert len(await claim(queue, 2500)) == 2500
    assert await admin(queue).zcard(queue.keys.domains) == 2500


async def test_a_domains_own_cap_overrides_the_default(
    settings: Settings, queue: RedisQueue
) -> None:
    await queue.store.set_limits(
        derive(
            settings,
            rate_limits={KEY: 1000.0, "domain:b.test": 1000.0},  # known sites: no slow start
            politeness={"max_in_flight_per_domain": 8, "in_flight": {KEY: 1}},
        )
    )
    await queue.enqueue_many([*on("a.test", 5), *on("b.test", 10)])
    leases = await claim(queue)
    hosts = [
        (await admin(queue).hget(queue.keys.task(lease.request_id), "rate_keys") or b"").split()[0]
        for lease in leases
    ]

    assert hosts.count(KEY.encode()) == 1
    assert hosts.count(b"domain:b.test") == 8


@pytest.mark.parametrize("path", ["complete", "fail", "release", "lease expiry", "cancel"])
async def test_every_path_out_of_running_gives_the_slot_back_once(
    settings: Settings, queue: RedisQueue, manager: TaskManager, path: str
) -> None:
    await queue.store.set_limits(
        derive(settings, rate_limits={KEY: 1000.0}, politeness={"max_in_flight_per_domain": 1})
    )
    ids = await queue.enqueue_many(on("a.test", 2))
    (lease,) = await claim(queue)
    assert await claim(queue, worker="w2") == []  # the cap holds the second
    held = (lease.request_id, lease.attempt)
    store = queue.store
    if path == "complete":
        await store.complete("w1", [Completion(*held, "1", 0.1)])
        await store.complete("w1", [Completion(*held, "1", 0.1)])  # a retried report
    elif path == "fail":
        await store.fail("w1", *held, "boom", permanent=True)
    elif path == "release":
        await store.release("w1", [held], reason="drain")
    elif path == "lease expiry":
        await admin(queue).zadd(queue.keys.running, {lease.request_id: 0}, xx=True)
        await store.requeue_expired()
    else:
        await queue.cancel_task(lease.request_id)

    assert await in_flight(queue) == 0  # no task of a.test holds a slot
    (second,) = await claim(queue, worker="w2")
    assert second.request_id in ids
    assert await in_flight(queue) == 1


async def test_429_halves_the_learned_rate_once_per_burst_and_clamps_retry_after(
    settings: Settings, queue: RedisQueue
) -> None:
    await polite(queue, settings, max_retry_after=2.0, start_rate=1.0, initial_window=1)
    await queue.enqueue_many(on("a.test", 3))
    (lease,) = await claim(queue)
    await queue.store.release(
        "w1",
        [(lease.request_id, lease.attempt)],
        reason="rate_limited",
        pause_key=KEY,
        pause=1_000_000_000.0,
    )
    paused_for = (await TaskManager(queue).paused_keys())[KEY]
    learned = await state(queue, "r")
    domains = {d["domain"]: d for d in await TaskManager(queue).domains()}

    assert 0 < paused_for <= 2.0  # clamped to max_retry_after
    assert learned == 1.0  # a domain with no limit starts at start_rate
    assert domains["a.test"]["throttled_last_minute"] == 1
    assert domains["a.test"]["rate"] == 1.0
    assert domains["a.test"]["paused_for"] > 0


async def test_a_429_sends_a_domain_past_its_slow_start_back_to_it(
    settings: Settings, queue: RedisQueue
) -> None:
    await polite(queue, settings, max_in_flight_per_domain=2, initial_window=1, adaptive=False)
    await queue.enqueue_many(on("a.test", 6))
    (first,) = await claim(queue)  # window 1
    await done(queue, "w1", first)  # window 2, the cap
    running = await claim(queue)
    assert len(running) == 2
    assert await state(queue, "n") > SETTLED  # only the cap binds: starts read nothing

    await queue.store.release(
        "w1",
        [(running[0].request_id, running[0].attempt)],
        reason="rate_limited",
        pause_key=KEY,
        pause=0.001,
    )
    await asyncio.sleep(0.05)  # the pause is over

    assert await state(queue, "w") == 1  # halved
    assert await state(queue, "n") < SETTLED
    assert await in_flight(queue) == 1
    assert await claim(queue) == []  # the window (1) holds: one still running


async def test_successes_raise_a_learned_rate_up_to_the_configured_ceiling(
    settings: Settings, queue: RedisQueue
) -> None:
    await queue.store.set_limits(derive(settings, rate_limits={KEY: 1.2}))
    await seed(queue, KEY, 1, r=1.0)
    await queue.enqueue_many(on("a.test", 4))

    await wait_for(lambda: _claim_and_complete(queue), 5, message="no first success")
    assert await state(queue, "r") == pytest.approx(1.1)
    # Now ceil(1.1) = 2 successes make the next step: 1.21 >= 1.2, the configured rate.
    await wait_for(lambda: _claim_and_complete(queue), 5, message="no second success")
    assert await state(queue, "r") == pytest.approx(1.1)
    await wait_for(lambda: _claim_and_complete(queue), 5, message="no third success")
    assert await state(queue, "r") is None


async def _claim_and_complete(queue: RedisQueue) -> bool:
    leases = await claim(queue, 1)
    if not leases:
        return False
    await queue.store.complete("w1", [Completion(leases[0].request_id, leases[0].attempt, "1", 0)])
    return True


async def test_idle_domains_decay_then_are_forgotten_and_no_hash_keeps_them(
    settings: Settings, queue: RedisQueue
) -> None:
    await polite(queue, settings)
    await queue.store.set_limits(derive(settings, rate_limits={KEY: 4.0}))
    long_ago = 1
    keys = queue.keys
    seconds, _ = await admin(queue).time()
    a_while_ago = int(seconds) * 1000 - 10_000
    await seed(queue, KEY, a_while_ago, r=1.0)
    await seed(queue, "domain:gone.test", long_ago, w=3)
    await admin(queue).hset(keys.rate_state, mapping={"domain:gone.test": long_ago, KEY: long_ago})
    await admin(queue).hset(keys.paused, "domain:gone.test", long_ago)
    await admin(queue).hset(keys.breaker, "domain:gone.test", 2)

    # Forgotten after an hour: gone.test (idle for decades) goes; a.test, idle
    # for 10 s, decays: its learned 1.0 doubles once per idle period.
    _, gone = await queue.store.prune_domains("0 0 0", 100, 0.001, 3600)
    assert gone == 1
    assert await state(queue, "r") == 2.0
    # Forgotten after 1 ms: every trace of a.test goes too.
    cursors, forgotten = await queue.store.prune_domains("0 0 0", 100, 0.001, 0.001)

    assert forgotten == 1
    assert await admin(queue).zcard(keys.domains) == 0
    assert await admin(queue).exists(keys.domain(KEY), keys.domain("domain:gone.test")) == 0
    assert await admin(queue).hgetall(keys.rate_state) == {}
    assert await admin(queue).hgetall(keys.paused) == {}
    assert await admin(queue).hgetall(keys.breaker) == {}
    assert cursors == "0 0 0"


async def test_a_limited_domain_in_use_is_not_forgotten_between_its_tasks(
    settings: Settings, queue: RedisQueue
) -> None:
    """Its GCRA state must stay while it is used: a forgotten one would admit a new burst."""
    await polite(queue, settings)
    await queue.store.set_limits(derive(settings, rate_limits={KEY: 1000.0}))
    await seed(queue, KEY, 1)  # known, last seen long ago
    await queue.enqueue_many(on("a.test", 1))
    (lease,) = await claim(queue)
    await done(queue, "w1", lease)  # none of its tasks runs now

    _, forgotten = await queue.store.prune_domains("0 0 0", 100, 60, 3600)

    assert forgotten == 0
    assert await admin(queue).hexists(queue.keys.rate_state, KEY)


async def test_a_drifted_in_flight_count_is_recounted_from_the_running_tasks(
    settings: Settings, queue: RedisQueue
) -> None:
    """A count left too high (a half-failed script of an earlier version) would hold
    its domain back for good; the reaper's recount sets it from the running tasks."""
    await polite(queue, settings, max_in_flight_per_domain=2, initial_window=1, adaptive=False)
    await queue.enqueue_many(on("a.test", 3))
    assert len(await claim(queue)) == 1  # slow start: one of a.test at a time
    await admin(queue).hset(queue.keys.domain(KEY), mapping={"n": 7, "w": 2})
    assert await claim(queue, worker="w2") == []  # held back by the drifted count

    assert await queue.store.recount_slots() == 1
    assert await in_flight(queue) == 1  # the one task still running
    assert len(await claim(queue, worker="w2")) == 1  # the window (2) has room again
    assert await queue.store.recount_slots() == 0


async def test_a_domain_held_back_at_its_gate_is_recounted_even_when_not_indexed(
    settings: Settings, queue: RedisQueue
) -> None:
    await polite(queue, settings, max_in_flight_per_domain=2, adaptive=False)
    await queue.enqueue_many(on("a.test", 2))
    await admin(queue).hset(queue.keys.domain(KEY), mapping={"n": 3, "w": 2})  # 2 running
    await admin(queue).delete(queue.keys.domains)  # the index lost (or never had) it
    assert await claim(queue) == []  # both wait at the gate

    assert await queue.store.recount_slots() == 1
    assert len(await claim(queue)) == 2
