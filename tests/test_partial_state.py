"""No partial state: a script that meets a refusal or a damaged value after its
first write still leaves every task in the set its status names, and the
reaper's sweep repairs records that something else left in no set.

Redis does not roll a script back, so these tests provoke each failure a
review found (an ACL user without channel rights, damaged numbers, a huge
batch) against the real redis-server and then check the invariant on the
raw keys.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from helpers import admin, wait_for
from test_reaper_heartbeat import running
from test_store_scripts import derive, read_hash, record, request, sets_holding

from actors.endpoint import RedisEndpoint
from actors.exceptions import QueueConnectionException
from actors.keys import KeySpace
from actors.models import ScrapingRequest, TaskStatus
from actors.multiplexed import MultiplexedConnection
from actors.queue import RedisQueue, TaskManager
from actors.reaper import Reaper
from actors.store import MAX_ERROR_CHARS, Completion, TaskStore
from config.settings import Settings

#: The set each live status must be found in (a pending task may wait in a gate instead).
HOME = {"pending": "pending", "running": "running", "retrying": "delayed"}


async def orphans(queue: RedisQueue) -> list[str]:
    """Ids of task records whose status names a set that does not hold them."""
    found = []
    async for key in admin(queue).scan_iter(match=queue.keys.task_prefix + "*"):
        request_id = key.decode()[len(queue.keys.task_prefix) :]
        fields = await record(queue, request_id)
        home = HOME.get(fields.get("status", ""))
        if home is None:
            continue
        gate = fields.get("gate")
        gated = gate is not None and (
            await admin(queue).zscore(queue.keys.gate_prefix + gate, request_id) is not None
        )
        if home not in await sets_holding_live(queue, request_id) and not gated:
            found.append(request_id)
    return found


async def sets_holding_live(queue: RedisQueue, request_id: str) -> set[str]:
    held = await sets_holding(queue, request_id)
    return {name for name in held if name != "dead"}


@pytest.fixture
async def restricted_url(redis_url: str, redis_client: Any) -> AsyncIterator[str]:
    """An ACL user with every command and key but no channel: Redis 7's default for a new user."""
    user, password = f"u{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    await redis_client.execute_command(
        "ACL", "SETUSER", user, "on", f">{password}", "~*", "+@all", "resetchannels"
    )
    yield redis_url.replace("redis://", f"redis://{user}:{password}@", 1)
    await redis_client.execute_command("ACL", "DELUSER", user)


@contextlib.asynccontextmanager
async def store_as(settings: Settings, url: str) -> AsyncIterator[TaskStore]:
    """The scripts, run as the Redis user of ``url``.

    Below the API on purpose: ``RedisQueue.connect`` refuses a user without a
    right the API needs (test_a_user_without_channel_rights_is_refused_at_connect),
    but a right can also be taken away while the system runs.
    """
    connection = MultiplexedConnection(RedisEndpoint.parse(url), retries=0)
    try:
        yield TaskStore(connection, KeySpace(settings.redis.key_prefix), settings)
    finally:
        await connection.close()


async def test_a_user_without_channel_rights_is_refused_at_connect(
    settings: Settings, restricted_url: str
) -> None:
    with pytest.raises(QueueConnectionException, match="PUBLISH"):
        await RedisQueue(derive(settings, redis={"url": restricted_url})).connect()


async def test_enqueue_by_a_user_without_channel_rights_still_queues_the_task(
    settings: Settings, restricted_url: str, queue: RedisQueue
) -> None:
    request_id = request().request_id
    async with store_as(settings, restricted_url) as restricted:
        await restricted.enqueue([queue.prepare(request(request_id=request_id))])

    assert await sets_holding(queue, request_id) == {"pending"}
    assert (await record(queue, request_id))["status"] == "pending"


async def test_claim_of_a_batch_by_a_user_without_channel_rights_leases_every_task(
    settings: Settings, restricted_url: str, queue: RedisQueue
) -> None:
    ids = [await queue.enqueue_task(request()) for _ in range(3)]

    async with store_as(settings, restricted_url) as restricted:
        claim = await restricted.claim("w1", 3)
        assert sorted(lease.request_id for lease in claim.leases) == sorted(ids)
        done = await restricted.complete(
            "w1", [Completion(lease.request_id, lease.attempt, "{}", 0.1) for lease in claim.leases]
        )

    assert done == [True, True, True]
    for request_id in ids:
        assert (await record(queue, request_id))["status"] == "completed"
    assert await orphans(queue) == []


