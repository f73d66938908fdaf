"""The partitioned queue on a real 3-master Redis Cluster on loopback.

``[redis] cluster = true`` and ``partitions = 3``: each partition's hash tag
lands on a master of its own, every script runs on its partition's master,
and the whole-queue views, the waiters and the events span all three.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_topology import ClusterTopology, cluster_support_missing, started_cluster
from helpers import event_log, wait_for
from supervisor_harness import DRAIN_TIMEOUT, Launcher, config_file, configured, write_config
from test_redis_endpoints import work

from actors.models import ScrapingRequest, TaskStatus
from actors.partitions import partition_keys
from actors.queue import RedisQueue, TaskManager
from config.settings import Settings
from supervisor.cli import run

PARTITIONS = 3

pytestmark = pytest.mark.skipif(
    cluster_support_missing() is not None, reason=str(cluster_support_missing())
)


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
    async with RedisQueue(clustered) as gateway, RedisQueue(clustered) as worker:
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
    """Two supervisors over three masters: the ledger, the waiters and the live events."""
    requests = fetches(300, domains=30)
    waited = [ScrapingRequest(script_name="sleep", parameters={"seconds": 0.5}) for _ in range(20)]
    async with RedisQueue(clustered) as gateway, event_log(gateway) as events:
        supervisors = [
            launch(config_file(tmp_path / name, own_state(clustered, tmp_path / name), 1))
            for name in ("a", "b")
        ]
        waiters = [asyncio.create_task(gateway.wait_for_response(r.request_id, 90)) for r in waited]
        await gateway.enqueue_many(waited)
        await gateway.enqueue_many(requests)
        responses = await asyncio.wait_for(asyncio.gather(*waiters), 90)
        manager = TaskManager(gateway)

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
        for supervisor in supervisors:
            assert supervisor.process.poll() is None, supervisor.output()
    for supervisor in supervisors:
        supervisor.send(signal.SIGTERM)
    exits = [await s.exit_code(DRAIN_TIMEOUT + 10) for s in supervisors]

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
