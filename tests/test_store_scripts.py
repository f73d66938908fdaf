"""Every Lua script through the typed façade (actors/store.py), one section per script.

Tests drive TaskStore directly against the session redis-server and read the
raw keys back, so each script's contract (its header in actors/lua) is checked
on the state it leaves, not only on what it returns.
"""

from __future__ import annotations

import asyncio
import json
import re
from importlib import resources
from typing import Any

import pytest
from helpers import admin, next_message, subscribed

from actors.exceptions import BackpressureException, DuplicateTaskException, ScriptError
from actors.models import DEFAULT_MAX_RETRIES, ScrapingRequest
from actors.queue import RedisQueue, TaskManager
from actors.store import SCRIPT_NAMES, Completion, FailOutcome, Lease, TaskStore
from config.settings import Settings

LUA = resources.files("actors") / "lua"
SETS = ("pending", "running", "delayed", "dead")


def derive(settings: Settings, **sections: dict[str, Any]) -> Settings:
    """``settings`` with some keys of some sections replaced (Settings is frozen)."""
    data = settings.model_dump()
    for section, values in sections.items():
        data[section] = {**data[section], **values}
    return Settings.model_validate(data)


@pytest.fixture
def store(queue: RedisQueue) -> TaskStore:
    return queue.store


def request(**fields: Any) -> ScrapingRequest:
    return ScrapingRequest(**{"script_name": "echo", **fields})


async def add(queue: RedisQueue, **fields: Any) -> str:
    return await queue.enqueue_task(request(**fields))


async def claim_one(store: TaskStore, worker: str = "w1") -> Lease:
    result = await store.claim(worker, 1)
    assert len(result.leases) == 1, result
    return result.leases[0]


async def read_hash(queue: RedisQueue, key: str) -> dict[str, str]:
    raw: Any = await admin(queue).hgetall(key)
    return {k.decode(): v.decode() for k, v in raw.items()}


async def record(queue: RedisQueue, request_id: str) -> dict[str, str]:
    return await read_hash(queue, queue.keys.task(request_id))


async def sets_holding(queue: RedisQueue, request_id: str) -> set[str]:
    held = set()
    for name in SETS:
        if await admin(queue).zscore(getattr(queue.keys, name), request_id) is not None:
            held.add(name)
    return held


async def redis_ms(queue: RedisQueue) -> int:
    seconds, micros = await admin(queue).time()
    return int(seconds) * 1000 + int(micros) // 1000


async def expire_lease(queue: RedisQueue, request_id: str) -> None:
    """Push a lease's deadline into the past, as if its worker stopped renewing."""
    await admin(queue).zadd(queue.keys.running, {request_id: 0}, xx=True)


async def make_due(queue: RedisQueue, request_id: str) -> None:
    """End a retry's backoff now instead of waiting for it."""
    await admin(queue).zadd(queue.keys.delayed, {request_id: 0}, xx=True)


async def stat(queue: RedisQueue, name: str) -> int:
    value = await admin(queue).hget(queue.keys.stats, name)
    return int(value or 0)


def done(lease: Lease, data: Any = None) -> Completion:
    return Completion(lease.request_id, lease.attempt, json.dumps(data), 0.5)


# -- registry -------------------------------------------------------------------------


def test_every_script_file_is_registered_and_every_registration_has_a_file() -> None:
    files = {
        entry.name.removesuffix(".lua") for entry in LUA.iterdir() if entry.name.endswith(".lua")
    }

    assert files - {"_lib"} == set(SCRIPT_NAMES)


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_script_header_names_its_keys_argv_and_returns(name: str) -> None:
    lines = (LUA / f"{name}.lua").read_text().splitlines()
    header = "\n".join(line for line in lines[: lines.index("")] if line.startswith("--"))

    assert re.search(r"KEYS\[\d+\]|KEYS: none", header), f"{name}.lua: no KEYS in header"
    assert re.search(r"\bARGV\b", header), f"{name}.lua: no ARGV in header"
    assert "Returns" in header, f"{name}.lua: no Returns in header"


# -- enqueue ----------------------------------------------------------------------------


def test_the_protocol_default_max_retries_is_the_request_models() -> None:
    lib = (LUA / "_lib.lua").read_text()
    declared = re.search(r"^local DEFAULT_MAX_RETRIES = (\d+)$", lib, re.MULTILINE)

    assert declared is not None
    assert int(declared.group(1)) == DEFAULT_MAX_RETRIES
    assert ScrapingRequest(script_name="echo").max_retries == DEFAULT_MAX_RETRIES


