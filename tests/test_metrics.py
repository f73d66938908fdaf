"""The Prometheus /metrics endpoint, scraped over HTTP against the session's real Redis."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio
from helpers import admin
from prometheus_client.parser import text_string_to_metric_families

from actors.models import ScrapingRequest
from actors.queue import RedisQueue, WorkerMonitor
from config.settings import Settings
from supervisor.metrics import MetricsServer, start_metrics_server
from supervisor.redis_server import RedisServer, free_port


@pytest.fixture
async def server(queue: RedisQueue) -> AsyncIterator[MetricsServer]:
    metrics = MetricsServer(queue, asyncio.get_running_loop(), host="127.0.0.1", port=0)
    yield metrics
    await asyncio.to_thread(metrics.close)


def fetch(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics; every sample by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return await asyncio.to_thread(fetch, port)


async def test_metrics_reflect_enqueued_tasks_and_workers(
    server: MetricsServer, queue: RedisQueue
) -> None:
    for _ in range(2):
        await queue.enqueue_task(ScrapingRequest(script_name="echo"))
    await queue.dequeue_task("w1", timeout=1)
    await WorkerMonitor(queue).register_worker("w1")

    samples = await scrape(server.port)

    assert samples[("scrapeq_redis_up", ())] == 1
    assert samples[("scrapeq_queue_depth", (("state", "pending"),))] == 1
    assert samples[("scrapeq_queue_depth", (("state", "running"),))] == 1
    assert samples[("scrapeq_queue_depth", (("state", "retrying"),))] == 0
    assert samples[("scrapeq_queue_depth", (("state", "dead_letter"),))] == 0
    assert samples[("scrapeq_tasks_total", (("outcome", "enqueued"),))] == 2
    assert samples[("scrapeq_tasks_total", (("outcome", "completed"),))] == 0
    assert samples[("scrapeq_workers", (("status", "active"),))] == 1
    assert samples[("scrapeq_workers", (("status", "inactive"),))] == 0
    assert samples[("scrapeq_backpressure_state", ())] == 0


async def test_backpressure_state_is_read_from_the_published_hash(
    server: MetricsServer, queue: RedisQueue, redis_client: redis.asyncio.Redis
) -> None:
    await redis_client.hset(queue.keys.backpressure, mapping={"state": "closed", "depth": 9})

    samples = await scrape(server.port)

    assert samples[("scrapeq_backpressure_state", ())] == 2


async def test_repairs_are_counted_and_a_damaged_counter_does_not_fail_the_scrape(
    server: MetricsServer, queue: RedisQueue, redis_client: redis.asyncio.Redis
) -> None:
    await redis_client.hset(queue.keys.task("lost"), mapping={"status": "pending", "request": "{}"})
    assert await queue.store.repair(["lost"]) == ["lost"]
    await redis_client.hset(queue.keys.stats, "completed", "not a number")

    samples = await scrape(server.port)

    assert samples[("scrapeq_redis_up", ())] == 1
    assert samples[("scrapeq_tasks_repaired_total", ())] == 1
    assert samples[("scrapeq_tasks_total", (("outcome", "completed"),))] == 0


async def domain_of(queue: RedisQueue, request_id: str) -> str:
    """The domain rate key a task counts against."""
    rate_keys = await admin(queue).hget(queue.keys.task(request_id), "rate_keys")
    return (rate_keys or b"").decode().split()[0]


async def test_domain_rates_and_throttles_are_exported_with_bounded_labels(
    server: MetricsServer, queue: RedisQueue, settings: Settings
) -> None:
    await queue.store.set_limits(settings)
    for host in [f"h{i}.test" for i in range(15)]:
        await queue.enqueue_task(
            ScrapingRequest(script_name="echo", parameters={"url": f"http://{host}/"})
        )
    for lease in (await queue.store.claim("w1", 15)).leases:
        await queue.store.release(
            "w1",
            [(lease.request_id, lease.attempt)],
            reason="rate_limited",
            pause_key=await domain_of(queue, lease.request_id),
            pause=2.0,
        )
    assert (await queue.store.claim("w2", 15)).leases == []  # each waits at its paused key

    samples = await scrape(server.port)
    rates = {
        labels: value for (name, labels), value in samples.items() if name == "scrapeq_domain_rate"
    }

    assert len(rates) == 10  # 15 domains learned a rate; the label set stays bounded
    assert set(rates.values()) == {settings.politeness.start_rate}
    assert samples[("scrapeq_domain_throttled_total", (("reason", "rate_limited"),))] == 15
    assert samples[("scrapeq_domain_throttled_total", (("reason", "unavailable"),))] == 0
    assert samples[("scrapeq_paused_keys", ())] == 15  # each for its Retry-After of 2 s
    assert samples[("scrapeq_gated_tasks", ())] == 15


async def test_unreachable_redis_is_reported_as_down_not_as_a_failed_scrape(
    server: MetricsServer, redis_server: RedisServer
) -> None:
    redis_server.stop()  # the next test's redis_url fixture starts it again

    samples = await scrape(server.port)

    assert samples[("scrapeq_redis_up", ())] == 0
    assert not any(name == "scrapeq_queue_depth" for name, _ in samples)


async def test_metrics_server_is_off_when_the_port_is_0(
    settings: Settings, queue: RedisQueue
) -> None:
    assert settings.supervisor.metrics_port == 0
    assert start_metrics_server(settings, queue) is None


def on_port(settings: Settings, **supervisor: Any) -> Settings:
    """``settings`` with /metrics on a free port (and any other [supervisor] keys given)."""
    changes = {"metrics_port": free_port(), **supervisor}
    return settings.model_copy(
        update={"supervisor": settings.supervisor.model_copy(update=changes)}
    )


@pytest.mark.parametrize(("host", "bound"), [(None, "127.0.0.1"), ("0.0.0.0", "0.0.0.0")])
async def test_metrics_server_binds_loopback_unless_metrics_host_says_otherwise(
    settings: Settings, queue: RedisQueue, host: str | None, bound: str
) -> None:
    configured = on_port(settings, metrics_host=host) if host else on_port(settings)
    metrics = start_metrics_server(configured, queue)
    assert metrics is not None
    try:
        assert metrics._server.server_address[0] == bound
    finally:
        await asyncio.to_thread(metrics.close)


async def test_metrics_server_listens_on_the_configured_port(
    settings: Settings, queue: RedisQueue
) -> None:
    port = free_port()
    configured = settings.model_copy(
        update={"supervisor": settings.supervisor.model_copy(update={"metrics_port": port})}
    )
    metrics = start_metrics_server(configured, queue)
    assert metrics is not None
    try:
        assert metrics.port == port
        assert ("scrapeq_redis_up", 1.0) in [(n, v) for (n, _), v in (await scrape(port)).items()]
    finally:
        await asyncio.to_thread(metrics.close)


async def test_only_one_endpoint_exports_the_queue_wide_metrics(
    server: MetricsServer, queue: RedisQueue
) -> None:
    """Two hosts, one queue: summing their endpoints must not count the queue twice."""
    other = MetricsServer(queue, asyncio.get_running_loop(), host="127.0.0.1", port=0)
    try:
        first = await scrape(server.port)
        second = await scrape(other.port)
    finally:
        await asyncio.to_thread(other.close)

    assert first[("scrapeq_queue_exporter", ())] == 1
    assert ("scrapeq_queue_depth", (("state", "pending"),)) in first
    assert second[("scrapeq_queue_exporter", ())] == 0
    assert second[("scrapeq_redis_up", ())] == 1
    assert not any(name == "scrapeq_queue_depth" for name, _ in second)
