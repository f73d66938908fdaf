"""Network faults (catalog N1, N3) between ``supervisor start`` and Redis, through a TCP proxy.

One supervisor tree reaches Redis only through a ``Proxy`` for the whole module;
the producer, the waiters and the observers talk to Redis directly, so tasks
are acknowledged while the tree is cut off. After each fault heals, every
acknowledged task must complete, the tree must not have spun in an error loop
(its log and the proxy's connection count stay small) and every worker must
claim work again.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from actors.models import TaskStatus
from config.settings import Settings
from faults.cluster import Cluster
from faults.proxy import Proxy
from faults.workload import (
    RECLAIM_WITHIN,
    FaultRun,
    fault_settings,
    repeats,
    rng_for,
    with_sections,
)
from supervisor.redis_server import RedisServer

Cut = Literal["blackhole", "reset"]
SHORT_CUT = 3.0
#: Log lines the whole tree may write per second of a fault: one per failed call of each
#: loop, backing off, plus restarts come to about 20; a tight loop writes thousands.
LOG_LINES_PER_SECOND = 25
#: Connections the whole tree may open per second of a fault. Nested retries (redis-py's
#: four per call, inside each loop's own backoff) open a few dozen per second at first;
#: a reconnect storm opens thousands.
CONNECTS_PER_SECOND = 60


@dataclass(frozen=True)
class Env:
    cluster: Cluster
    proxy: Proxy
    direct: Settings
    """The cluster's settings with the real Redis URL: for the producer and observers."""
    workdir: Path


class Tree:
    """The module's supervisor tree behind the proxy, started afresh if a fault took it down.

    A fresh tree gets a fresh key prefix and directory: the tasks a dead tree
    left behind must not leak into the next test's figures.
    """

    def __init__(self, url: str, workdir: Path, proxy: Proxy) -> None:
        self.url = url
        self.workdir = workdir
        self.proxy = proxy
        self._stack = ExitStack()
        self._cluster: Cluster | None = None

    def current(self) -> Cluster:
        if self._cluster is not None and self._cluster.supervisor_pids():
            return self._cluster
        self.close()
        self._stack = ExitStack()
        workdir = Path(tempfile.mkdtemp(prefix="tree-", dir=self.workdir))
        settings = fault_settings(self.url, f"t{uuid.uuid4().hex[:12]}", workdir / "state")
        self._cluster = self._stack.enter_context(
            Cluster(
                settings,
                workdir,
                workers=2,
                concurrency=8,
                mode="supervisor",
                redis_url=self.proxy.url,
            )
        )
        return self._cluster

    def close(self) -> None:
        self._cluster = None
        self._stack.close()


@pytest.fixture(scope="module")
def tree(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tree]:
    if redis_server.is_running():
        redis_server.resume()
    else:
        redis_server.start()
    workdir = tmp_path_factory.mktemp("network-faults")
    with Proxy.for_url(redis_server.url) as proxy:
        holder = Tree(redis_server.url, workdir, proxy)
        try:
            yield holder
        finally:
            holder.close()


@pytest.fixture
def env(tree: Tree, redis_url: str, tmp_path: Path) -> Env:
    tree.proxy.set_mode("pass")
    cluster = tree.current()
    direct = with_sections(cluster.settings, redis={"url": redis_url})
    return Env(cluster, tree.proxy, direct, tmp_path)


def log_lines(cluster: Cluster) -> int:
    """Lines the supervisors (and their actors, which share their stderr) have logged."""
    return sum(
        len(log.read_bytes().splitlines()) for log in cluster.workdir.glob("supervisor-*.log")
    )


async def cut_off(env: Env, repeat: int, cut: Cut, *, seconds: float | None) -> None:
    span = "2-8 s" if seconds is None else f"{seconds:g} s"
    fault = f"N1 blackhole {span}" if cut == "blackhole" else f"N3 connection resets {span}"
    rng = rng_for(fault, repeat)
    length = seconds if seconds is not None else rng.uniform(2.0, 8.0)
    cluster, proxy = env.cluster, env.proxy
    async with FaultRun(fault, env.direct, env.workdir, repeat=repeat) as run:
        await run.submit(run.tasks(40, seconds=0.2))
        waits = asyncio.ensure_future(run.outcomes())
        await asyncio.sleep(rng.uniform(0.1, 0.5))
        in_flight = await run.running_ids()
        lines, accepted = log_lines(cluster), proxy.accepted
        moment = time.time()
        proxy.set_mode(cut)
        await asyncio.sleep(length)
        healed = time.time()
        proxy.set_mode("pass")
        during = proxy.accepted - accepted
        if not cluster.supervisor_pids():
            waits.cancel()
            pytest.fail(f"the supervisor died during the fault\n{cluster.logs()}")
        outcomes = await waits
        logged = log_lines(cluster) - lines
        idle = await run.idle_workers(cluster.worker_pids, RECLAIM_WITHIN)
        workers = cluster.worker_pids()
        recovery = run.recovery_since(healed, in_flight)
        restarts = run.events.total("worker.registered")
        await run.judge(
            worker_pids=workers,
            recovery=run.recovery_since(healed) if recovery is None else recovery,
            restarts=restarts,
            cut_s=round(healed - moment, 2),
            log_lines=logged,
            reconnects=during,
            proxy_peak_connections=proxy.peak_active,
        )
    assert set(outcomes.values()) == {TaskStatus.COMPLETED}
    assert not idle, f"workers {idle} stopped claiming (zombie)"
    # Healthy workers cut off from Redis are not killed for the beats the cut held back.
    assert restarts == 0, cluster.logs()
    assert logged <= LOG_LINES_PER_SECOND * (length + 5), cluster.logs()
    assert during <= CONNECTS_PER_SECOND * length, f"{during} connections in {length:.1f} s"


CUTS = ["blackhole", "reset"]


@pytest.mark.parametrize("cut", CUTS)
async def test_cut_network_is_ridden_out_without_an_error_loop_and_loses_nothing(
    env: Env, cut: Cut
) -> None:
    await cut_off(env, 0, cut, seconds=SHORT_CUT)


@pytest.mark.slow
@pytest.mark.parametrize("cut", CUTS)
@pytest.mark.parametrize("repeat", repeats())
async def test_cut_network_repeated(env: Env, repeat: int, cut: Cut) -> None:
    await cut_off(env, repeat, cut, seconds=None)