async def test_enqueue_stores_a_pending_task_with_its_request(queue: RedisQueue) -> None:
    sent = request(parameters={"url": "https://example.com"}, priority=2, max_retries=1)

    await queue.enqueue_task(sent)

    stored = await record(queue, sent.request_id)
    assert stored["status"] == "pending"
    assert "attempt" not in stored  # absent (0) until the first claim: a smaller record
    assert stored["max_retries"] == "1"
    assert ScrapingRequest.from_stored(stored["request"], sent.request_id) == sent
    assert "request_id" not in json.loads(stored["request"])  # the key holds it
    assert await sets_holding(queue, sent.request_id) == {"pending"}
    assert await stat(queue, "enqueued") == 1


async def test_a_pending_task_record_leaves_out_attempt_and_a_default_max_retries(
    queue: RedisQueue,
) -> None:
    request_id = await add(queue)

    stored = await record(queue, request_id)
    assert "attempt" not in stored
    assert "max_retries" not in stored
    shown = await TaskManager(queue).get_task(request_id) or {}
    assert (shown["attempt"], shown["max_retries"]) == (0, DEFAULT_MAX_RETRIES)


async def test_claims_follow_priority_then_fifo(queue: RedisQueue, store: TaskStore) -> None:
    priorities = [0, 5, -1, 5, 0, 1000, -1000]
    ids = [await add(queue, priority=p) for p in priorities]

    claimed = [(await claim_one(store)).request_id for _ in ids]

    expected = sorted(range(len(ids)), key=lambda i: (-priorities[i], i))
    assert claimed == [ids[i] for i in expected]


async def test_enqueue_of_the_same_request_twice_stores_it_once(
    queue: RedisQueue, store: TaskStore
) -> None:
    sent = request()

    await queue.enqueue_task(sent)
    await queue.enqueue_task(sent)

    assert await admin(queue).zcard(queue.keys.pending) == 1
    assert await stat(queue, "enqueued") == 1
    assert await store.enqueue([queue.prepare(sent)]) == 0  # counts as stored, nothing new


async def test_enqueue_of_a_different_request_under_a_used_id_writes_nothing(
    queue: RedisQueue,
) -> None:
    await queue.enqueue_task(request(request_id="taken", parameters={"v": 1}))
    before = await admin(queue).get(queue.keys.seq)
    fresh = [request(), request(request_id="taken", parameters={"v": 2}), request()]

    with pytest.raises(DuplicateTaskException) as caught:
        await queue.enqueue_many(fresh)

    assert caught.value.request_id == "taken"
    assert not await admin(queue).exists(*(queue.keys.task(r.request_id) for r in fresh[::2]))
    assert await admin(queue).zcard(queue.keys.pending) == 1
    assert await admin(queue).get(queue.keys.seq) == before
    assert await stat(queue, "enqueued") == 1
    stored = await record(queue, "taken")
    assert json.loads(stored["request"])["parameters"] == {"v": 1}


async def test_one_batch_reusing_an_id_for_two_different_requests_writes_nothing(
    queue: RedisQueue,
) -> None:
    batch = [request(request_id="twice", parameters={"v": 1}), request(request_id="twice")]

    with pytest.raises(DuplicateTaskException):
        await queue.enqueue_many(batch)

    assert not await admin(queue).exists(queue.keys.task("twice"))
    assert await stat(queue, "enqueued") == 0


async def test_enqueue_with_a_damaged_gate_set_fails_before_writing_anything(
    settings: Settings, queue: RedisQueue, store: TaskStore
) -> None:
    await store.set_limits(derive(settings, rate_limits={"script:echo": 1.0}))
    await admin(queue).set(queue.keys.gate_prefix + "script:echo", "not a sorted set")
    batch = [request(), request()]

    with pytest.raises(ScriptError):
        await queue.enqueue_many(batch)

    assert not await admin(queue).exists(*(queue.keys.task(r.request_id) for r in batch))
    assert await admin(queue).get(queue.keys.seq) is None
    assert await stat(queue, "enqueued") == 0


async def test_enqueue_with_a_damaged_sequence_writes_no_task(queue: RedisQueue) -> None:
    # The sequence cannot restart (FIFO order would break), so enqueue refuses
    # before its first write; a damaged stats counter restarts instead
    # (tests/test_partial_state.py).
    await admin(queue).set(queue.keys.seq, "not a number")
    refused = request()

    with pytest.raises(ScriptError):
        await queue.enqueue_task(refused)

    assert not await admin(queue).exists(queue.keys.task(refused.request_id))
    assert await admin(queue).zcard(queue.keys.pending) == 0


