"""Latency and throughput: counted by the scripts, shown by /metrics, status and the history."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import pytest
from helpers import admin, wait_for
from supervisor_harness import (
    DRAIN_TIMEOUT,
    Launcher,
    config_file,
    configured,
    wait_for_workers,
)
from test_cli import cli
from test_metrics import scrape

from actors.models import ScrapingRequest
from actors.queue import RedisQueue, TaskManager
from actors.telemetry import LATENCY_BUCKETS, QueueTelemetry, TelemetryBatch, bucket_of, quantile
from config.settings import Settings
from supervisor.redis_server import free_port


def test_quantiles_interpolate_inside_the_bucket_that_holds_the_rank() -> None:
    counts = [0] * (len(LATENCY_BUCKETS) + 1)
    counts[1] = 50  # 10-25 ms
    counts[6] = 50  # 0.5-1 s

    assert quantile(counts, 0.5) == pytest.approx(0.025)
    assert quantile(counts, 0.99) == pytest.approx(0.5 + 0.5 * 49 / 50)
    assert quantile([0] * len(counts), 0.5) is None
    counts[-1] = 1000  # beyond 600 s: the last finite bound, as Prometheus says
    assert quantile(counts, 0.99) == 600.0


async def test_a_retry_waits_from_when_it_fell_due_not_from_its_enqueue(
    queue: RedisQueue,
) -> None:
    request_id = await queue.enqueue_task(ScrapingRequest(script_name="fail", max_retries=1))
    await admin(queue).hset(queue.keys.task(request_id), "enqueued_at", 0)  # "enqueued in 1970"
    (first,) = (await queue.store.claim("w1", 1)).leases
    await queue.store.fail("w1", request_id, first.attempt, "boom", permanent=False)
    await asyncio.sleep(0.3)  # the retry's backoff (0.05-0.2 s here)
    await queue.store.promote_due()
    (retry,) = (await queue.store.claim("w1", 1)).leases

    assert first.queued > 1e9  # since 1970
    assert 0 <= retry.queued < 1.0  # since it fell due, not since its enqueue


async def test_counts_recorded_by_workers_add_up_per_script_and_per_minute(
    queue: RedisQueue,
) -> None:
    one, two = TelemetryBatch(), TelemetryBatch()
    for batch, script in ((one, "echo"), (two, "echo"), (two, "fail")):
        batch.started(script, 0.02)
        batch.ended(script, 0.3)
        batch.outcome(script, "completed" if script == "echo" else "failed")
    for batch in (one, two):
        await queue.store.record_metrics(*batch.take().fields())
    telemetry = QueueTelemetry(queue.connection, queue.keys)
    totals = await telemetry.totals()
    (minute,) = await telemetry.minutes(1)

    assert totals["echo"].wait[bucket_of(0.02) - 1] == 2
    assert totals["echo"].execution_sum == pytest.approx(0.6)
    assert totals["echo"].outcomes == {"started": 2, "completed": 2, "failed": 0, "retried": 0}
    assert totals["fail"].outcomes["failed"] == 1
    assert minute.outcomes == {"started": 3, "completed": 2, "failed": 1, "retried": 0}
    assert sum(minute.execution) == 3
    assert not one  # taken
    assert not two


@pytest.mark.timeout(120)
async def test_a_known_workload_shows_the_same_numbers_in_metrics_status_and_history(
    settings: Settings,
    queue: RedisQueue,
    launch: Launcher,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    manager = TaskManager(queue)
    port = free_port()
    settings = configured(settings, supervisor={"metrics_port": port})
    config = config_file(tmp_path, settings, 2)
    supervisor = launch(config)
    await wait_for_workers(queue, supervisor, 2)
    echo = [ScrapingRequest(script_name="echo") for _ in range(50)]
    fail = [ScrapingRequest(script_name="fail", max_retries=0) for _ in range(5)]
    await queue.enqueue_many([*echo, *fail])

    async def finished() -> bool:
        stats = await manager.queue_stats()
        return stats["completed"] == 50 and stats["failed"] == 5 and stats["running"] == 0

    await wait_for(finished, timeout=30)
    completed = ("scrapeq_script_tasks_total", (("outcome", "completed"), ("script", "echo")))
    failed = ("scrapeq_script_tasks_total", (("outcome", "failed"), ("script", "fail")))

    async def recorded() -> bool:  # the workers add their counts up about once a second
        samples = await scrape(port)
        return samples.get(completed) == 50 and samples.get(failed) == 5

    await wait_for(recorded, timeout=10, interval=0.2)
    samples = await scrape(port)
    assert await cli("--config", str(config), "status", "--json") == 0
    state = json.loads(capsys.readouterr().out)
    replay = ("events", "--since", "5m", "--type", "task.started", "--json", "--count", "55")
    assert await asyncio.wait_for(cli("--config", str(config), *replay), 10) == 0
    started = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    supervisor.send(signal.SIGTERM)
    assert await supervisor.exit_code(DRAIN_TIMEOUT + 10) == 0, supervisor.output()

    def sample(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert sample("scrapeq_script_tasks_total", script="echo", outcome="completed") == 50
    assert sample("scrapeq_script_tasks_total", script="fail", outcome="failed") == 5
    for family in ("scrapeq_queue_wait_seconds", "scrapeq_task_duration_seconds"):
        counts = [sample(f"{family}_count", script=s) for s in ("echo", "fail")]
        assert counts == [50, 5]
        assert sample(f"{family}_bucket", script="echo", le="+Inf") == 50
    assert sample("scrapeq_queue_depth", state="pending") == 0
    assert sample("scrapeq_queue_depth", state="running") == 0
    assert sample("scrapeq_queue_exporter") == 1

    assert state["queue"]["completed"] == 50
    assert state["queue"]["failed"] == 5
    for name in ("queue_wait", "execution"):
        assert set(state["latency"][name]) == {"p50", "p95", "p99"}
        assert all(value is not None for value in state["latency"][name].values())
    assert state["throughput"]["completed_per_s"] == pytest.approx(50 / 60, abs=0.05)
    assert state["throughput"]["failed_per_s"] == pytest.approx(5 / 60, abs=0.02)

    assert len(started) == 55
    assert len({event["request_id"] for event in started}) == 55


@pytest.mark.timeout(60)
async def test_restarts_are_counted_by_actor_kind_on_the_supervisors_endpoint(
    settings: Settings, queue: RedisQueue, launch: Launcher, tmp_path: Path
) -> None:
    port = free_port()
    config = config_file(tmp_path, configured(settings, supervisor={"metrics_port": port}), 1)
    supervisor = launch(config)
    (pid,) = await wait_for_workers(queue, supervisor, 1)
    os.kill(pid, signal.SIGKILL)

    async def restarted() -> bool:
        samples = await scrape(port)
        return samples.get(("scrapeq_restarts_total", (("actor", "worker"),))) == 1

    await wait_for(restarted, timeout=20, interval=0.2)
    supervisor.send(signal.SIGTERM)
    assert await supervisor.exit_code(DRAIN_TIMEOUT + 10) == 0, supervisor.output()
