"""Sentinel: the queue finds its master through Sentinels and follows a failover.

A real topology on loopback: a master, a replica and three Sentinels. Work
keeps flowing while ``SENTINEL FAILOVER`` moves the master; every task
acknowledged is completed exactly once, and nothing is restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from helpers import wait_for

from actors.exceptions import QueueConnectionException
from actors.models import ScrapingRequest, ScrapingResponse, TaskStatus
from actors.queue import RedisQueue, TaskManager
from config.settings import ConfigError, Settings
from supervisor.redis_server import RedisServer, find_redis_server, free_port

MASTER_NAME = "scrapeq-test"


@dataclass
class Topology:
    servers: list[RedisServer]  # [first master, first replica]
    sentinel_ports: list[int]

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
    folder = tmp_path_factory.mktemp("sentinel")
    master = RedisServer(folder / "master", appendonly=False)
    replica_port = free_port()
    replica = RedisServer(
        folder / "replica",
        port=replica_port,
        appendonly=False,
        extra={"replicaof": f"127.0.0.1 {master.port}"},
    )
    for server in (master, replica):
        server.dir.mkdir(parents=True, exist_ok=True)
        server.start()
    ports = [free_port() for _ in range(3)]
    sentinels = [_start_sentinel(folder, port, master.port) for port in ports]
    topology = Topology([master, replica], ports)
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
                if await manager.complete_task(response):
                    done.append(request.request_id)
            except QueueConnectionException:
                await asyncio.sleep(0.2)  # a failover: the next call finds the new master

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


def test_cluster_is_refused_until_the_partitioned_queue_exists() -> None:
    with pytest.raises(ConfigError, match=r"redis\.cluster"):
        Settings(redis={"cluster": True})


def test_a_sentinel_address_must_be_host_and_port() -> None:
    with pytest.raises(ConfigError, match=r"redis.sentinel\[0\]"):
        Settings(redis={"sentinel": ["just-a-host"]})