async def test_enqueue_with_expires_in_records_the_deadline_on_the_redis_clock(
    queue: RedisQueue,
) -> None:
    before = await redis_ms(queue)
    request_id = await add(queue, expires_in=30)
    after = await redis_ms(queue)

    expires_at = int((await record(queue, request_id))["expires_at"])
    assert before + 30_000 <= expires_at <= after + 30_000


# -- claim ------------------------------------------------------------------------------


async def test_claim_leases_the_task_until_a_deadline_on_the_redis_clock(
    queue: RedisQueue, store: TaskStore
) -> None:
    request_id = await add(queue)
    before = await redis_ms(queue)

    lease = await claim_one(store, "w1")

    after = await redis_ms(queue)
    deadline = await admin(queue).zscore(queue.keys.running, request_id)
    assert deadline is not None
    assert before + store.lease_ms <= deadline <= after + store.lease_ms
    assert lease.attempt == 1
    assert lease.request_id == request_id
    assert (
        ScrapingRequest.from_stored(lease.request_json, lease.request_id).request_id == request_id
    )
    stored = await record(queue, request_id)
    assert (stored["status"], stored["worker"], stored["attempt"]) == ("running", "w1", "1")
    assert await sets_holding(queue, request_id) == {"running"}


async def test_each_claim_of_a_task_is_a_new_attempt(queue: RedisQueue, store: TaskStore) -> None:
    request_id = await add(queue)
    first = await claim_one(store, "w1")
    await expire_lease(queue, request_id)
    await store.requeue_expired()

    second = await claim_one(store, "w2")

    assert (first.attempt, second.attempt) == (1, 2)


async def test_claim_takes_up_to_count_tasks_and_reports_no_retry_due(
    queue: RedisQueue, store: TaskStore
) -> None:
    for _ in range(3):
        await add(queue)

    result = await store.claim("w1", 5)

    assert len(result.leases) == 3
    assert result.wait_ms == -1
    assert (await store.claim("w1", 5)).leases == []


async def test_claim_cancels_an_expired_task_instead_of_running_it(
    queue: RedisQueue, store: TaskStore
) -> None:
    stale = await add(queue, expires_in=0.01, priority=1)
    live = await add(queue)
    await asyncio.sleep(0.05)

    result = await store.claim("w1", 1)

    assert [lease.request_id for lease in result.leases] == [live]
    stored = await record(queue, stale)
    assert stored["status"] == "cancelled"
    assert json.loads(stored["response"])["error"] == "expired"
    assert await sets_holding(queue, stale) == set()
    assert await stat(queue, "cancelled") == 1


async def test_claim_promotes_a_retry_once_its_backoff_is_over(
    queue: RedisQueue, store: TaskStore
) -> None:
    request_id = await add(queue)
    first = await claim_one(store)
    await store.fail("w1", request_id, first.attempt, "boom", permanent=False)
    waiting = await store.claim("w1", 1)
    assert waiting.leases == []
    assert waiting.wait_ms >= 0

    await asyncio.sleep(waiting.wait_ms / 1000 + 0.02)
    retry = await claim_one(store)

    assert (retry.request_id, retry.attempt) == (request_id, 2)


async def test_claim_reports_how_long_until_the_next_retry_is_due(
    settings: Settings,
) -> None:
    slow = derive(settings, tasks={"retry_backoff": 5.0, "retry_backoff_max": 5.0})
    async with RedisQueue(slow) as queue:
        request_id = await add(queue)
        lease = await claim_one(queue.store)
        _, delay = await queue.store.fail("w1", request_id, lease.attempt, "x", permanent=False)

        result = await queue.store.claim("w1", 1)

    assert result.leases == []
    assert 0 < result.wait_ms <= round(delay * 1000)  # the delay is whole ms in Redis
    assert result.wait_ms > delay * 1000 - 1000


# -- complete -----------------------------------------------------------------------


async def test_complete_is_accepted_only_from_the_lease_holder(
    queue: RedisQueue, store: TaskStore
) -> None:
    request_id = await add(queue)
    lease = await claim_one(store, "w1")

    wrong_worker = await store.complete("w2", [done(lease)])
    wrong_attempt = await store.complete("w1", [Completion(request_id, 2, "null", 0.1)])
    holder = await store.complete("w1", [done(lease, {"ok": True})])

    assert (wrong_worker, wrong_attempt, holder) == ([False], [False], [True])
    assert (await record(queue, request_id))["status"] == "completed"
    assert await sets_holding(queue, request_id) == set()


