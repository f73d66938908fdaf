"""Sentinel: the queue finds its master through Sentinels and follows a failover.

A real topology on loopback: a master, a replica and three Sentinels. Work
keeps flowing while ``SENTINEL FAILOVER`` moves the master; every task
acknowledged is completed exactly once, and nothing is restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from faults.proxy import Proxy
from helpers import wait_for
from supervisor_harness import write_config
from test_redis_endpoints import work

from actors.exceptions import NotReplicatedException, QueueConnectionException
from actors.models import ScrapingRequest, ScrapingResponse, TaskStatus
from actors.queue import RedisQueue, TaskManager
from actors.store import Completion
from config.settings import ConfigError, Settings
from supervisor.cli import run
from supervisor.redis_server import RedisServer, find_redis_server, free_port

MASTER_NAME = "scrapeq-test"


@dataclass
class Topology:
    servers: list[RedisServer]  # [first master, first replica]
    sentinel_ports: list[int]
    link: Proxy | None = None  # between the first replica and the first master, if proxied

    def sentinel(self) -> redis.Redis:
        return redis.Redis(port=self.sentinel_ports[0], socket_timeout=5)

    def master_port(self) -> int:
        with self.sentinel() as sentinel:
            _, port = sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
        return int(port)


def _start_sentinel(folder: Path, port: int, master_port: int) -> subprocess.Popen[bytes]:
    config = folder / f"sentinel-{port}.conf"
    config.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
        f"logfile {folder / f'sentinel-{port}.log'}\n"
        f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n"
        f"sentinel down-after-milliseconds {MASTER_NAME} 1000\n"
        f"sentinel failover-timeout {MASTER_NAME} 10000\n"
        f"sentinel parallel-syncs {MASTER_NAME} 1\n"
    )
    return subprocess.Popen([str(find_redis_server()), str(config), "--sentinel"])


def _wait(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError):
            if condition():  # type: ignore[operator]
                return
        time.sleep(0.1)
    raise AssertionError(f"{what} within {timeout} s")


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    with started_topology(tmp_path_factory.mktemp("sentinel")) as topology:
        yield topology


@pytest.fixture
def own_topology(tmp_path: Path) -> Iterator[Topology]:
    """A topology of the test's own, for a test that kills its master; the replica
    reaches the master through a fault proxy (``Topology.link``)."""
    with started_topology(tmp_path, proxied=True) as topology:
        yield topology


@contextlib.contextmanager
def started_topology(folder: Path, *, proxied: bool = False) -> Iterator[Topology]:
    master = RedisServer(folder / "master", appendonly=False)
    link = Proxy("127.0.0.1", master.port).start() if proxied else None
    replica_port = free_port()
    replica = RedisServer(
        folder / "replica",
        port=replica_port,
        appendonly=False,
        extra={"replicaof": f"127.0.0.1 {link.port if link else master.port}"},
    )
    for server in (master, replica):
        server.dir.mkdir(parents=True, exist_ok=True)
        server.start()
    ports = [free_port() for _ in range(3)]
    sentinels = [_start_sentinel(folder, port, master.port) for port in ports]
    topology = Topology([master, replica], ports, link)
    try:

        def replica_known() -> bool:
            with topology.sentinel() as sentinel:
                return bool(sentinel.execute_command("SENTINEL", "REPLICAS", MASTER_NAME))

        _wait(replica_known, 30, "the Sentinels never saw the replica")
        yield topology
    finally:
        for process in sentinels:
            process.kill()
            process.wait()
        for server in (master, replica):
            server.stop()
        if link is not None:
            link.stop()


def through_sentinels(settings: Settings, topology: Topology) -> Settings:
    data = settings.model_dump()
    data["redis"]["sentinel"] = [f"127.0.0.1:{port}" for port in topology.sentinel_ports]
    data["redis"]["master_name"] = MASTER_NAME
    # The URL's host and port are unused with Sentinels: a port nothing listens on proves it.
    data["redis"]["url"] = f"redis://127.0.0.1:{free_port()}/0"
    return Settings.model_validate(data)


@contextlib.asynccontextmanager
async def worker_loop(queue: RedisQueue, done: list[str]) -> AsyncIterator[None]:
    """Dequeue and complete tasks until the block ends, riding out connection errors."""
    manager = TaskManager(queue)
    stop = asyncio.Event()

    async def loop() -> None:
        while not stop.is_set():
            try:
                request = await queue.dequeue_task("w-sentinel", timeout=0.5)
                if request is None:
                    continue
                response = ScrapingResponse(
                    request_id=request.request_id, status=TaskStatus.COMPLETED, data=1
                )
            except QueueConnectionException:
                await asyncio.sleep(0.2)  # a failover: the next call finds the new master
                continue
            while not stop.is_set():  # as a worker does: report it again until it counts
                try:
                    if await manager.complete_task(response):
                        done.append(request.request_id)
                    break
                except QueueConnectionException:
                    await asyncio.sleep(0.2)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_work_follows_a_sentinel_failover_and_completes_every_task_once(
    settings: Settings, topology: Topology
) -> None:
    configured = through_sentinels(settings, topology)
    before = topology.master_port()
    acknowledged: list[str] = []
    done: list[str] = []
    async with RedisQueue(configured) as gateway, RedisQueue(configured) as worker:

        async def submit(count: int) -> None:
            for n in range(count):
                request = ScrapingRequest(script_name="echo", parameters={"n": n})
                for _ in range(100):  # a client retries an enqueue refused by an outage
                    try:
                        acknowledged.append(await gateway.enqueue_task(request))
                        break
                    except QueueConnectionException:
                        await asyncio.sleep(0.1)
                await asyncio.sleep(0.01)

        async with worker_loop(worker, done):
            await submit(30)
            with topology.sentinel() as sentinel:
                sentinel.execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
            await submit(60)

            await wait_for(
                lambda: set(done) >= set(acknowledged), 60, message="acknowledged tasks not done"
            )
        waits = [gateway.wait_for_response(request_id, 10) for request_id in acknowledged]
        responses = await asyncio.gather(*waits)

    assert topology.master_port() != before, "the failover did not happen"
    assert len(acknowledged) == 90
    assert sorted(done) == sorted(acknowledged), "a task was lost or completed twice"
    assert {response.status for response in responses} == {TaskStatus.COMPLETED}


async def test_seed_workflow_through_sentinels_waiters_and_the_cli_reach_the_master(
    settings: Settings, topology: Topology, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    configured = through_sentinels(settings, topology)
    requests = [ScrapingRequest(script_name="echo", parameters={"n": n}) for n in range(20)]
    async with RedisQueue(configured) as gateway, RedisQueue(configured) as worker:
        waits = [asyncio.create_task(gateway.wait_for_response(r.request_id, 20)) for r in requests]
        await gateway.enqueue_many(requests)
        await work(worker, len(requests))
        responses = await asyncio.gather(*waits)
    assert [r.data for r in responses] == [{"echo": {"n": n}} for n in range(20)]

    config = write_config(tmp_path / "sentinel.toml", configured)
    capsys.readouterr()
    assert await asyncio.to_thread(run, ["--config", str(config), "status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["queue"]["completed"] == len(requests)
    assert status["queue"]["pending"] == 0


def test_a_sentinel_address_must_be_host_and_port() -> None:
    with pytest.raises(ConfigError, match=r"redis.sentinel\[0\]"):
        Settings(redis={"sentinel": ["just-a-host"]})


def durable(settings: Settings, replicas: int = 1) -> Settings:
    data = settings.model_dump()
    data["redis"]["durable_enqueue"] = replicas
    data["redis"]["durable_timeout"] = 0.5
    return Settings.model_validate(data)


def replica_of(topology: Topology) -> RedisServer:
    master = topology.master_port()
    return next(server for server in topology.servers if server.port != master)


async def test_a_durable_enqueue_is_refused_until_a_replica_has_it_and_its_retry_lands_once(
    settings: Settings, topology: Topology
) -> None:
    configured = durable(through_sentinels(settings, topology))
    request = ScrapingRequest(script_name="echo")
    async with RedisQueue(configured) as gateway:
        replica = replica_of(topology)
        replica.pause()
        try:
            with pytest.raises(NotReplicatedException):
                await gateway.enqueue_task(request)
        finally:
            replica.resume()

        async def retried() -> bool:  # the same id and request: safe, until the replica has it
            with contextlib.suppress(NotReplicatedException):
                return await gateway.enqueue_task(request) == request.request_id
            return False

        await wait_for(retried, 10, interval=0.2)
        stats = await TaskManager(gateway).queue_stats()

    assert stats["enqueued"] == 1
    assert stats["pending"] == 1


async def submit_until(
    gateway: RedisQueue, acknowledged: list[str], stop: asyncio.Event, tag: str
) -> None:
    """Enqueue one task after another, each retried until acknowledged, until ``stop``."""
    n = 0
    while not stop.is_set():
        request = ScrapingRequest(script_name="echo", parameters={"tag": tag, "n": n})
        n += 1
        while not stop.is_set():
            try:
                acknowledged.append(await gateway.enqueue_task(request))
                break
            except QueueConnectionException:  # an outage, or too few replicas: retry
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.002)


@pytest.mark.timeout(180)
async def test_kill_9_of_the_master_under_load_loses_no_durably_acknowledged_task(
    settings: Settings, own_topology: Topology
) -> None:
    """The report's numbers: what plain enqueue lost, and that durable enqueue lost none.

    The replica falls half a second behind (its link to the master holds
    everything, as a congested network would) just before the master dies:
    what the master acknowledged in that half second exists nowhere else.
    """
    plain = through_sentinels(settings, own_topology)
    first = own_topology.master_port()
    old_master = next(server for server in own_topology.servers if server.port == first)
    acknowledged: dict[str, list[str]] = {"durable": [], "plain": []}
    done: list[str] = []
    stop = asyncio.Event()
    async with (
        RedisQueue(durable(plain)) as careful,
        RedisQueue(plain) as quick,
        RedisQueue(durable(plain)) as worker,
    ):
        async with worker_loop(worker, done):
            producers = [
                asyncio.create_task(submit_until(careful, acknowledged["durable"], stop, "d")),
                asyncio.create_task(submit_until(quick, acknowledged["plain"], stop, "p")),
            ]
            await asyncio.sleep(1.0)
            assert own_topology.link is not None
            own_topology.link.set_mode("blackhole")
            await asyncio.sleep(0.5)
            old_master.kill()

            def failed_over() -> bool:
                return own_topology.master_port() != first

            await wait_for(failed_over, 30, message="the Sentinels did not fail over")
            own_topology.link.set_mode("reset")  # what it held dies with the old master
            old_master.start()  # back empty; the Sentinels make it the new master's replica
            await asyncio.sleep(2.0)  # load on the new master
            stop.set()
            await asyncio.gather(*producers)
            manager = TaskManager(quick)

            async def durable_done() -> bool:
                statuses = [await manager.get_task_status(i) for i in acknowledged["durable"]]
                return all(status is TaskStatus.COMPLETED for status in statuses)

            await wait_for(durable_done, 60, message="durably acknowledged tasks not completed")
        lost = {
            kind: [i for i in ids if await manager.get_task_status(i) is None]
            for kind, ids in acknowledged.items()
        }

    print(
        f"\nkill -9 of the master under load: durable {len(lost['durable'])} lost of "
        f"{len(acknowledged['durable'])} acknowledged, plain {len(lost['plain'])} lost of "
        f"{len(acknowledged['plain'])}"
    )
    assert len(acknowledged["durable"]) > 20
    assert lost["plain"], "the lag window lost nothing: the test did not test durability"
    assert lost["durable"] == []
    assert len(done) == len(set(done)), "a task was completed twice"


async def test_a_completion_not_yet_replicated_is_reported_again_and_counts_once(
    settings: Settings, topology: Topology
) -> None:
    configured = durable(through_sentinels(settings, topology))
    async with RedisQueue(configured) as queue:
        request_id = await queue.enqueue_task(ScrapingRequest(script_name="echo"))
        (lease,) = (await queue.store.claim("w1", 1)).leases
        result = [Completion(request_id, lease.attempt, "1", 0.01)]
        replica = replica_of(topology)
        replica.pause()
        try:
            with pytest.raises(NotReplicatedException):
                await queue.store.complete("w1", result)
        finally:
            replica.resume()

        async def reported() -> bool:  # what a worker does with a refused report: again
            with contextlib.suppress(NotReplicatedException):
                return await queue.store.complete("w1", result) == [True]
            return False

        await wait_for(reported, 10, interval=0.2)
        stats = await TaskManager(queue).queue_stats()

    assert stats["completed"] == 1
    assert stats["running"] == 0