async def test_a_failure_reported_by_a_user_without_channel_rights_is_retried(
    settings: Settings, restricted_url: str, queue: RedisQueue, manager: TaskManager
) -> None:
    request_id = await queue.enqueue_task(request())

    async with store_as(settings, restricted_url) as restricted:
        lease = (await restricted.claim("w1", 1)).leases[0]
        outcome, _ = await restricted.fail("w1", request_id, lease.attempt, "boom", permanent=False)

    assert outcome.name == "RETRYING"
    assert await sets_holding(queue, request_id) == {"delayed"}


async def test_claim_of_a_batch_with_a_damaged_expires_at_leases_every_task(
    queue: RedisQueue,
) -> None:
    ids = [await queue.enqueue_task(request(expires_in=60)) for _ in range(3)]
    await admin(queue).hset(queue.keys.task(ids[1]), "expires_at", "not a number")

    claim = await queue.store.claim("w1", 3)

    assert sorted(lease.request_id for lease in claim.leases) == sorted(ids)
    assert await orphans(queue) == []


@pytest.mark.parametrize("damaged", ["paused", "rate state", "breaker failures", "limit"])
async def test_claim_with_a_damaged_rate_limit_value_loses_no_task(
    settings: Settings, queue: RedisQueue, damaged: str
) -> None:
    await queue.store.set_limits(
        derive(
            settings,
            rate_limits={"domain:a.test": 1000.0},
            circuit_breaker={"failures": 3},
            politeness={"max_in_flight_per_domain": 0},  # a damaged limit: no slow start
        )
    )
    ids = [
        await queue.enqueue_task(request(parameters={"url": "https://a.test/"})) for _ in range(3)
    ]
    key = "domain:a.test"
    target = {
        "paused": queue.keys.paused,
        "rate state": queue.keys.rate_state,
        "breaker failures": queue.keys.breaker,
        "limit": queue.keys.limits,
    }[damaged]
    await admin(queue).hset(target, key, "not a number")

    claim = await queue.store.claim("w1", 3)

    assert sorted(lease.request_id for lease in claim.leases) == sorted(ids)
    assert await orphans(queue) == []


async def test_a_failure_with_a_damaged_breaker_count_is_retried(
    settings: Settings, queue: RedisQueue
) -> None:
    await queue.store.set_limits(derive(settings, circuit_breaker={"failures": 3}))
    request_id = await queue.enqueue_task(request(parameters={"url": "https://a.test/"}))
    lease = (await queue.store.claim("w1", 1)).leases[0]
    await admin(queue).hset(queue.keys.breaker, "domain:a.test", "not a number")

    outcome, _ = await queue.store.fail("w1", request_id, lease.attempt, "boom", permanent=False)

    assert outcome.name == "RETRYING"
    assert await sets_holding(queue, request_id) == {"delayed"}
    assert (await read_hash(queue, queue.keys.breaker))["domain:a.test"] == "1"


@pytest.mark.parametrize("counter", ["started", "completed", "failed", "retried", "enqueued"])
async def test_a_damaged_stats_counter_restarts_instead_of_failing_the_change(
    queue: RedisQueue, counter: str
) -> None:
    await admin(queue).hset(queue.keys.stats, counter, "not a number")
    request_id = await queue.enqueue_task(request(max_retries=1))
    lease = (await queue.store.claim("w1", 1)).leases[0]
    if counter in ("failed", "retried"):
        outcome, _ = await queue.store.fail("w1", request_id, lease.attempt, "x", permanent=False)
        assert outcome.name == "RETRYING"
        await admin(queue).zadd(queue.keys.delayed, {request_id: 0}, xx=True)
        lease = (await queue.store.claim("w1", 1)).leases[0]
        outcome, _ = await queue.store.fail("w1", request_id, lease.attempt, "x", permanent=False)
        assert outcome.name == "DEAD_LETTERED"
        assert await sets_holding(queue, request_id) == {"dead"}
    else:
        done = await queue.store.complete("w1", [Completion(request_id, lease.attempt, "{}", 0.1)])
        assert done == [True]
    assert (await read_hash(queue, queue.keys.stats))[counter] in {"1", "2"}


async def test_one_enqueue_call_of_five_thousand_tasks_stores_them_all(
    queue: RedisQueue,
) -> None:
    items = [queue.prepare(request()) for _ in range(5000)]

    written = await queue.store.enqueue(items)

    assert written == 5000
    assert await admin(queue).zcard(queue.keys.pending) == 5000