async def test_repeated_completion_by_the_same_lease_is_accepted_and_counted_once(
    queue: RedisQueue, store: TaskStore
) -> None:
    await add(queue)
    lease = await claim_one(store)

    first = await store.complete("w1", [done(lease, 1)])
    retry = await store.complete("w1", [done(lease, 1)])

    assert (first, retry) == ([True], [True])
    assert await stat(queue, "completed") == 1


async def test_complete_stores_publishes_and_expires_the_response(
    queue: RedisQueue, store: TaskStore
) -> None:
    request_id = await add(queue)
    lease = await claim_one(store)
    async with subscribed(queue, queue.keys.done(request_id)) as pubsub:
        await store.complete("w1", [Completion(request_id, lease.attempt, '{"n":[1,2]}', 1.25)])
        message = await next_message(pubsub)

    stored = await record(queue, request_id)
    assert message["data"].decode() == stored["response"]
    response = json.loads(stored["response"])
    assert response["status"] == "completed"
    assert response["data"] == {"n": [1, 2]}
    assert response["execution_time"] == 1.25
    assert response["error"] is None
    ttl = await admin(queue).pttl(queue.keys.task(request_id))
    assert 0 < ttl <= 86_400_000


async def test_complete_of_several_leases_reports_each_one(
    queue: RedisQueue, store: TaskStore
) -> None:
    await add(queue)
    await add(queue)
    first, second = (await store.claim("w1", 2)).leases
    stale = Completion(second.request_id, second.attempt + 1, "null", 0.0)

    assert await store.complete("w1", [done(first), stale]) == [True, False]
    assert await stat(queue, "completed") == 1


# -- fail -----------------------------------------------------------------------------------


async def test_retry_delay_doubles_with_jitter_and_is_capped(settings: Settings) -> None:
    slow = derive(settings, tasks={"retry_backoff": 1.0, "retry_backoff_max": 3.0})
    delays: dict[int, list[float]] = {}
    async with RedisQueue(slow) as queue:
        for _ in range(12):
            await add(queue, max_retries=5)
        for attempt in (1, 2, 3, 4):
            leases = (await queue.store.claim("w1", 12)).leases
            assert [lease.attempt for lease in leases] == [attempt] * 12
            for lease in leases:
                before = await redis_ms(queue)
                outcome, delay = await queue.store.fail(
                    "w1", lease.request_id, lease.attempt, "boom", permanent=False
                )
                due = await admin(queue).zscore(queue.keys.delayed, lease.request_id)
                assert outcome is FailOutcome.RETRYING
                assert due is not None
                delay_ms = round(delay * 1000)
                assert before + delay_ms <= due <= await redis_ms(queue) + delay_ms
                delays.setdefault(attempt, []).append(delay)
                await make_due(queue, lease.request_id)

    # base delay: 1 s, doubling per attempt, capped at 3 s; jitter scales it by 0.75..1.25
    for attempt, base in ((1, 1.0), (2, 2.0), (3, 3.0), (4, 3.0)):
        assert all(0.75 * base - 0.001 <= d <= min(1.25 * base, 3.0) for d in delays[attempt])
    assert len(set(delays[1])) > 1, "the delay has no jitter"


@pytest.mark.parametrize("max_retries", [2, DEFAULT_MAX_RETRIES])  # the default is not stored
async def test_task_is_dead_lettered_after_max_retries_plus_one_attempts(
    queue: RedisQueue, store: TaskStore, max_retries: int
) -> None:
    request_id = await add(queue, max_retries=max_retries)
    attempts = range(1, max_retries + 2)
    outcomes = []
    for attempt in attempts:
        lease = await claim_one(store)
        assert lease.attempt == attempt
        outcome, _ = await store.fail(
            "w1", request_id, attempt, f"error {attempt}", permanent=False
        )
        outcomes.append(outcome)
        await make_due(queue, request_id)

    assert outcomes == [FailOutcome.RETRYING] * max_retries + [FailOutcome.DEAD_LETTERED]
    stored = await record(queue, request_id)
    assert stored["status"] == "failed"
    assert await sets_holding(queue, request_id) == {"dead"}
    history = json.loads(stored["history"])
    assert [(h["attempt"], h["error"], h["worker"]) for h in history] == [
        (attempt, f"error {attempt}", "w1") for attempt in attempts
    ]
    assert json.loads(stored["response"])["error"] == f"error {max_retries + 1}"
    assert await admin(queue).pttl(queue.keys.task(request_id)) > 0
    assert (await stat(queue, "retried"), await stat(queue, "failed")) == (max_retries, 1)


