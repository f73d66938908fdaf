"""The fault-injection harness itself works: proxy modes, ledger, checker, observers, cluster."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis
import redis.asyncio
from helpers import wait_for
from redis.backoff import NoBackoff
from redis.retry import Retry
from supervisor_harness import write_config

from actors.keys import KeySpace
from actors.models import TaskStatus
from actors.queue import RedisQueue
from config.settings import Settings
from faults.cluster import REPO_ROOT, TESTS_DIR, Cluster
from faults.ledger import (
    Ledger,
    await_outcome,
    check,
    ledger_request,
    read_statuses,
    submit,
)
from faults.observers import ConnectionSampler, EventRecorder
from faults.proxy import Proxy
from supervisor.redis_server import RedisServer


@pytest.fixture
def proxy(redis_url: str) -> Iterator[Proxy]:
    with Proxy.for_url(redis_url) as started:
        yield started


def direct_client(url: str, timeout: float = 2.0) -> redis.Redis:
    """A client without retries, so a fault surfaces as an error at once."""
    return redis.Redis.from_url(
        url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0)
    )


# -- proxy ---------------------------------------------------------------------------


def test_proxy_forwards_commands_to_redis(proxy: Proxy, key_prefix: str) -> None:
    with direct_client(proxy.url) as client:
        assert client.ping()
        client.set(f"{key_prefix}:k", "v")
        assert client.get(f"{key_prefix}:k") == b"v"
    assert proxy.accepted == 1


def test_proxy_delay_adds_latency_each_way(proxy: Proxy) -> None:
    with direct_client(proxy.url) as client:
        client.ping()
        proxy.set_mode("delay", 0.2)
        started = time.monotonic()
        client.ping()
        assert time.monotonic() - started >= 0.4


def test_proxy_blackhole_times_out_commands_until_healed(proxy: Proxy) -> None:
    with direct_client(proxy.url, timeout=0.5) as client:
        client.ping()
        proxy.set_mode("blackhole")
        started = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            client.ping()
        assert 0.4 <= time.monotonic() - started < 2
        proxy.set_mode("pass")
        assert client.ping()


def test_proxy_reset_fails_commands_and_new_connections_until_pass(proxy: Proxy) -> None:
    with direct_client(proxy.url) as client:
        client.ping()
        proxy.set_mode("reset")
        assert proxy.active == 0
        with pytest.raises(redis.ConnectionError):
            client.ping()  # the reset connection
        with pytest.raises(redis.ConnectionError):
            client.ping()  # a new one, reset while the mode lasts
        proxy.set_mode("pass")
        assert client.ping()
    assert proxy.accepted >= 3


def test_proxy_rejects_unknown_mode_and_delay_without_seconds(proxy: Proxy) -> None:
    with pytest.raises(ValueError, match="mode"):
        proxy.set_mode("drop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seconds"):
        proxy.set_mode("delay")


# -- ledger and checker --------------------------------------------------------------


_WRITER = """
import sys
from faults.ledger import Ledger

ledger, writer = Ledger(sys.argv[1]), sys.argv[2]
for number in range(200):
    ledger.append("line", id=f"{writer}-{number}", pad="x" * 2000)
