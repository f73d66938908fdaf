"""A rate limit holds across hosts: two ``supervisor start`` processes share one Redis.

The issue's done-when, end to end: tasks on a limited domain start no faster
than its limit summed over every worker of both supervisors, while tasks on
an unlimited domain finish as fast as they do with no limited work queued.
The full run (200 limited, 2,000 free tasks, 4 worker processes) is opt-in
(``-m slow``); a scaled-down run is in the default suite.
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import admin, wait_for
from supervisor_harness import DRAIN_TIMEOUT, Launcher, config_file, configured, wait_for_workers
from test_rate_limits import busiest_second, over_rate

from actors.models import ScrapingRequest
from actors.queue import RedisQueue, time_ms
from config.settings import Settings


@dataclass(frozen=True)
class Scale:
    processes: int  # worker processes per supervisor
    rate: float  # domain:a.test, tasks/s
    limited: int  # tasks on a.test
    free: int  # tasks on the unlimited b.test


def on(host: str, n: int) -> list[ScrapingRequest]:
    return [
        ScrapingRequest(script_name="echo", parameters={"url": f"http://{host}/{i}"})
        for i in range(n)
    ]


@dataclass(frozen=True)
class Run:
    """One completed task: when its attempt started and finished (Redis ms), and where."""

    started_at: int
    finished_at: int
    worker: str


async def finished(queue: RedisQueue, ids: list[str], timeout: float) -> list[Run]:
    """Wait until every task of ``ids`` completed; how each ran."""
    fields: list[list[bytes | None]] = []

    async def done() -> bool:
        nonlocal fields
        pipe = admin(queue).pipeline(transaction=False)
        for request_id in ids:
            pipe.hmget(
                queue.keys.task(request_id), ["status", "started_at", "finished_at", "worker"]
            )
        fields = await pipe.execute()
        return all(record[0] == b"completed" for record in fields)

    await wait_for(done, timeout, interval=0.2, message=f"{len(ids)} tasks never all completed")
    return [
        Run(int(started or 0), int(ended or 0), (worker or b"").decode())
        for _, started, ended, worker in fields
    ]


async def free_run(queue: RedisQueue, free: list[ScrapingRequest]) -> float:
    """Enqueue ``free``; seconds (Redis clock) until the last of them completed."""
    began = time_ms(await queue.connection.execute("TIME"))
    ids = await queue.enqueue_many(free)
    runs = await finished(queue, ids, timeout=120)
    return (max(run.finished_at for run in runs) - began) / 1000


async def check_across_hosts(
    settings: Settings, queue: RedisQueue, launch: Launcher, tmp_path: Path, scale: Scale
) -> None:
    relaxed = configured(
        settings,
        heartbeat={"interval": 0.5, "timeout": 5.0},
        rate_limits={"domain:a.test": scale.rate},
    )
    config = config_file(tmp_path, relaxed, scale.processes)
    hosts = [launch(config), launch(config)]
    for supervisor in hosts:
        await wait_for_workers(queue, supervisor, scale.processes)

    baseline = await free_run(queue, on("b.test", scale.free))
    limited = await queue.enqueue_many(on("a.test", scale.limited))
    beside = await free_run(queue, on("b.test", scale.free))
    burst = max(1, math.ceil(scale.rate))
    least = (scale.limited - burst) / scale.rate
    runs = await finished(queue, limited, timeout=least + 60)

    starts = sorted(run.started_at for run in runs)
    span = (starts[-1] - starts[0]) / 1000
    workers = {run.worker for run in runs}
    print(
        f"\n{scale}: limited span {span:.2f} s (least {least:.2f} s), busiest second "
        f"{busiest_second(starts)}, {len(workers)} workers; free tasks {baseline:.2f} s alone, "
        f"{beside:.2f} s beside the limited ones"
    )
    # Both supervisors started limited tasks: the one limit held across the two.
    assert all(any(f"-{host.pid}-" in worker for worker in workers) for host in hosts)
    assert span >= least - 0.002
    assert busiest_second(starts) <= scale.rate + burst
    assert over_rate(starts, scale.rate) <= 0
    assert beside <= 1.5 * baseline + 2.0
    for supervisor in hosts:
        supervisor.send(signal.SIGTERM)
    for supervisor in hosts:
        assert await supervisor.exit_code(DRAIN_TIMEOUT + 10) == 0, supervisor.output()


async def test_limit_holds_across_two_supervisors_while_unlimited_tasks_run_at_full_speed(
    settings: Settings, queue: RedisQueue, launch: Launcher, tmp_path: Path
) -> None:
    await check_across_hosts(settings, queue, launch, tmp_path, Scale(1, 10.0, 30, 300))


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_200_tasks_at_5_per_second_over_4_workers_on_2_hosts_take_39_seconds(
    settings: Settings, queue: RedisQueue, launch: Launcher, tmp_path: Path
) -> None:
    await check_across_hosts(settings, queue, launch, tmp_path, Scale(2, 5.0, 200, 2000))