async def test_permanent_failure_goes_straight_to_the_dead_letters(
    queue: RedisQueue, store: TaskStore
) -> None:
    request_id = await add(queue, max_retries=3)
    lease = await claim_one(store)

    outcome, delay = await store.fail("w1", request_id, lease.attempt, "unknown", permanent=True)

    assert (outcome, delay) == (FailOutcome.DEAD_LETTERED, 0)
    assert await sets_holding(queue, request_id) == {"dead"}


async def test_failure_report_without_the_lease_is_refused_and_changes_nothing(
    queue: RedisQueue, store: TaskStore
) -> None:
    request_id = await add(queue)
    lease = await claim_one(store, "w1")
    before = await record(queue, request_id)

    refused = await store.fail("w2", request_id, lease.attempt, "not mine", permanent=True)

    assert refused == (FailOutcome.REFUSED, 0)
    assert await record(queue, request_id) == before
    assert await sets_holding(queue, request_id) == {"running"}


# -- renew --------------------------------------------------------------------------------


async def test_renew_pushes_the_lease_deadline_forward(queue: RedisQueue, store: TaskStore) -> None:
    request_id = await add(queue)
    lease = await claim_one(store)
    await admin(queue).zadd(queue.keys.running, {request_id: 1})

    lost = await store.renew("w1", [(request_id, lease.attempt)])

    assert lost == []
    deadline = await admin(queue).zscore(queue.keys.running, request_id)
    assert deadline is not None
    assert deadline >= await redis_ms(queue) + store.lease_ms - 1000


async def test_renew_reports_a_lease_taken_over_by_another_worker(
    queue: RedisQueue, store: TaskStore
) -> None:
    request_id = await add(queue)
    old = await claim_one(store, "w1")
    await expire_lease(queue, request_id)
    await store.requeue_expired()
    new = await claim_one(store, "w2")

    assert await store.renew("w1", [(request_id, old.attempt)]) == [request_id]
    assert await store.renew("w2", [(request_id, new.attempt)]) == []


# -- release ------------------------------------------------------------------------------


async def test_release_hands_a_task_back_at_its_place_without_burning_an_attempt(
    queue: RedisQueue, store: TaskStore
) -> None:
    first = await add(queue)
    await add(queue)
    lease = await claim_one(store)

    released = await store.release("w1", [(first, lease.attempt)], reason="drain")

    assert released == 1
    stored = await record(queue, first)
    assert (stored["status"], stored["attempt"]) == ("pending", "0")
    assert "worker" not in stored
    again = await claim_one(store, "w2")
    assert (again.request_id, again.attempt) == (first, 1)
    assert await stat(queue, "requeued") == 1


async def test_release_with_a_delay_parks_the_task_as_retrying(
    queue: RedisQueue, store: TaskStore
) -> None:
    request_id = await add(queue)
    lease = await claim_one(store)

    await store.release("w1", [(request_id, lease.attempt)], reason="rate_limited", delay=5)

    assert (await record(queue, request_id))["status"] == "retrying"
    assert await sets_holding(queue, request_id) == {"delayed"}
    assert 4000 < (await store.claim("w1", 1)).wait_ms <= 5000


async def test_release_skips_leases_the_worker_does_not_hold(
    queue: RedisQueue, store: TaskStore
) -> None:
    request_id = await add(queue)
    lease = await claim_one(store, "w1")

    assert await store.release("w2", [(request_id, lease.attempt)], reason="drain") == 0
    assert await store.release("w1", [(request_id, lease.attempt + 1)], reason="drain") == 0
    assert await sets_holding(queue, request_id) == {"running"}


# -- requeue_leases -------------------------------------------------------------------


async def test_expired_lease_is_requeued_at_its_original_place(
    queue: RedisQueue, store: TaskStore
) -> None:
    request_id = await add(queue, priority=3)
    score = await admin(queue).zscore(queue.keys.pending, request_id)
    await claim_one(store)
    await expire_lease(queue, request_id)

    assert await store.requeue_expired() == (1, 0)

    assert await admin(queue).zscore(queue.keys.pending, request_id) == score
    stored = await record(queue, request_id)
    assert stored["status"] == "pending"
    assert "worker" not in stored
    assert "not renewed" in stored["error"]


async def test_lease_within_its_deadline_is_left_alone(queue: RedisQueue, store: TaskStore) -> None:
    request_id = await add(queue)
    await claim_one(store)

    assert await store.requeue_expired() == (0, 0)
    assert await sets_holding(queue, request_id) == {"running"}