"""


def test_ledger_appends_from_four_processes_stay_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join((str(TESTS_DIR), str(REPO_ROOT)))}
    writers = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(w)], env=env)
        for w in range(4)
    ]
    assert [writer.wait(30) for writer in writers] == [0] * 4
    records = Ledger(path).read()
    assert len(records) == 800
    assert len({record["id"] for record in records}) == 800


def test_ledger_read_names_a_broken_line(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.append("enqueued", id="a")
    with ledger.path.open("a") as file:
        file.write('{"kind": "enq\n')
    with pytest.raises(ValueError, match=r"ledger.jsonl:2"):
        ledger.read()


def test_check_reports_an_acknowledged_task_that_never_finished() -> None:
    records = [
        {"kind": "enqueued", "id": "a"},
        {"kind": "enqueued", "id": "b"},
        {"kind": "enqueued", "id": "c"},
        {"kind": "refused", "id": "d", "error": "BackpressureException"},
        {"kind": "completed", "id": "c", "status": "completed"},
    ]
    report = check(records, statuses={"a": "completed", "b": "running", "c": None})
    assert report.lost == {"b": "running"}  # c: Redis forgot it, but a waiter saw it finish
    assert (report.acknowledged, report.refused) == (3, 1)
    with pytest.raises(AssertionError, match=r"1 acknowledged task\(s\) lost: b \(running\)"):
        report.assert_no_loss()


def test_check_passes_when_every_task_finished_once_and_counts_reruns() -> None:
    records = [
        {"kind": "enqueued", "id": "a"},
        {"kind": "enqueued", "id": "b"},
        {"kind": "started", "id": "a"},
        {"kind": "started", "id": "a"},
        {"kind": "started", "id": "b"},
        {"kind": "side_effect", "id": "a"},
    ]
    report = check(records, {"a": 1, "b": 1}, statuses=lambda ids: dict.fromkeys(ids, "completed"))
    report.assert_no_loss()
    assert report.lost == {}
    assert report.duplicate_executions == {"a": 2}
    assert report.as_row()["dup_exec"] == 1
    assert report.executions == 3


def test_check_fails_a_task_completed_twice() -> None:
    report = check([{"kind": "enqueued", "id": "a"}], {"a": 2}, statuses={"a": "completed"})
    with pytest.raises(AssertionError, match="completed more than once: a x2"):
        report.assert_no_loss()


# -- observers -----------------------------------------------------------------------


async def test_event_recorder_counts_completions_per_task(
    redis_url: str, redis_client: redis.asyncio.Redis, key_prefix: str
) -> None:
    channel = KeySpace(key_prefix).events
    published = [
        {"event": "task.completed", "request_id": "a"},
        {"event": "task.completed", "request_id": "a"},
        {"event": "task.completed", "request_id": "b"},
        {"event": "worker.registered", "worker_id": "w1"},
    ]
    with EventRecorder(redis_url, key_prefix) as events:
        for event in published:
            await redis_client.publish(channel, json.dumps(event))
        await wait_for(lambda: len(events.events) == 4, 5)
    assert events.counts("task.completed") == {"a": 2, "b": 1}
    assert events.total("worker.registered") == 1


async def test_connection_sampler_keeps_the_peak_client_count(redis_url: str) -> None:
    extra = [direct_client(redis_url) for _ in range(5)]
    try:
        for client in extra:
            client.ping()
        connected = int(extra[0].info("clients")["connected_clients"])
        with ConnectionSampler(redis_url, interval=0.05) as sampler:
            await wait_for(lambda: sampler.samples > 0, 5)
    finally:
        for client in extra:
            client.close()
    assert sampler.peak >= connected
    assert sampler.failures == 0


async def test_observers_reconnect_after_redis_is_killed_and_restarted(
    redis_server: RedisServer, redis_client: redis.asyncio.Redis, key_prefix: str
) -> None:
    channel = KeySpace(key_prefix).events
    with (
        EventRecorder(redis_server.url, key_prefix) as events,
        ConnectionSampler(redis_server.url, interval=0.05) as sampler,
    ):
        redis_server.kill()
        await wait_for(lambda: sampler.failures > 0, 5)
        redis_server.start()

        async def seen_after_restart() -> bool:
            event = {"event": "task.completed", "request_id": "after"}
            await redis_client.publish(channel, json.dumps(event))
            return "after" in events.counts("task.completed")

        await wait_for(seen_after_restart, 10, interval=0.1)
    assert events.gaps == 1
    assert sampler.samples > 0


# -- cluster ---------------------------------------------------------------------------


def test_write_config_round_trips_settings(settings: Settings, tmp_path: Path) -> None:
    data = settings.model_dump()
    data["rate_limits"] = {"domain:example.com": 2.0}
    original = Settings.model_validate(data)
    assert Settings.from_file(write_config(tmp_path / "c.toml", original)) == original


async def test_actor_cluster_behind_a_proxy_runs_ledger_tasks_and_reruns_a_crashed_one(
    settings: Settings, redis_url: str, key_prefix: str, tmp_path: Path, proxy: Proxy
) -> None:
    ledger = Ledger(tmp_path / "ledger.jsonl")
    requests = [
        ledger_request(ledger, f"task-{i}", parameters={"seconds": 0.01}) for i in range(49)
    ]
    requests.append(
        ledger_request(ledger, "block", script="ledger-block", parameters={"seconds": 0.05})
    )
    crash = ledger_request(ledger, "crash", script="ledger-crash", parameters={"crash_times": 1})
    with (
        EventRecorder(redis_url, key_prefix) as events,
        ConnectionSampler(redis_url) as sampler,
        Cluster(settings, tmp_path, workers=2, redis_url=proxy.url) as cluster,
    ):
        assert proxy.accepted >= 4  # every actor talks to Redis through the proxy
        workers = set(cluster.worker_pids())
        assert len(workers) == 2
        with pytest.raises(ValueError, match="not a live worker"):
            cluster.kill_worker(os.getpid())
        async with RedisQueue(settings) as queue:
            for request in requests:
                assert await submit(queue, ledger, request)
            outcomes = await asyncio.gather(
                *(await_outcome(queue, ledger, r.request_id, 20) for r in requests)
            )
            assert outcomes == [TaskStatus.COMPLETED] * 50
            assert await submit(queue, ledger, crash)  # kills its first worker
            assert await await_outcome(queue, ledger, "crash", 20) is TaskStatus.COMPLETED
            statuses = await read_statuses(queue, [r.request_id for r in [*requests, crash]])
        assert len(cluster.worker_pids()) == 1
    report = check(ledger, events.counts("task.completed"), statuses=statuses)
    report.peak_connections = sampler.peak
    report.assert_no_loss()
    assert (report.acknowledged, report.executions) == (51, 52)
    assert report.duplicate_executions == {"crash": 2}
    assert sum(events.counts("task.completed").values()) == 51
    assert {r["pid"] for r in ledger.read() if r["kind"] == "started"} <= workers
    assert sampler.peak > 2
    assert not any(psutil.pid_exists(pid) for pid in workers)


async def test_supervisor_cluster_restarts_a_killed_worker_and_loses_nothing(
    settings: Settings, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    ledger = Ledger(tmp_path / "ledger.jsonl")
    requests = [ledger_request(ledger, f"task-{i}") for i in range(20)]
    with (
        EventRecorder(redis_url, key_prefix) as events,
        Cluster(settings, tmp_path, workers=2, mode="supervisor") as cluster,
    ):
        (supervisor,) = cluster.supervisor_pids()
        victim = cluster.worker_pids()[0]
        cluster.kill_worker(victim)

        def replaced() -> bool:
            pids = cluster.worker_pids()
            return len(pids) == 2 and victim not in pids

        await wait_for(replaced, 20, interval=0.1, message=cluster.logs())
        async with RedisQueue(cluster.settings) as queue:
            for request in requests:
                assert await submit(queue, ledger, request)
            for request in requests:
                await await_outcome(queue, ledger, request.request_id, 20)
            statuses = await read_statuses(queue, [r.request_id for r in requests])
        tree = [supervisor, *cluster.worker_pids()]
    report = check(ledger, events.counts("task.completed"), statuses=statuses)
    report.restarts = events.total("worker.registered") - 2
    report.assert_no_loss()
    assert report.restarts == 1
    assert not any(psutil.pid_exists(pid) for pid in tree)
