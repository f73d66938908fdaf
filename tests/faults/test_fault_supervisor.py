"""Supervisor faults (catalog S1, S2, S5, G1): SIGKILL, takeover, two reapers, SIGTERM mid-burst."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from helpers import wait_for
from supervisor_harness import write_config

from actors.models import TaskStatus
from actors.queue import WorkerMonitor
from config.settings import Settings
from faults.cluster import (
    REPO_ROOT,
    SUPERVISOR_START,
    TESTS_DIR,
    Cluster,
    cluster_settings,
)
from faults.workload import FaultRun, repeats, rng_for

#: How long the actors of a SIGKILLed supervisor may outlive it.
ORPHAN_DEADLINE = 2.0


def running(process: psutil.Process) -> bool:
    """Alive and not a zombie (a zombie waits for whoever adopted it, and runs nothing)."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def survivors_after(processes: list[psutil.Process], deadline: float) -> list[int]:
    """The pids among ``processes`` still running ``deadline`` seconds from now."""
    with contextlib.suppress(AssertionError):
        await wait_for(lambda: not any(running(p) for p in processes), deadline, interval=0.05)
    return [p.pid for p in processes if running(p)]


# -- S1/S2: SIGKILL the supervisor; a new one finishes the work ----------------------


async def supervisor_sigkill(settings: Settings, workdir: Path, repeat: int) -> None:
    fault = "S1 supervisor SIGKILL, new supervisor takes over"
    rng = rng_for(fault, repeat)
    (workdir / "first").mkdir()
    (workdir / "second").mkdir()
    async with FaultRun(fault, settings, workdir, repeat=repeat) as run:
        first = Cluster(settings, workdir / "first", workers=2, concurrency=4, mode="supervisor")
        with first:
            await run.submit(run.tasks(30, seconds=0.4))
            await asyncio.sleep(rng.uniform(0.1, 0.8))
            (pid,) = first.supervisor_pids()
            tree = psutil.Process(pid).children(recursive=True)
            in_flight = await run.running_ids()
            moment = time.time()
            os.kill(pid, signal.SIGKILL)
            orphans = await survivors_after(tree, ORPHAN_DEADLINE)
        with Cluster(settings, workdir / "second", workers=2, mode="supervisor") as second:
            outcomes = await run.outcomes()
            await run.judge(
                worker_pids=second.worker_pids(),
                recovery=run.recovery_since(moment, in_flight),
                orphans=len(orphans),
                in_flight=len(in_flight),
            )
    assert not orphans, f"actors outlived their supervisor by {ORPHAN_DEADLINE} s: {orphans}"
    assert set(outcomes.values()) == {TaskStatus.COMPLETED}


async def test_sigkilled_supervisor_leaves_no_orphan_and_a_new_one_finishes_every_task(
    settings: Settings, tmp_path: Path
) -> None:
    await supervisor_sigkill(settings, tmp_path, 0)


@pytest.mark.slow
@pytest.mark.parametrize("repeat", repeats())
async def test_sigkilled_supervisor_repeated(
    settings: Settings, tmp_path: Path, repeat: int
) -> None:
    await supervisor_sigkill(settings, tmp_path, repeat)


# -- S5: two reapers (two hosts) race for the same expired leases --------------------


async def two_reapers(settings: Settings, workdir: Path, repeat: int) -> None:
    fault = "S5 two reapers, one lease taken back once"
    rng = rng_for(fault, repeat)
    (workdir / "host-a").mkdir()
    (workdir / "host-b").mkdir()
    async with FaultRun(fault, settings, workdir, repeat=repeat) as run:
        with (
            Cluster(settings, workdir / "host-a", workers=2, concurrency=4) as host_a,
            Cluster(settings, workdir / "host-b", workers=0),  # a second reaper and heartbeat
        ):
            victim = host_a.worker_pids()[0]
            await run.submit(run.tasks(16, seconds=1.5))

            def victim_busy() -> bool:
                return any(r["pid"] == victim for r in run.ledger.read() if r["kind"] == "started")

            await wait_for(victim_busy, 10, message="the victim never started a task")
            await asyncio.sleep(rng.uniform(0.0, 0.5))
            moment = time.time()
            host_a.kill_worker(victim)
            outcomes = await run.outcomes()
            records = run.ledger.read()
            hit = {r["id"] for r in records if r["kind"] == "started" and r["pid"] == victim}
            report = await run.judge(
                worker_pids=host_a.worker_pids(), recovery=run.recovery_since(moment, hit)
            )
    requeues = run.events.counts("task.requeued")
    assert set(outcomes.values()) == {TaskStatus.COMPLETED}
    assert hit
    assert {rid: requeues.get(rid, 0) for rid in hit} == dict.fromkeys(hit, 1)
    assert {rid: report.duplicate_executions.get(rid, 1) for rid in hit} == dict.fromkeys(hit, 2)


async def test_two_reapers_take_back_each_lease_of_a_killed_worker_once(
    settings: Settings, tmp_path: Path
) -> None:
    await two_reapers(settings, tmp_path, 0)


@pytest.mark.slow
@pytest.mark.parametrize("repeat", repeats())
async def test_two_reapers_repeated(settings: Settings, tmp_path: Path, repeat: int) -> None:
    await two_reapers(settings, tmp_path, repeat)


# -- G1: SIGTERM while a gateway enqueues ----------------------------------------------