@pytest.mark.parametrize("max_retries", [2, DEFAULT_MAX_RETRIES])
async def test_task_whose_lease_keeps_expiring_ends_in_the_dead_letters(
    queue: RedisQueue, store: TaskStore, max_retries: int
) -> None:
    request_id = await add(queue, max_retries=max_retries)
    results = []
    for _ in range(max_retries + 1):
        await claim_one(store)
        await expire_lease(queue, request_id)
        results.append(await store.requeue_expired())

    assert results == [(1, 0)] * max_retries + [(0, 1)]
    stored = await record(queue, request_id)
    assert stored["status"] == "failed"
    assert await sets_holding(queue, request_id) == {"dead"}
    assert "not renewed" in json.loads(stored["response"])["error"]


async def test_requeue_of_a_dead_worker_touches_only_its_own_leases(
    queue: RedisQueue, store: TaskStore
) -> None:
    for _ in range(3):
        await add(queue)
    mine = (await store.claim("dead-worker", 2)).leases
    other = await claim_one(store, "alive-worker")

    assert await store.requeue_worker("dead-worker") == (2, 0)

    for lease in mine:
        assert await sets_holding(queue, lease.request_id) == {"pending"}
    assert await sets_holding(queue, other.request_id) == {"running"}


async def test_two_concurrent_requeues_take_back_an_expired_lease_once(
    queue: RedisQueue, store: TaskStore
) -> None:
    request_id = await add(queue)
    await claim_one(store)
    await expire_lease(queue, request_id)

    results = await asyncio.gather(store.requeue_expired(), store.requeue_expired())

    assert sorted(results) == [(0, 0), (1, 0)]
    assert await stat(queue, "requeued") == 1
    assert (await claim_one(store)).attempt == 2


# -- cancel -----------------------------------------------------------------------------


async def test_cancel_of_a_pending_task_removes_it_from_the_queue(
    queue: RedisQueue, store: TaskStore
) -> None:
    request_id = await add(queue)

    assert await store.cancel(request_id) is True

    stored = await record(queue, request_id)
    assert stored["status"] == "cancelled"
    assert json.loads(stored["response"])["status"] == "cancelled"
    assert await sets_holding(queue, request_id) == set()
    assert await admin(queue).pttl(queue.keys.task(request_id)) > 0


async def test_cancel_of_a_retrying_task_removes_it_from_the_delayed_set(
    queue: RedisQueue, store: TaskStore
) -> None:
    request_id = await add(queue)
    lease = await claim_one(store)
    await store.fail("w1", request_id, lease.attempt, "x", permanent=False)

    assert await store.cancel(request_id) is True
    assert await sets_holding(queue, request_id) == set()


async def test_cancelled_running_task_loses_its_lease_and_its_result(
    queue: RedisQueue, store: TaskStore
) -> None:
    request_id = await add(queue)
    lease = await claim_one(store)

    assert await store.cancel(request_id, reason="user") is True

    assert await store.renew("w1", [(request_id, lease.attempt)]) == [request_id]
    assert await store.complete("w1", [done(lease)]) == [False]
    assert (await store.fail("w1", request_id, lease.attempt, "x", permanent=False))[
        0
    ] is FailOutcome.REFUSED
    stored = await record(queue, request_id)
    assert stored["status"] == "cancelled"
    assert json.loads(stored["response"])["error"] == "user"
    assert await sets_holding(queue, request_id) == set()


async def test_cancel_of_a_finished_or_unknown_task_is_refused(
    queue: RedisQueue, store: TaskStore
) -> None:
    completed = await add(queue)
    await store.complete("w1", [done(await claim_one(store))])
    cancelled = await add(queue)
    await store.cancel(cancelled)

    assert await store.cancel(completed) is False
    assert await store.cancel(cancelled) is False
    assert await store.cancel("never-enqueued") is False
    assert (await record(queue, completed))["status"] == "completed"


# -- dlq_requeue / dlq_purge -----------------------------------------------------------------


async def dead_letter(queue: RedisQueue, error: str = "broken") -> str:
    request_id = await add(queue)
    lease = await claim_one(queue.store)
    await queue.store.fail("w1", request_id, lease.attempt, error, permanent=True)
    return request_id


