"""A partitioned queue (``[redis] partitions = 3``) on one real redis-server.

One server serves every hash tag, so these tests prove the logic of
partitions (placement, the whole-queue views, claims in turn, the actors
over every partition); tests/test_cluster_queue.py runs the same queue on a
real 3-master Redis Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import admin, wait_for
from supervisor_harness import configured, write_config

from actors import worker as worker_module
from actors.base import Actor
from actors.cluster import SLOTS, key_slot
from actors.exceptions import BackpressureException, PartitionLayoutMismatch
from actors.exit_codes import CliExit
from actors.governor import Governor
from actors.heartbeat import HeartbeatMonitor
from actors.keys import KeySpace
from actors.models import ScrapingRequest, ScrapingResponse, TaskStatus
from actors.partitions import partition_keys, partition_tags, place
from actors.queue import RedisQueue, TaskManager
from actors.reaper import Reaper
from actors.store import Completion
from actors.worker import Worker
from config.settings import MAX_PARTITIONS, ConfigError, Settings
from supervisor.cli import run
from supervisor.redis_checks import EpochGuard

pytestmark = pytest.mark.usefixtures("restore_signals")

PARTITIONS = 3


@contextlib.asynccontextmanager
async def running(*actors: Actor) -> AsyncIterator[None]:
    mains = [asyncio.create_task(actor.main()) for actor in actors]
    try:
        yield
    finally:
        for actor in actors:
            actor.request_stop()
        await asyncio.wait_for(asyncio.gather(*mains), 15)


def sites_in(partition: int, count: int) -> list[str]:
    """Hosts whose tasks the queue places in ``partition``."""
    hosts = (f"site{n}.example" for n in range(100_000))
    found = [h for h in hosts if place(f"domain:{h} script:echo", "", PARTITIONS) == partition]
    return found[:count]


def site_in(partition: int) -> str:
    return sites_in(partition, 1)[0]


def fetch(host: str, **fields: object) -> ScrapingRequest:
    return ScrapingRequest(script_name="echo", parameters={"url": f"https://{host}/"}, **fields)


async def partition_holding(queue: RedisQueue, request_id: str) -> list[int]:
    """Every partition that holds a record of the task (a task lives in exactly one)."""
    client = admin(queue)
    return [
        i for i, keys in enumerate(queue.partitions) if await client.exists(keys.task(request_id))
    ]


# -- the layout -----------------------------------------------------------------------------


@pytest.mark.parametrize("count", [2, 3, 4, 8])
def test_partition_tags_fall_in_distinct_nths_of_the_slot_space(count: int) -> None:
    tags = partition_tags("default", count)

    assert tags[0] == "default"
    ranges = [key_slot(tag.encode()) * count // SLOTS for tag in tags]
    assert sorted(ranges) == list(range(count))


@pytest.mark.parametrize("count", [0, MAX_PARTITIONS + 1])
def test_a_partition_count_out_of_range_is_refused_naming_the_setting(count: int) -> None:
    with pytest.raises(ConfigError, match=r"redis\.partitions"):
        Settings(redis={"partitions": count})


def test_one_partition_is_todays_layout_key_for_key() -> None:
    (only,) = partition_keys("scraping", "default", 1)
    today = KeySpace("scraping", "default")

    assert all(getattr(only, name) == getattr(today, name) for name in KeySpace.__slots__)
    assert only.pending == "scraping:{default}:pending"
    assert only.history == "scraping:{default}:events:history"
    assert only.wake == "scraping:{default}:wake"


def test_partitions_share_the_queues_channels_and_keep_their_own_keys() -> None:
    spaces = partition_keys("scraping", "default", PARTITIONS)

    assert len({keys.events for keys in spaces}) == 1
    assert len({keys.done_prefix for keys in spaces}) == 1
    assert len({keys.pending for keys in spaces}) == PARTITIONS
    assert len({keys.wake for keys in spaces}) == PARTITIONS
    for keys in spaces:  # every key a script touches is in the partition's slot
        slots = {key_slot(key.encode()) for key in (keys.pending, keys.history, keys.task("x"))}
        assert len(slots) == 1


# -- placement and the whole-queue views -----------------------------------------------------


async def test_a_domains_tasks_share_one_partition_and_tasks_without_one_spread_by_id(
    pqueue: RedisQueue,
) -> None:
    hosts = [f"host{n}.example" for n in range(12)]
    by_domain = [fetch(host) for host in hosts for _ in range(5)]
    anonymous = [ScrapingRequest(script_name="echo") for _ in range(150)]
    await pqueue.enqueue_many(by_domain + anonymous)

    for host in hosts:
        ids = [r.request_id for r in by_domain if r.parameters["url"] == f"https://{host}/"]
        homes = {tuple(await partition_holding(pqueue, rid)) for rid in ids}
        assert len(homes) == 1
        assert len(next(iter(homes))) == 1
    spread = Counter([(await partition_holding(pqueue, r.request_id))[0] for r in anonymous])
    assert set(spread) == set(range(PARTITIONS))
    assert min(spread.values()) >= 25


async def test_status_response_record_and_cancel_find_a_task_in_any_partition(
    pqueue: RedisQueue,
) -> None:
    manager = TaskManager(pqueue)
    requests = [fetch(site_in(p)) for p in range(PARTITIONS)]
    for request in requests:
        await pqueue.enqueue_task(request)

    for partition, request in enumerate(requests):
        assert await partition_holding(pqueue, request.request_id) == [partition]
        assert await manager.get_task_status(request.request_id) is TaskStatus.PENDING
        record = await manager.get_task(request.request_id)
        assert record is not None
        assert record["request"]["parameters"] == request.parameters
    assert await pqueue.cancel_task(requests[2].request_id)
    assert await manager.get_task_status(requests[2].request_id) is TaskStatus.CANCELLED
    cancelled = await pqueue.wait_for_response(requests[2].request_id, 5)
    assert cancelled.status is TaskStatus.CANCELLED
    assert await manager.get_task_status("no-such-task") is None
    assert not await pqueue.cancel_task("no-such-task")


async def test_dead_letters_of_every_partition_are_listed_requeued_and_purged(
    pqueue: RedisQueue,
) -> None:
    manager = TaskManager(pqueue)
    dead = [fetch(site_in(p), max_retries=0) for p in range(PARTITIONS) for _ in range(2)]
    await pqueue.enqueue_many(dead)
    for _ in dead:
        request = await pqueue.dequeue_task("w1", timeout=1)
        assert request is not None
        failure = ScrapingResponse(
            request_id=request.request_id, status=TaskStatus.FAILED, error="boom"
        )
        assert await manager.complete_task(failure)

    listed = await manager.list_dead_letters()
    assert sorted(d["request_id"] for d in listed) == sorted(r.request_id for r in dead)
    assert (await manager.queue_stats())["dead_letter"] == len(dead)
    assert await manager.requeue_dead_letter(dead[-1].request_id)
    assert await manager.get_task_status(dead[-1].request_id) is TaskStatus.PENDING
    assert await manager.requeue_all_dead_letters() == len(dead) - 1
    assert (await manager.queue_stats())["pending"] == len(dead)


async def test_queue_stats_add_every_partition_up(pqueue: RedisQueue) -> None:
    manager = TaskManager(pqueue)
    await pqueue.enqueue_many([fetch(site_in(p)) for p in range(PARTITIONS) for _ in range(4)])
    await pqueue.enqueue_many([ScrapingRequest(script_name="echo") for _ in range(9)])
    for _ in range(5):
        assert await pqueue.dequeue_task("w1", timeout=1) is not None

    stats = await manager.queue_stats()
    assert stats["enqueued"] == 21
    assert stats["pending"] == 16
    assert stats["running"] == 5


async def test_dequeue_takes_the_partitions_in_turn_so_a_deep_one_starves_none(
    pqueue: RedisQueue,
) -> None:
    # One task per host: no domain's politeness window holds any back.
    await pqueue.enqueue_many([fetch(host) for host in sites_in(0, 100)])
    few = [fetch(host) for host in sites_in(2, 3)]
    await pqueue.enqueue_many(few)

    first = [await pqueue.dequeue_task("w1", timeout=1) for _ in range(6)]
    taken = {request.request_id for request in first if request is not None}
    assert {request.request_id for request in few} <= taken


async def test_the_hard_cap_is_per_partition_and_the_governor_closes_them_all(
    partitioned: Settings,
) -> None:
    limits = configured(
        partitioned,
        backpressure={"high_watermark": 12, "low_watermark": 4, "throttle_at": 12},
    )
    async with RedisQueue(limits, adopt_layout=True) as queue:
        await queue.publish_settings(limits)
        for partition in range(PARTITIONS):  # 8 each: under each partition's cap
            await queue.enqueue_many([fetch(site_in(partition)) for _ in range(8)])
        async with running(Governor("g1", limits, os.getppid())):
            await wait_for(
                lambda: all_closed(queue), 5, message="the governor did not close every partition"
            )
            for partition in range(PARTITIONS):
                with pytest.raises(BackpressureException):
                    await queue.enqueue_task(fetch(site_in(partition)))


async def all_closed(queue: RedisQueue) -> bool:
    client = admin(queue)
    states = [await client.hget(keys.backpressure, "state") for keys in queue.partitions]
    return states == [b"closed"] * PARTITIONS


# -- the actors over every partition ---------------------------------------------------------


async def test_a_worker_runs_the_tasks_of_every_partition_once(
    partitioned: Settings, pqueue: RedisQueue
) -> None:
    manager = TaskManager(pqueue)
    requests = [fetch(f"w{n % 17}.example") for n in range(150)]
    requests += [ScrapingRequest(script_name="echo") for _ in range(50)]
    await pqueue.enqueue_many(requests)

    async with running(Worker("w1", partitioned, os.getppid())):
        await wait_for(
            lambda: completed(manager, len(requests)), 30, message="not every task completed"
        )
    stats = await manager.queue_stats()
    assert stats["completed"] == len(requests)
    assert stats["pending"] == stats["running"] == 0
    for request in requests[::20]:
        response = await manager.get_response(request.request_id)
        assert response is not None
        assert response.data == request.parameters


async def completed(manager: TaskManager, count: int) -> bool:
    return (await manager.queue_stats())["completed"] >= count


async def test_an_idle_worker_is_woken_by_a_task_in_any_partition(
    partitioned: Settings, pqueue: RedisQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker_module, "IDLE_WAIT", 60.0)  # only a wake message can start it
    manager = TaskManager(pqueue)
    async with running(Worker("w1", partitioned, os.getppid())):
        await asyncio.sleep(0.5)  # claimed once from each partition: all drained
        for partition in (2, 1, 0):
            request = fetch(site_in(partition))
            await pqueue.enqueue_task(request)
            response = await pqueue.wait_for_response(request.request_id, 10)
            assert response.status is TaskStatus.COMPLETED
    assert (await manager.queue_stats())["completed"] == 3


async def test_an_expired_lease_in_any_partition_is_requeued_by_the_reaper(
    partitioned: Settings, pqueue: RedisQueue
) -> None:
    manager = TaskManager(pqueue)
    request = fetch(site_in(2))
    await pqueue.enqueue_task(request)
    claim = await pqueue.stores[2].claim("gone", 1)
    assert [lease.request_id for lease in claim.leases] == [request.request_id]

    async with running(Reaper("r1", partitioned, os.getppid())):
        await wait_for(
            lambda: status_is(manager, request.request_id, TaskStatus.PENDING),
            10,
            message="the expired lease was not requeued",
        )
    assert (await manager.get_task(request.request_id) or {})["attempt"] == 1


async def test_a_lost_workers_leases_are_requeued_in_every_partition(
    partitioned: Settings, pqueue: RedisQueue
) -> None:
    manager = TaskManager(pqueue)
    requests = [fetch(site_in(p)) for p in range(PARTITIONS)]
    for request in requests:
        await pqueue.enqueue_task(request)
    await pqueue.store.heartbeat("lost", {"pid": 1}, register=True)
    for store in pqueue.stores:
        assert len((await store.claim("lost", 1)).leases) == 1

    async with running(HeartbeatMonitor("h1", partitioned, os.getppid())):
        for request in requests:
            await wait_for(
                lambda rid=request.request_id: status_is(manager, rid, TaskStatus.PENDING),
                10,
                message="a lost worker's lease was not requeued",
            )


async def status_is(manager: TaskManager, request_id: str, status: TaskStatus) -> bool:
    return await manager.get_task_status(request_id) is status


# -- the layout in Redis ---------------------------------------------------------------------


async def test_a_client_with_another_partition_count_is_refused_naming_the_setting(
    settings: Settings, pqueue: RedisQueue
) -> None:
    with pytest.raises(PartitionLayoutMismatch, match=r"redis\.partitions is 1.* over 3 "):
        async with RedisQueue(settings):
            pass
    async with RedisQueue(configured(settings, redis={"partitions": PARTITIONS})) as same:
        assert len(same.stores) == PARTITIONS


async def test_a_supervisor_drops_partitions_only_once_they_hold_no_task(
    settings: Settings, pqueue: RedisQueue
) -> None:
    stranded = fetch(site_in(2))
    await pqueue.enqueue_task(stranded)

    with pytest.raises(PartitionLayoutMismatch, match="1 tasks are still") as refused:
        async with RedisQueue(settings, adopt_layout=True):
            pass
    assert refused.value.stranded == 1

    assert await pqueue.cancel_task(stranded.request_id)  # finished: in no queue set
    async with RedisQueue(settings, adopt_layout=True) as one:
        assert await admin(one).exists(one.keys.layout) == 0  # today's layout: no key
    async with RedisQueue(settings) as plain:
        assert len(plain.stores) == 1


async def test_the_cli_with_another_partition_count_exits_with_a_configuration_error(
    settings: Settings, pqueue: RedisQueue, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path / "one.toml", settings)

    status = await asyncio.to_thread(run, ["--config", str(config), "status"])

    assert status == CliExit.USAGE
    assert "redis.partitions is 1" in capsys.readouterr().err


async def test_lost_data_in_any_partition_is_caught_by_its_epoch_key(
    pqueue: RedisQueue, caplog: pytest.LogCaptureFixture
) -> None:
    guard = EpochGuard(pqueue.connection, pqueue.partitions)
    await guard.establish()
    assert await guard.check()

    lost = pqueue.partitions[2].epoch  # on a cluster: another master restarted empty
    await admin(pqueue).delete(lost)

    assert not await guard.check()
    assert any(lost in record.getMessage() for record in caplog.records)
    assert await guard.check()  # recreated: the next check is quiet


async def test_status_shows_each_partitions_depths_beside_the_whole_queue(
    partitioned: Settings, pqueue: RedisQueue, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for partition, count in ((0, 1), (1, 3), (2, 5)):
        await pqueue.enqueue_many([fetch(host) for host in sites_in(partition, count)])
    config = write_config(tmp_path / "three.toml", partitioned)
    capsys.readouterr()

    assert await asyncio.to_thread(run, ["--config", str(config), "status", "--json"]) == 0
    state = json.loads(capsys.readouterr().out)
    assert [p["pending"] for p in state["partitions"]] == [1, 3, 5]
    assert state["queue"]["pending"] == 9
    assert await asyncio.to_thread(run, ["--config", str(config), "status"]) == 0
    assert "partitions (pending/running): 0: 1/0 · 1: 3/0 · 2: 5/0" in capsys.readouterr().out


async def test_one_partition_status_has_no_partitions_entry(
    settings: Settings, queue: RedisQueue, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path / "one.toml", settings)
    capsys.readouterr()

    assert await asyncio.to_thread(run, ["--config", str(config), "status", "--json"]) == 0
    assert "partitions" not in json.loads(capsys.readouterr().out)


async def test_a_task_waiting_in_a_rate_gate_keeps_its_partition_from_being_dropped(
    settings: Settings, partitioned: Settings, pqueue: RedisQueue
) -> None:
    host = site_in(2)
    await pqueue.publish_settings(configured(partitioned, rate_limits={f"domain:{host}": 0.01}))
    await pqueue.enqueue_many([fetch(host), fetch(host)])
    (lease,) = (await pqueue.stores[2].claim("w1", 2)).leases  # the other one waits in the gate
    await pqueue.stores[2].complete("w1", [Completion(lease.request_id, lease.attempt, "{}", 0.1)])
    assert (await TaskManager(pqueue).partition_stats())[2]["gated"] == 1

    with pytest.raises(PartitionLayoutMismatch) as refused:
        async with RedisQueue(settings, adopt_layout=True):
            pass
    assert refused.value.stranded == 1