# -- the sweep ----------------------------------------------------------------------------


async def plant(queue: RedisQueue, status: str | None, **fields: Any) -> str:
    """A task record written by hand, in no queue set."""
    request_id = f"planted-{uuid.uuid4().hex[:8]}"
    mapping: dict[str, Any] = {
        "request": ScrapingRequest(script_name="echo", request_id=request_id).stored_json(),
        "score": 5,
        **fields,
    }
    if status is not None:
        mapping["status"] = status
    await admin(queue).hset(queue.keys.task(request_id), mapping=mapping)
    return request_id


async def test_repair_puts_each_record_back_where_its_status_says(queue: RedisQueue) -> None:
    pending = await plant(queue, "pending")
    gated = await plant(queue, "pending", gate="domain:gone.test")
    retrying = await plant(queue, "retrying", attempt=1)
    running_id = await plant(queue, "running", attempt=1, worker="w-gone")
    failed = await plant(queue, "failed", attempt=4)
    statusless = await plant(queue, None)
    healthy = await queue.enqueue_task(request())
    ids = [pending, gated, retrying, running_id, failed, statusless, healthy]

    repaired = await queue.store.repair(ids)

    assert sorted(repaired) == sorted(ids[:-1])
    assert await sets_holding(queue, pending) == {"pending"}
    assert await admin(queue).zscore(queue.keys.pending, pending) == 5
    assert await sets_holding(queue, gated) == {"pending"}
    assert "gate" not in await record(queue, gated)
    assert await sets_holding(queue, retrying) == {"delayed"}
    assert await sets_holding(queue, running_id) == {"running"}
    assert await sets_holding(queue, failed) == {"dead"}
    assert await admin(queue).pttl(queue.keys.task(failed)) > 0
    assert await sets_holding(queue, statusless) == {"dead"}
    assert (await record(queue, statusless))["status"] == "failed"
    assert await sets_holding(queue, healthy) == {"pending"}
    assert (await read_hash(queue, queue.keys.stats))["repaired"] == "6"
    assert await queue.store.repair(ids) == []  # a second pass finds nothing to do


@pytest.fixture
async def own_database(settings: Settings) -> AsyncIterator[RedisQueue]:
    """A queue on a database of its own, emptied first.

    The sweep walks a whole database 200 keys a pass; the session server's
    database 0 holds every other test's keys.
    """
    base = settings.redis.url.rsplit("/", 1)[0]
    own = derive(settings, redis={"url": f"{base}/9"})
    async with RedisQueue(own) as queue:
        await queue.connection.execute("FLUSHDB")
        yield queue


async def test_reaper_sweep_finds_a_record_in_no_set_and_it_completes(
    own_database: RedisQueue,
) -> None:
    queue, manager = own_database, TaskManager(own_database)
    settings = queue.settings
    lost = await plant(queue, "pending")
    stuck = await plant(queue, "running", attempt=1, worker="w-gone")

    async with running(Reaper("r-sweep", settings, os.getppid())):
        await wait_for(lambda: orphans_cleared(queue), 10, message="the sweep repaired nothing")
        # The running one goes back through the normal lease expiry: pending again.
        await wait_for(
            lambda: status_is(manager, stuck, TaskStatus.PENDING), 10, message="not requeued"
        )

    for request_id in (lost, stuck):
        assert await sets_holding(queue, request_id) == {"pending"}
    assert (await read_hash(queue, queue.keys.stats))["repaired"] == "2"


async def orphans_cleared(queue: RedisQueue) -> bool:
    return await orphans(queue) == []


async def status_is(manager: TaskManager, request_id: str, status: TaskStatus) -> bool:
    return await manager.get_task_status(request_id) is status


async def test_a_huge_error_is_stored_cut_with_a_marker_everywhere_it_goes(
    queue: RedisQueue, manager: TaskManager
) -> None:
    page = "<html>" + "x" * 5_000_000
    request_id = await queue.enqueue_task(request(max_retries=1))
    lease = (await queue.store.claim("w1", 1)).leases[0]

    await queue.store.fail("w1", request_id, lease.attempt, page, permanent=True)

    stored = await record(queue, request_id)
    assert len(stored["error"]) == MAX_ERROR_CHARS
    assert stored["error"].endswith("[truncated: the error had 5000006 characters]")
    assert all(len(entry["error"]) == MAX_ERROR_CHARS for entry in json.loads(stored["history"]))
    response = await manager.get_response(request_id)
    assert response is not None
    assert response.error == stored["error"]