async def test_dead_letter_requeue_restarts_attempts_and_keeps_history(
    queue: RedisQueue, store: TaskStore
) -> None:
    request_id = await dead_letter(queue)

    assert await store.dlq_requeue([request_id]) == (1, False, 1)

    stored = await record(queue, request_id)
    assert (stored["status"], stored["attempt"]) == ("pending", "0")
    assert "response" not in stored
    assert len(json.loads(stored["history"])) == 1
    assert await admin(queue).pttl(queue.keys.task(request_id)) == -1
    assert await sets_holding(queue, request_id) == {"pending"}
    assert (await claim_one(store)).attempt == 1


async def test_dead_letter_requeue_all_and_of_non_dead_ids(
    queue: RedisQueue, store: TaskStore
) -> None:
    dead = [await dead_letter(queue) for _ in range(3)]
    pending = await add(queue)

    assert await store.dlq_requeue([pending, "unknown"]) == (0, False, 0)
    assert await store.dlq_requeue(None) == (3, False, 3)
    assert await admin(queue).zcard(queue.keys.dead) == 0
    assert all([await sets_holding(queue, i) == {"pending"} for i in dead])


async def test_dead_letter_requeue_all_takes_a_bounded_batch_oldest_first(
    queue: RedisQueue, store: TaskStore
) -> None:
    dead = []
    for _ in range(5):
        dead.append(await dead_letter(queue))
        await asyncio.sleep(0.002)  # "oldest" is by the ms each was dead-lettered: no ties

    assert await store.dlq_requeue(None, limit=2) == (2, False, 2)

    assert all([await sets_holding(queue, i) == {"pending"} for i in dead[:2]])
    assert all([await sets_holding(queue, i) == {"dead"} for i in dead[2:]])


async def test_dead_letter_requeue_stops_at_the_high_watermark(
    settings: Settings,
) -> None:
    async with RedisQueue(
        derive(settings, backpressure={"high_watermark": 3, "low_watermark": 1, "throttle_at": 2})
    ) as queue:
        dead = [await dead_letter(queue) for _ in range(3)]
        await add(queue)  # depth 1 of 3

        requeued, full, _ = await queue.store.dlq_requeue(None)

        assert (requeued, full) == (2, True)
        assert await admin(queue).zcard(queue.keys.pending) == 3
        assert sum([await sets_holding(queue, i) == {"dead"} for i in dead]) == 1
        with pytest.raises(BackpressureException, match="high watermark after 0"):
            await TaskManager(queue).requeue_all_dead_letters()


async def test_purge_deletes_every_dead_letter_and_its_record(
    queue: RedisQueue, store: TaskStore
) -> None:
    dead = [await dead_letter(queue) for _ in range(2)]
    alive = await add(queue)

    assert await store.dlq_purge() == 2

    assert not await admin(queue).exists(queue.keys.dead, *map(queue.keys.task, dead))
    assert await sets_holding(queue, alive) == {"pending"}


# -- cleanup ------------------------------------------------------------------------------


async def test_cleanup_drops_dead_letters_older_than_the_result_ttl(settings: Settings) -> None:
    short = derive(settings, tasks={"result_ttl": 0.2})
    async with RedisQueue(short) as queue:
        old = await dead_letter(queue)
        await asyncio.sleep(0.3)
        young = await dead_letter(queue)

        assert await queue.store.cleanup() == (1, 0)

        assert await sets_holding(queue, old) == set()
        assert await sets_holding(queue, young) == {"dead"}


async def test_cleanup_forgets_workers_silent_for_long(queue: RedisQueue, store: TaskStore) -> None:
    await store.heartbeat("gone", {}, register=True)
    await store.heartbeat("here", {}, register=True)
    await admin(queue).zadd(queue.keys.workers, {"gone": 1})

    assert await store.cleanup() == (0, 1)

    assert await admin(queue).zrange(queue.keys.workers, 0, -1) == [b"here"]
    assert not await admin(queue).exists(queue.keys.worker("gone"))


# -- heartbeat / mark_lost ---------------------------------------------------------------


async def test_heartbeat_registers_a_worker_on_the_redis_clock(
    queue: RedisQueue, store: TaskStore
) -> None:
    before = await redis_ms(queue)

    at = await store.heartbeat("w1", {"pid": 42, "host": "h"}, register=True)

    assert before <= at <= await redis_ms(queue)
    worker = await read_hash(queue, queue.keys.worker("w1"))
    assert worker["status"] == "active"
    assert worker["last_heartbeat"] == str(at)
    assert (worker["pid"], worker["host"], worker["tasks_processed"]) == ("42", "h", "0")
    assert await admin(queue).zscore(queue.keys.workers, "w1") == at


