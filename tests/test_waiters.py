"""wait_for_response: push-based, many waits on one connection, robust to lost connections."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio
from helpers import looping, wait_for

from actors.exceptions import QueueConnectionException, TaskTimeoutException
from actors.models import ScrapingRequest, ScrapingResponse, TaskStatus
from actors.queue import RedisQueue
from actors.store import Completion, Lease
from config.settings import Settings
from supervisor.redis_server import RedisServer


@pytest.fixture
async def gateway(settings: Settings) -> AsyncIterator[RedisQueue]:
    async with RedisQueue(settings) as connected:
        yield connected


@pytest.fixture
async def worker(settings: Settings) -> AsyncIterator[RedisQueue]:
    """The worker side: its own connection, as a worker process has."""
    async with RedisQueue(settings) as connected:
        yield connected


async def leased(gateway: RedisQueue, worker: RedisQueue, count: int = 1) -> list[Lease]:
    """Enqueue ``count`` tasks and lease them all to worker ``w1``."""
    await gateway.enqueue_many([ScrapingRequest(script_name="echo") for _ in range(count)])
    leases = (await worker.store.claim("w1", count)).leases
    assert len(leases) == count
    return leases


async def finish(worker: RedisQueue, leases: list[Lease]) -> None:
    results = [Completion(lease.request_id, lease.attempt, '"done"', 0.1) for lease in leases]
    assert all(await worker.store.complete("w1", results))


async def subscribers(client: redis.asyncio.Redis, queue: RedisQueue, request_id: str) -> int:
    ((_, count),) = await client.pubsub_numsub(queue.keys.done(request_id))
    return int(count)


async def subscribed(client: redis.asyncio.Redis, queue: RedisQueue, request_id: str) -> bool:
    return await subscribers(client, queue, request_id) > 0


def answered(response: Any, request_id: str) -> bool:
    return (
        isinstance(response, ScrapingResponse)
        and response.request_id == request_id
        and response.status is TaskStatus.COMPLETED
        and response.data == "done"
    )


async def test_result_that_landed_before_the_wait_is_returned(
    gateway: RedisQueue, worker: RedisQueue
) -> None:
    (lease,) = await leased(gateway, worker)
    await finish(worker, [lease])

    response = await asyncio.wait_for(gateway.wait_for_response(lease.request_id, 10), 2)

    assert answered(response, lease.request_id)


async def test_result_is_pushed_to_a_waiting_caller(
    gateway: RedisQueue, worker: RedisQueue, redis_client: redis.asyncio.Redis
) -> None:
    (lease,) = await leased(gateway, worker)
    waiting = asyncio.create_task(gateway.wait_for_response(lease.request_id, 10))
    await wait_for(lambda: subscribed(redis_client, gateway, lease.request_id))
    started = time.monotonic()

    await finish(worker, [lease])

    assert answered(await waiting, lease.request_id)
    assert time.monotonic() - started < 1
    assert await subscribers(redis_client, gateway, lease.request_id) == 0


async def test_wait_without_a_result_raises_task_timeout(
    gateway: RedisQueue, worker: RedisQueue, redis_client: redis.asyncio.Redis
) -> None:
    (lease,) = await leased(gateway, worker)
    started = time.monotonic()

    with pytest.raises(TaskTimeoutException) as caught:
        await gateway.wait_for_response(lease.request_id, 0.2)

    assert time.monotonic() - started >= 0.2
    assert (caught.value.request_id, caught.value.timeout) == (lease.request_id, 0.2)
    assert await subscribers(redis_client, gateway, lease.request_id) == 0


async def test_two_waits_on_one_task_are_both_answered(
    gateway: RedisQueue, worker: RedisQueue, redis_client: redis.asyncio.Redis
) -> None:
    (lease,) = await leased(gateway, worker)
    first = asyncio.create_task(gateway.wait_for_response(lease.request_id, 10))
    second = asyncio.create_task(gateway.wait_for_response(lease.request_id, 10))
    await wait_for(lambda: subscribed(redis_client, gateway, lease.request_id))

    await finish(worker, [lease])
    late = await gateway.wait_for_response(lease.request_id, 10)

    assert all(answered(r, lease.request_id) for r in (await first, await second, late))


async def test_many_waits_share_one_subscriber_connection(
    gateway: RedisQueue, worker: RedisQueue, redis_client: redis.asyncio.Redis
) -> None:
    before = len(await redis_client.client_list(_type="pubsub"))
    leases = await leased(gateway, worker, 200)
    waits = [gateway.wait_for_response(lease.request_id, 10) for lease in leases]
    waiting = asyncio.gather(*waits)
    await wait_for(lambda: subscribed(redis_client, gateway, leases[-1].request_id))

    assert len(await redis_client.client_list(_type="pubsub")) == before + 1
    await finish(worker, leases)
    responses = await waiting

    assert all(answered(r, lease.request_id) for r, lease in zip(responses, leases, strict=True))


async def test_two_thousand_concurrent_waits_are_answered_on_a_few_connections(
    settings: Settings, worker: RedisQueue, redis_client: redis.asyncio.Redis
) -> None:
    total = 2000
    leases = await leased(worker, worker, total)
    before, after = leases[: total // 2], leases[total // 2 :]
    await finish(worker, before)
    accepted_before = (await redis_client.info("stats"))["total_connections_received"]
    peak = 0

    async def sample_clients() -> None:
        nonlocal peak
        peak = max(peak, (await redis_client.info("clients"))["connected_clients"])

    async with looping(sample_clients, 0.02), RedisQueue(settings) as gateway:
        waits = [gateway.wait_for_response(lease.request_id, 5) for lease in leases]
        waiting = asyncio.gather(*waits, return_exceptions=True)
        await wait_for(lambda: subscribed(redis_client, gateway, after[-1].request_id))
        await finish(worker, after)
        responses = await waiting
    accepted = (await redis_client.info("stats"))["total_connections_received"] - accepted_before

    failures = [
        r for r, lease in zip(responses, leases, strict=True) if not answered(r, lease.request_id)
    ]
    assert failures == []
    assert peak < 20
    assert accepted < 20


async def test_wait_gets_a_result_published_while_its_subscription_was_killed(
    gateway: RedisQueue, worker: RedisQueue, redis_client: redis.asyncio.Redis
) -> None:
    (lease,) = await leased(gateway, worker)
    waiting = asyncio.create_task(gateway.wait_for_response(lease.request_id, 10))
    await wait_for(lambda: subscribed(redis_client, gateway, lease.request_id))

    assert await redis_client.client_kill_filter(_type="pubsub") >= 1
    assert await subscribers(redis_client, gateway, lease.request_id) == 0
    started = time.monotonic()
    await finish(worker, [lease])  # published to nobody

    assert answered(await waiting, lease.request_id)
    assert time.monotonic() - started < 5, "answered by the final read, not the resubscription"


async def test_wait_across_a_redis_restart_gets_the_result_written_after_it(
    gateway: RedisQueue,
    worker: RedisQueue,
    redis_server: RedisServer,
    redis_client: redis.asyncio.Redis,
) -> None:
    (lease,) = await leased(gateway, worker)
    waiting = asyncio.create_task(gateway.wait_for_response(lease.request_id, 15))
    await wait_for(lambda: subscribed(redis_client, gateway, lease.request_id))

    redis_server.restart()
    started = time.monotonic()
    await finish(worker, [lease])

    assert answered(await waiting, lease.request_id)
    assert time.monotonic() - started < 10, "answered by the final read, not the resubscription"


async def test_wait_on_an_unconnected_queue_raises_queue_connection_exception(
    settings: Settings,
) -> None:
    with pytest.raises(QueueConnectionException):
        await RedisQueue(settings).wait_for_response("any", 1)