@contextlib.contextmanager
def supervisor_process(settings: Settings, workdir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``supervisor start`` as a child whose exit status the test reads; killed if left over."""
    config = write_config(
        workdir / "scrapeq.toml",
        cluster_settings(settings, workers=2, concurrency=4, redis_url=None),
    )
    path = os.pathsep.join((str(TESTS_DIR), str(REPO_ROOT)))
    with (workdir / "supervisor.log").open("wb") as log:
        process = subprocess.Popen(
            [*SUPERVISOR_START, "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            env={**os.environ, "PYTHONPATH": path},
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            children = psutil.Process(process.pid).children(recursive=True)
            process.kill()
            process.wait()
            for child in children:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()


async def sigterm_mid_burst(settings: Settings, workdir: Path, repeat: int) -> None:
    fault = "G1 SIGTERM during an enqueue burst"
    rng = rng_for(fault, repeat)
    drain_limit = settings.supervisor.drain_timeout + 10
    async with FaultRun(fault, settings, workdir, repeat=repeat) as run:
        with supervisor_process(settings, workdir) as supervisor:

            async def workers_up() -> bool:
                assert supervisor.poll() is None, (workdir / "supervisor.log").read_text()
                children = {c.pid for c in psutil.Process(supervisor.pid).children()}
                workers = await WorkerMonitor(run.queue).get_active_workers()
                return sum(1 for w in workers if w.get("pid") in children) == 2

            await wait_for(workers_up, 30, interval=0.1)
            tree = psutil.Process(supervisor.pid).children(recursive=True)
            stopped_at = 0.0

            async def stop() -> int:
                nonlocal stopped_at
                await asyncio.sleep(rng.uniform(0.3, 0.9))
                stopped_at = time.monotonic()
                supervisor.send_signal(signal.SIGTERM)
                return await asyncio.to_thread(supervisor.wait, drain_limit)

            _, code = await asyncio.gather(
                run.submit(run.tasks(300, seconds=0.05), pace=0.005), stop()
            )
            drain = time.monotonic() - stopped_at
            left_running = await run.running_ids()
            left_alive = [p.pid for p in tree if running(p)]
        with Cluster(settings, workdir, workers=2) as cluster:  # the next start finishes the rest
            outcomes = await run.outcomes()
            await run.judge(worker_pids=cluster.worker_pids(), drain_s=round(drain, 2))
    records = run.ledger.read()
    answers = [r["id"] for r in records if r["kind"] in ("enqueued", "refused")]
    assert code == 0, (workdir / "supervisor.log").read_text()
    assert not left_alive, f"actors outlived the drained supervisor: {left_alive}"
    assert not left_running, f"tasks left leased after the drain: {left_running}"
    assert sorted(answers) == sorted(run.submitted), "an enqueue got no answer, or two"
    assert set(outcomes.values()) == {TaskStatus.COMPLETED}


async def test_sigterm_during_an_enqueue_burst_drains_and_leaves_every_task_done_or_refused(
    settings: Settings, tmp_path: Path
) -> None:
    await sigterm_mid_burst(settings, tmp_path, 0)


@pytest.mark.slow
@pytest.mark.parametrize("repeat", repeats())
async def test_sigterm_during_an_enqueue_burst_repeated(
    settings: Settings, tmp_path: Path, repeat: int
) -> None:
    await sigterm_mid_burst(settings, tmp_path, repeat)


# -- G7: a rolling replacement (two supervisors on one Redis, one drained and replaced) --


async def workers_of(run: FaultRun, supervisor: subprocess.Popen[bytes], count: int) -> bool:
    """Whether ``count`` worker processes of ``supervisor`` have registered."""
    assert supervisor.poll() is None, "a supervisor exited"
    children = {c.pid for c in psutil.Process(supervisor.pid).children()}
    workers = await WorkerMonitor(run.queue).get_active_workers()
    return sum(1 for w in workers if w.get("pid") in children) == count


async def test_rolling_replacement_of_one_of_two_supervisors_loses_and_refuses_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    fault = "G7 rolling replacement of one of two supervisors"
    drain_limit = settings.supervisor.drain_timeout + 10
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    async with FaultRun(fault, settings, tmp_path) as run:
        with contextlib.ExitStack() as stack:
            old = stack.enter_context(supervisor_process(settings, tmp_path / "a"))
            other = stack.enter_context(supervisor_process(settings, tmp_path / "b"))
            for supervisor in (old, other):
                await wait_for(lambda s=supervisor: workers_of(run, s, 2), 30, interval=0.1)
            load = asyncio.create_task(
                run.submit(run.tasks(240, seconds=0.05), pace=0.02)  # ~5 s of arrivals
            )
            await asyncio.sleep(1.0)
            old.send_signal(signal.SIGTERM)  # the rolling step: drain the old one ...
            code = await asyncio.to_thread(old.wait, drain_limit)
            new = stack.enter_context(supervisor_process(settings, tmp_path / "c"))
            await wait_for(lambda: workers_of(run, new, 2), 30, interval=0.1)  # ... start the new
            await load
            outcomes = await run.outcomes()
            await run.judge(restarts=0)
            assert other.poll() is None, "the supervisor left running stopped"
    refused = [r for r in run.ledger.read() if r["kind"] == "refused"]
    assert code == 0, (tmp_path / "a" / "supervisor.log").read_text()
    assert not refused, f"enqueues refused during the rolling replacement: {refused}"
    assert len(outcomes) == 240
    assert set(outcomes.values()) == {TaskStatus.COMPLETED}