async def test_heartbeat_keeps_the_task_counter_and_revives_a_lost_worker(
    queue: RedisQueue, store: TaskStore
) -> None:
    await store.heartbeat("w1", {}, register=True)
    await admin(queue).hset(queue.keys.worker("w1"), mapping={"tasks_processed": 7})
    await admin(queue).zadd(queue.keys.workers, {"w1": 1})
    assert await store.mark_lost(1.0) == ["w1"]

    await store.heartbeat("w1", {"rss_bytes": 1024})

    raw = await admin(queue).hmget(queue.keys.worker("w1"), ["status", "tasks_processed"])
    assert raw == [b"active", b"7"]


async def test_mark_lost_reports_each_silent_worker_once_across_callers(
    queue: RedisQueue, store: TaskStore
) -> None:
    for worker in ("silent", "alive"):
        await store.heartbeat(worker, {}, register=True)
    await admin(queue).zadd(queue.keys.workers, {"silent": 1})

    first, second = await asyncio.gather(store.mark_lost(1.0), store.mark_lost(1.0))

    assert sorted(first + second) == ["silent"]
    assert await store.mark_lost(1.0) == []
    status = await admin(queue).hget(queue.keys.worker("silent"), "status")
    assert status == b"inactive"


# -- lock -------------------------------------------------------------------------------


async def test_lock_is_held_by_one_owner_renewed_by_it_and_freed_only_by_it(
    queue: RedisQueue, store: TaskStore
) -> None:
    key = queue.keys.reaper_lock

    assert await store.hold_lock(key, "a", 5.0) is True
    assert await store.hold_lock(key, "b", 5.0) is False
    assert await store.hold_lock(key, "a", 10.0) is True  # renewal
    assert 5_000 < await admin(queue).pttl(key) <= 10_000
    await store.release_lock(key, "b")
    assert await store.hold_lock(key, "b", 5.0) is False
    await store.release_lock(key, "a")
    assert await store.hold_lock(key, "b", 5.0) is True


async def test_lock_of_an_owner_that_stopped_renewing_is_free_after_its_lease(
    queue: RedisQueue, store: TaskStore
) -> None:
    key = queue.keys.governor_lock
    await store.hold_lock(key, "gone", 0.05)
    await asyncio.sleep(0.1)

    assert await store.hold_lock(key, "next", 5.0) is True


# -- set_limits ---------------------------------------------------------------------------


async def test_set_limits_replaces_every_limit_at_once(settings: Settings) -> None:
    first = derive(settings, rate_limits={"script:echo": 5.0, "domain:a.example": 1.0})
    second = derive(settings, rate_limits={"default_domain": 2.0})
    async with RedisQueue(first) as queue:
        await queue.store.set_limits(first)

        written = await queue.store.set_limits(second)

        limits = await read_hash(queue, queue.keys.limits)
    assert written == len(limits)
    assert limits["default_domain"] == "2.0"
    assert "script:echo" not in limits
    assert "domain:a.example" not in limits


# -- backpressure -------------------------------------------------------------------------


async def test_backpressure_state_is_published_and_its_changes_reported(
    queue: RedisQueue, store: TaskStore
) -> None:
    assert await store.publish_backpressure("open", 10, 0.0, 5.0) == ""
    assert await store.publish_backpressure("open", 11, 0.0, 5.0) == "open"
    assert await store.publish_backpressure("closed", 200, 0.0, 5.0) == "open"

    published = await read_hash(queue, queue.keys.backpressure)
    assert (published["state"], published["depth"]) == ("closed", "200")


async def test_enqueue_is_refused_while_the_governor_says_closed_and_writes_nothing(
    queue: RedisQueue, store: TaskStore
) -> None:
    await store.publish_backpressure("closed", 10, 0.0, 5.0)
    refused = request()

    with pytest.raises(BackpressureException) as caught:
        await queue.enqueue_task(refused)

    assert caught.value.retry_after > 0
    assert not await admin(queue).exists(queue.keys.task(refused.request_id))
    assert await admin(queue).zcard(queue.keys.pending) == 0


async def test_enqueue_past_the_high_watermark_is_refused_whole(settings: Settings) -> None:
    capped = derive(
        settings, backpressure={"high_watermark": 3, "low_watermark": 2, "throttle_at": 3}
    )
    async with RedisQueue(capped) as queue:
        await queue.enqueue_many([request(), request()])

        with pytest.raises(BackpressureException):
            await queue.enqueue_many([request(), request()])

        assert await admin(queue).zcard(queue.keys.pending) == 2
        await queue.enqueue_task(request())  # exactly at the cap is allowed
