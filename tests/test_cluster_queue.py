"""The partitioned queue on a real 3-master Redis Cluster on loopback.

``[redis] cluster = true`` and ``partitions = 3``: each partition's hash tag
lands on a master of its own, every script runs on its partition's master,
and the whole-queue views, the waiters and the events span all three.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from cluster_topology import PASSWORD, ClusterTopology, cluster_support_missing, started_cluster
from helpers import event_log, next_message, subscribed, wait_for
from supervisor_harness import (
    DRAIN_TIMEOUT,
    Launcher,
    config_file,
    configured,
    wait_for_workers,
    write_config,
)
from test_cluster_connection import migrate_slot
from test_redis_endpoints import work

from actors.cluster import key_slot
from actors.exceptions import QueueConnectionException
from actors.listeners import ListenerAnnouncement
from actors.models import ScrapingRequest, TaskStatus
from actors.partitions import partition_keys
from actors.queue import RedisQueue, TaskManager
from actors.worker import Worker
from config.settings import Settings
from supervisor.cli import run
from supervisor.redis_server import RedisServer

PARTITIONS = 3

pytestmark = [
    pytest.mark.skipif(
        cluster_support_missing() is not None, reason=str(cluster_support_missing())
    ),
    pytest.mark.usefixtures("restore_signals"),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterTopology]:
    with started_cluster(tmp_path_factory.mktemp("queue-cluster")) as topology:
        yield topology


@pytest.fixture
def clustered(settings: Settings, cluster: ClusterTopology) -> Settings:
    return configured(
        settings, redis={"url": cluster.url, "cluster": True, "partitions": PARTITIONS}
    )


def fetches(count: int, domains: int) -> list[ScrapingRequest]:
    return [
        ScrapingRequest(
            script_name="echo", parameters={"url": f"https://d{n % domains}.example/", "n": n}
        )
        for n in range(count)
    ]


def task_records_per_master(cluster: ClusterTopology, prefix: str) -> list[int]:
    counts = []
    for server in cluster.masters:
        with cluster.client(server) as client:
            counts.append(sum(1 for _ in client.scan_iter(match=f"{prefix}:*task:*", count=500)))
    return counts


def test_each_partition_is_served_by_a_master_of_its_own(cluster: ClusterTopology) -> None:
    owners = {cluster.owner(keys.pending).port for keys in partition_keys("p", "default", 3)}

    assert len(owners) == PARTITIONS


async def test_seed_workflow_on_a_cluster_spans_every_master_and_the_cli_sees_it_whole(
    clustered: Settings, cluster: ClusterTopology, capsys: pytest.CaptureFixture[str]
) -> None:
    requests = fetches(60, domains=12)
    async with RedisQueue(clustered, adopt_layout=True) as gateway, RedisQueue(clustered) as worker:
        await gateway.publish_settings(clustered)
        waits = [asyncio.create_task(gateway.wait_for_response(r.request_id, 30)) for r in requests]
        await gateway.enqueue_many(requests)
        assert all(
            count > 0 for count in task_records_per_master(cluster, clustered.redis.key_prefix)
        )
        await work(worker, len(requests))
        responses = await asyncio.gather(*waits)
        assert [r.data for r in responses] == [{"echo": r.parameters} for r in requests]
        manager = TaskManager(gateway)
        assert await manager.get_task_status(requests[-1].request_id) is TaskStatus.COMPLETED

    config = write_config(clustered.supervisor.state_dir.parent / "cluster.toml", clustered)
    capsys.readouterr()
    assert await asyncio.to_thread(run, ["--config", str(config), "status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["queue"]["completed"] == len(requests)
    assert status["queue"]["pending"] == 0


@pytest.mark.timeout(180)
async def test_supervisors_on_a_cluster_complete_every_task_once_and_every_event_is_heard(
    clustered: Settings, cluster: ClusterTopology, launch: Launcher, tmp_path: Path
) -> None:
    """Two supervisors over three masters, one worker killed with -9 mid-run: the ledger
    (lost 0, completed twice 0), the waiters and the live events."""
    requests = [
        ScrapingRequest(
            script_name="sleep",
            parameters={"seconds": 0.1, "url": f"https://d{n % 30}.example/{n}"},
        )
        for n in range(300)
    ]
    waited = [ScrapingRequest(script_name="sleep", parameters={"seconds": 0.5}) for _ in range(20)]
    async with RedisQueue(clustered, adopt_layout=True) as gateway, event_log(gateway) as events:
        manager = TaskManager(gateway)
        supervisors = [
            launch(config_file(tmp_path / name, own_state(clustered, tmp_path / name), 1))
            for name in ("a", "b")
        ]
        (victim,) = await wait_for_workers(gateway, supervisors[0], 1)
        waiters = [asyncio.create_task(gateway.wait_for_response(r.request_id, 90)) for r in waited]
        await gateway.enqueue_many(waited)
        await gateway.enqueue_many(requests)

        async def under_way() -> bool:
            return (await manager.queue_stats())["completed"] >= 60

        await wait_for(under_way, 60, interval=0.05, message="the tasks did not start")
        os.kill(victim, signal.SIGKILL)
        responses = await asyncio.wait_for(asyncio.gather(*waiters), 90)

        async def drained() -> bool:
            stats = await manager.queue_stats()
            return stats["completed"] >= len(requests) + len(waited)

        await wait_for(drained, 90, interval=0.2, message="the queue did not drain")
        await wait_for(
            lambda: count_of(events, "task.completed") >= len(requests) + len(waited),
            10,
            message="not every task.completed event was heard",
        )
        stats = await manager.queue_stats()
        statuses = Counter([await manager.get_task_status(r.request_id) for r in requests])
        replaced = await wait_for_workers(gateway, supervisors[0], 1)
        for supervisor in supervisors:
            assert supervisor.process.poll() is None, supervisor.output()
    for supervisor in supervisors:
        supervisor.send(signal.SIGTERM)
    exits = [await s.exit_code(DRAIN_TIMEOUT + 10) for s in supervisors]

    assert victim not in replaced  # the supervisor restarted the killed worker
    assert count_of(events, "worker.lost") == 1
    assert count_of(events, "task.requeued") >= 1  # it died holding leases: redelivered
    assert statuses == Counter({TaskStatus.COMPLETED: len(requests)})
    assert stats["completed"] == len(requests) + len(waited), "a task was completed twice"
    assert stats["pending"] == stats["running"] == stats["dead_letter"] == 0
    assert {r.status for r in responses} == {TaskStatus.COMPLETED}
    completed_ids = [e["request_id"] for e in events if e["event"] == "task.completed"]
    assert len(completed_ids) == len(set(completed_ids)) == len(requests) + len(waited)
    assert exits == [0, 0], [s.output() for s in supervisors]


def own_state(settings: Settings, folder: Path) -> Settings:
    folder.mkdir(parents=True, exist_ok=True)
    return configured(settings, supervisor={"state_dir": folder / "state"})


def count_of(events: list[dict[str, object]], name: str) -> int:
    return sum(1 for event in events if event["event"] == name)


@pytest.mark.timeout(180)
async def test_a_partition_moved_to_another_master_under_load_loses_and_repeats_nothing(
    clustered: Settings, cluster: ClusterTopology
) -> None:
    """The slot of a whole partition migrates (MOVED/ASK) while workers claim and complete."""
    lively = configured(clustered, worker={"concurrency": 20})
    moving = partition_keys(lively.redis.key_prefix, "default", PARTITIONS)[1]
    source = cluster.owner(moving.pending)
    target = next(server for server in cluster.masters if server is not source)
    requests = [
        ScrapingRequest(script_name="sleep", parameters={"seconds": 0.01}) for _ in range(900)
    ]
    async with RedisQueue(lively, adopt_layout=True) as gateway:
        await gateway.publish_settings(lively)
        await gateway.enqueue_many(requests[:600])
        workers = [Worker(f"w{n}", lively, os.getppid()) for n in range(2)]
        mains = [asyncio.create_task(worker.main()) for worker in workers]
        try:
            await asyncio.sleep(0.5)
            producer = asyncio.create_task(gateway.enqueue_many(requests[600:]))
            await migrate_slot(cluster, key_slot(moving.pending.encode()), source, target)
            await producer
            manager = TaskManager(gateway)

            async def drained() -> bool:
                return (await manager.queue_stats())["completed"] >= len(requests)

            await wait_for(drained, 120, interval=0.2, message="the queue did not drain")
            stats = await manager.queue_stats()
            statuses = Counter([await manager.get_task_status(r.request_id) for r in requests])
        finally:
            for worker in workers:
                worker.request_stop()
            await asyncio.wait_for(asyncio.gather(*mains), 30)

    assert cluster.owner(moving.pending) is target
    assert statuses == Counter({TaskStatus.COMPLETED: len(requests)})
    assert stats["completed"] == len(requests), "a task was completed twice"
    assert stats["dead_letter"] == stats["pending"] == stats["running"] == 0


async def test_a_script_is_refused_before_it_runs_while_its_slot_migrates_not_half_way(
    clustered: Settings, cluster: ClusterTopology
) -> None:
    """A renewal of two leases, one task key already moved: refused whole (TRYAGAIN).

    Without the guard key the script would run on the old master, extend the
    first lease and fail at the second task's key, now on the new master.
    """
    async with RedisQueue(clustered, adopt_layout=True) as queue:
        await queue.publish_settings(clustered)
        store, keys = queue.stores[1], queue.partitions[1]
        ids = [await enqueue_into(queue, 1) for _ in range(2)]
        leases = [
            (lease.request_id, lease.attempt) for lease in (await store.claim("w1", 2)).leases
        ]
        assert sorted(rid for rid, _ in leases) == sorted(ids)
        source = cluster.owner(keys.running)
        target = next(server for server in cluster.masters if server is not source)
        slot = key_slot(keys.running.encode())
        deadlines_before = await running_deadlines(cluster, source, keys.running)
        async with migrating(cluster, slot, source, target):
            await move_keys(cluster, source, target, [keys.task(leases[1][0])])

            with pytest.raises(QueueConnectionException, match="TRYAGAIN"):
                await store.renew("w1", leases)
            assert await running_deadlines(cluster, source, keys.running) == deadlines_before
            with pytest.raises(QueueConnectionException, match="TRYAGAIN"):
                await store.claim("w2", 10)

        assert await store.renew("w1", leases) == []  # the move is over: both leases held
        assert cluster.owner(keys.running) is target


async def enqueue_into(queue: RedisQueue, partition: int) -> str:
    """Enqueue an echo task that the queue places (by its id) in ``partition``."""
    while True:
        request = ScrapingRequest(script_name="echo")
        if queue.store_for(queue.prepare(request)).partition == partition:
            return await queue.enqueue_task(request)


async def running_deadlines(
    cluster: ClusterTopology, server: RedisServer, key: str
) -> list[tuple[bytes, float]]:
    async with cluster.async_client(server) as client:
        return list(await client.zrange(key, 0, -1, withscores=True))


@contextlib.asynccontextmanager
async def migrating(
    cluster: ClusterTopology, slot: int, source: RedisServer, target: RedisServer
) -> AsyncIterator[None]:
    """``slot`` marked migrating from ``source`` to ``target``; on exit the rest of its
    keys move and every master is told the new owner (as ``redis-cli --cluster reshard``)."""
    clients = [cluster.async_client(server) for server in cluster.masters]
    src, dst = (clients[cluster.masters.index(s)] for s in (source, target))
    try:
        source_id = await src.execute_command("CLUSTER", "MYID")
        target_id = await dst.execute_command("CLUSTER", "MYID")
        await dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        await src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        yield
        while keys := await src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            await move_keys(cluster, source, target, [key.decode() for key in keys])
        for client in (dst, src, *(c for c in clients if c not in (src, dst))):
            await client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
    finally:
        for client in clients:
            await client.aclose()


async def move_keys(
    cluster: ClusterTopology, source: RedisServer, target: RedisServer, keys: list[str]
) -> None:
    async with cluster.async_client(source) as client:
        await client.execute_command(
            "MIGRATE", target.host, target.port, "", 0, 5000, "AUTH", PASSWORD, "KEYS", *keys
        )


async def test_on_a_cluster_events_are_published_only_while_a_listener_announces_itself(
    clustered: Settings, cluster: ClusterTopology
) -> None:
    async with (
        RedisQueue(clustered, adopt_layout=True) as queue,
        subscribed(queue, queue.keys.events) as pubsub,
    ):
        await queue.enqueue_task(ScrapingRequest(script_name="echo"))
        assert await pubsub.get_message(ignore_subscribe_messages=True, timeout=1) is None
        async with ListenerAnnouncement(queue):
            for partition in range(PARTITIONS):
                request_id = await enqueue_into(queue, partition)
                event = await next_message(pubsub)
                assert json.loads(event["data"])["request_id"] == request_id