@pytest.mark.parametrize("field", ["n", "w", "r", "s", "x", "paced set"])
async def test_claim_and_reports_with_damaged_politeness_state_lose_no_task(
    settings: Settings, queue: RedisQueue, field: str
) -> None:
    """A per-domain politeness field, or the set of domains with a learned rate,
    damaged from outside never aborts a script half-way; the 429 is still learned."""
    await queue.store.set_limits(settings)
    for _ in range(3):
        await queue.enqueue_task(request(parameters={"url": "https://a.test/"}))
    if field == "paced set":
        await admin(queue).set(queue.keys.paced, "not a set")
    else:
        await admin(queue).hset(queue.keys.domain("domain:a.test"), field, "not a number")

    claimed = (await queue.store.claim("w1", 3)).leases
    await queue.store.release(
        "w1",
        [(claimed[0].request_id, claimed[0].attempt)],
        reason="rate_limited",
        pause_key="domain:a.test",
        pause=0.01,
    )

    assert claimed
    assert await orphans(queue) == []
    assert await admin(queue).hget(queue.keys.domain("domain:a.test"), "r") is not None
    assert await queue.store.prune_domains("0 0 0", 100, 0.001, 0.001)


async def test_a_domain_hash_of_another_type_aborts_no_claim_completion_or_status(
    settings: Settings, queue: RedisQueue, manager: TaskManager
) -> None:
    """A domain's hash replaced from outside by another type reads as empty: a claim
    aborted half-way would leave the task it popped in no set."""
    await queue.store.set_limits(settings)
    await queue.enqueue_many([request(parameters={"url": "https://a.test/"}) for _ in range(3)])
    await admin(queue).set(queue.keys.domain("domain:a.test"), "not a hash")
    await admin(queue).zadd(queue.keys.domains, {"domain:a.test": 1})  # indexed before

    claimed = (await queue.store.claim("w1", 3)).leases
    await queue.store.complete(
        "w1", [Completion(lease.request_id, lease.attempt, "1", 0.1) for lease in claimed]
    )

    assert len(claimed) == 3
    assert await orphans(queue) == []
    assert (await manager.queue_stats())["completed"] == 3
    assert [domain["domain"] for domain in await manager.domains()] == ["a.test"]


async def test_a_damaged_politeness_index_aborts_no_script_and_no_status(
    settings: Settings, queue: RedisQueue, manager: TaskManager
) -> None:
    """The last-seen index of the wrong type (a key written from outside, or by an
    earlier layout) only times pruning: claims, reports, the reaper's step and
    ``status`` go on."""
    await queue.store.set_limits(settings)
    for _ in range(3):
        await queue.enqueue_task(request(parameters={"url": "https://a.test/"}))
    await admin(queue).hset(queue.keys.domains, "r:domain:a.test", "1")  # a hash, not a zset

    claimed = (await queue.store.claim("w1", 3)).leases
    await queue.store.release(
        "w1",
        [(claimed[0].request_id, claimed[0].attempt)],
        reason="rate_limited",
        pause_key="domain:a.test",
        pause=0.01,
    )

    assert claimed
    assert await orphans(queue) == []
    assert await queue.store.prune_domains("0 0 0", 100, 0.001, 0.001)
    assert await manager.domains() == []


async def test_a_politeness_policy_of_another_type_aborts_no_claim_or_report(
    settings: Settings, queue: RedisQueue, manager: TaskManager
) -> None:
    """The policy hash replaced from outside reads as no politeness: a completion or
    failure that had already moved its task must not abort on it half-way."""
    await queue.store.set_limits(settings)
    ids = await queue.enqueue_many(
        [request(parameters={"url": "https://a.test/"}, max_retries=0) for _ in range(3)]
    )
    first = (await queue.store.claim("w1", 2)).leases
    await admin(queue).set(queue.keys.politeness, "not a hash")

    await queue.store.complete("w1", [Completion(first[0].request_id, first[0].attempt, "1", 0.1)])
    await queue.store.fail("w1", first[1].request_id, first[1].attempt, "x", permanent=True)
    last = (await queue.store.claim("w1", 1)).leases

    assert [lease.request_id for lease in last] == [ids[2]]
    assert await orphans(queue) == []
    stats = await manager.queue_stats()
    assert (stats["completed"], stats["failed"], stats["running"]) == (1, 1, 1)
