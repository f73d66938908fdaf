"""Worker faults (catalog W1-W8): kills, freezes, blocked loops, poison tasks, leaks, a soak.

Each fault runs once by default; the ``slow`` twin repeats it ``$FAULT_SUITE_REPEATS``
times (default 20) at seeded random moments, and the ``soak`` test runs steady load for
``$FAULT_SUITE_SOAK_MINUTES`` (default 30). Every run ends in ``FaultRun.judge``: no
acknowledged task lost, none completed twice.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import admin, wait_for

from actors.models import TaskStatus
from actors.queue import TaskManager, WorkerMonitor
from config.settings import Settings
from faults.cluster import Cluster, ClusterMode
from faults.workload import (
    CLOCK_SKEW_ENV,
    FaultRun,
    repeats,
    rng_for,
    soak_minutes,
    with_sections,
    worker_rss_mb,
)

MISBEHAVING = "faults.misbehaving"
#: Retries of the poison task: it kills POISON_RETRIES + 1 workers, then is dead-lettered.
POISON_RETRIES = 3
SOAK_MINUTES = soak_minutes()
SOAK_RATE = 40.0
"""Tasks enqueued per second during the soak."""
SOAK_SAMPLE_EVERY = 5.0


async def worker_id_of(run: FaultRun, pid: int) -> str:
    """The worker id a live worker process registered under."""
    for worker in await WorkerMonitor(run.queue).get_active_workers():
        if worker.get("pid") == pid:
            return str(worker["worker_id"])
    raise AssertionError(f"no worker record with pid {pid}")


def pids_of(run: FaultRun, request_id: str, kind: str = "started") -> list[int]:
    return [r["pid"] for r in run.ledger.read() if r["kind"] == kind and r["id"] == request_id]


# -- W1: SIGKILL of a worker that holds running tasks ----------------------------------


async def sigkill_mid_task(settings: Settings, workdir: Path, repeat: int) -> None:
    fault = "W1 worker SIGKILL mid-task"
    rng = rng_for(fault, repeat)
    async with FaultRun(fault, settings, workdir, repeat=repeat) as run:
        with Cluster(settings, workdir, workers=2, concurrency=4) as cluster:
            victim = cluster.worker_pids()[0]
            await run.submit(run.tasks(24, seconds=0.4))

            def victim_busy() -> bool:
                return any(r["pid"] == victim for r in run.ledger.read() if r["kind"] == "started")

            await wait_for(victim_busy, 10, message="the victim never started a task")
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            moment = time.time()
            cluster.kill_worker(victim)
            outcomes = await run.outcomes()
            records = run.ledger.read()
            hit = {r["id"] for r in records if r["kind"] == "started" and r["pid"] == victim}
            hit -= {r["id"] for r in records if r["kind"] == "side_effect" and r["pid"] == victim}
            report = await run.judge(
                worker_pids=cluster.worker_pids(),
                recovery=run.recovery_since(moment, hit),
                restarts=0,
            )
    assert set(outcomes.values()) == {TaskStatus.COMPLETED}
    assert hit, "the victim was killed with no task in flight"
    assert hit <= set(report.duplicate_executions), "a killed task was not run again"
    assert report.recovery_seconds is not None
    assert report.recovery_seconds < 5  # lease 1 s + heartbeat / reaper pass + spare


async def test_sigkilled_worker_mid_task_has_its_tasks_rerun_and_loses_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    await sigkill_mid_task(settings, tmp_path, 0)


@pytest.mark.slow
@pytest.mark.parametrize("repeat", repeats())
async def test_sigkilled_worker_mid_task_repeated(
    settings: Settings, tmp_path: Path, repeat: int
) -> None:
    await sigkill_mid_task(settings, tmp_path, repeat)


# -- W1b/W2: kills at random moments of a burst (claims included) ----------------------


async def kills_during_burst(settings: Settings, workdir: Path, repeat: int) -> None:
    fault = "W2 workers killed at random moments of a burst"
    rng = rng_for(fault, repeat)
    async with FaultRun(fault, settings, workdir, repeat=repeat) as run:
        with Cluster(settings, workdir, workers=2, concurrency=4) as cluster:
            moments = sorted(rng.uniform(0.0, 0.8) for _ in range(2))

            async def killer() -> None:
                begun = time.monotonic()
                for moment in moments:
                    await asyncio.sleep(max(0.0, begun + moment - time.monotonic()))
                    cluster.kill_worker(rng.choice(cluster.worker_pids()))
                    cluster.add_worker()

            await asyncio.gather(run.submit(run.tasks(80, seconds=0.1), pace=0.01), killer())
            outcomes = await run.outcomes()
            await run.judge(
                worker_pids=cluster.worker_pids(),
                restarts=run.events.total("worker.registered") - 2,
            )
    assert set(outcomes.values()) == {TaskStatus.COMPLETED}


async def test_workers_killed_at_random_moments_of_a_burst_leave_every_task_completed(
    settings: Settings, tmp_path: Path
) -> None:
    await kills_during_burst(settings, tmp_path, 0)


@pytest.mark.slow
@pytest.mark.parametrize("repeat", repeats())
async def test_workers_killed_at_random_moments_of_a_burst_repeated(
    settings: Settings, tmp_path: Path, repeat: int
) -> None:
    await kills_during_burst(settings, tmp_path, repeat)


# -- W4: SIGSTOP past the lease, then SIGCONT ------------------------------------------


async def frozen_past_lease(settings: Settings, workdir: Path, repeat: int) -> None:
    fault = "W4 worker SIGSTOP past its lease"
    rng = rng_for(fault, repeat)
    lease = settings.heartbeat.timeout
    async with FaultRun(fault, settings, workdir, repeat=repeat) as run:
        with Cluster(settings, workdir, workers=2, concurrency=4) as cluster:
            (slow,) = run.tasks(1, seconds=0.6)
            await run.submit([slow])
            await wait_for(lambda: bool(pids_of(run, slow.request_id)), 10)
            victim = pids_of(run, slow.request_id)[0]
            victim_id = await worker_id_of(run, victim)
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            moment = time.time()
            cluster.kill_worker(victim, signal.SIGSTOP)
            (outcome,) = (await run.outcomes([slow.request_id])).values()
            await asyncio.sleep(max(0.0, moment + 2 * lease - time.time()))
            resumed = time.time()
            os.kill(victim, signal.SIGCONT)

            async def beating_again() -> bool:
                workers = await WorkerMonitor(run.queue).get_active_workers()
                mine = [w for w in workers if w["worker_id"] == victim_id]
                return bool(mine) and mine[0]["last_heartbeat"] > resumed

            await wait_for(beating_again, 10, message="the resumed worker never beat again")
            await asyncio.sleep(0.5)  # its late completion, if any, has been refused by now
            response = await TaskManager(run.queue).get_response(slow.request_id)
            after = await run.outcomes(await run.submit(run.tasks(8)))
            report = await run.judge(
                worker_pids=cluster.worker_pids(),
                recovery=run.recovery_since(moment, [slow.request_id]),
                restarts=0,
            )
            alive = victim in cluster.worker_pids()
    assert outcome is TaskStatus.COMPLETED
    assert response is not None
    assert response.data["pid"] != victim, "the frozen worker's late result was accepted"
    assert run.events.counts("task.completed")[slow.request_id] == 1
    assert run.events.counts("worker.lost").get(victim_id, 0) >= 1
    assert report.duplicate_executions == {slow.request_id: 2}
    assert set(after.values()) == {TaskStatus.COMPLETED}
    assert alive


async def test_sigstopped_worker_past_its_lease_has_its_late_completion_refused(
    settings: Settings, tmp_path: Path
) -> None:
    await frozen_past_lease(settings, tmp_path, 0)


@pytest.mark.slow
@pytest.mark.parametrize("repeat", repeats())
async def test_sigstopped_worker_past_its_lease_repeated(
    settings: Settings, tmp_path: Path, repeat: int
) -> None:
    await frozen_past_lease(settings, tmp_path, repeat)


# -- W5: a task that blocks its worker's event loop ------------------------------------


async def blocked_loop(settings: Settings, workdir: Path, repeat: int, mode: ClusterMode) -> None:
    fault = f"W5 task blocks the event loop ({mode})"
    rng = rng_for(fault, repeat)
    # Actors mode: nobody kills the blocked worker, so it must outlast lease + detection.
    # Supervisor mode: longer, so the supervisor's kill comes first.
    block = 2.0 if mode == "actors" else 3.0
    async with FaultRun(fault, settings, workdir, repeat=repeat) as run:
        with Cluster(settings, workdir, workers=2, concurrency=4, mode=mode) as cluster:
            before = set(cluster.worker_pids())
            (poison,) = run.tasks(1, script="ledger-block", seconds=block, max_retries=1)
            others = run.tasks(20, seconds=0.05)
            await run.submit([poison])
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            await run.submit(others, pace=0.02)
            outcomes = await run.outcomes()
            if mode == "supervisor":

                def replaced() -> bool:
                    # Every worker the poison blocked is gone and replaced. The
                    # outcome alone is not enough: the heartbeat actor can fail the
                    # last attempt a moment before the supervisor kills its worker.
                    pids = set(cluster.worker_pids())
                    return len(pids) == 2 and not pids & set(pids_of(run, poison.request_id))

                await wait_for(replaced, 20, interval=0.1, message=cluster.logs())
            starts = [r["t"] for r in run.started(poison.request_id)]
            report = await run.judge(
                worker_pids=cluster.worker_pids(),
                recovery=round(starts[1] - starts[0], 3) if len(starts) > 1 else None,
                restarts=run.events.total("worker.registered") - 2,
            )
            survivors = set(cluster.worker_pids())
            supervisors = cluster.supervisor_pids()
    blocked = set(pids_of(run, poison.request_id))
    assert outcomes.pop(poison.request_id) is TaskStatus.FAILED  # after max_retries + 1 attempts
    assert len(pids_of(run, poison.request_id)) == 2
    assert set(outcomes.values()) == {TaskStatus.COMPLETED}
    assert run.events.total("worker.lost") >= 1
    if mode == "actors":
        assert survivors == before  # a blocked worker is only reported, never killed
    else:
        assert blocked <= before
        assert not blocked & survivors  # killed and replaced
        assert (report.restarts or 0) >= 1
        assert supervisors


@pytest.mark.parametrize("mode", ["actors", "supervisor"])
async def test_task_blocking_the_event_loop_has_its_worker_reported_lost_and_is_redelivered(
    settings: Settings, tmp_path: Path, mode: ClusterMode
) -> None:
    await blocked_loop(settings, tmp_path, 0, mode)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["actors", "supervisor"])
@pytest.mark.parametrize("repeat", repeats())
async def test_task_blocking_the_event_loop_repeated(
    settings: Settings, tmp_path: Path, repeat: int, mode: ClusterMode
) -> None:
    await blocked_loop(settings, tmp_path, repeat, mode)


# -- W6: a poison task that kills every worker that runs it ----------------------------


async def poison_task(settings: Settings, workdir: Path, repeat: int) -> None:
    fault = "W6 poison task crashes its worker"
    # More than max_restarts restarts within the window give up: one poison task
    # causes POISON_RETRIES + 1 crashes, so that many must be allowed, and no more.
    settings = with_sections(settings, supervisor={"max_restarts": POISON_RETRIES + 1})
    async with FaultRun(fault, settings, workdir, repeat=repeat) as run:
        with Cluster(settings, workdir, workers=2, concurrency=4, mode="supervisor") as cluster:
            (poison,) = run.tasks(
                1,
                script="ledger-crash",
                parameters={"crash_times": 1000},
                max_retries=POISON_RETRIES,
            )
            others = run.tasks(20, seconds=0.05, max_retries=20)
            moment = time.time()
            await run.submit([poison])
            await run.submit(others, pace=0.05)
            outcomes = await run.outcomes()
            await wait_for(lambda: len(cluster.worker_pids()) == 2, 20, message=cluster.logs())
            restarts = run.events.total("worker.registered") - 2
            failed = [r["t"] for r in run.ledger.read() if r["id"] == poison.request_id]
            await run.judge(
                worker_pids=cluster.worker_pids(),
                restarts=restarts,
                seconds_to_dead_letter=round(max(failed) - moment, 3),
            )
            supervisors = cluster.supervisor_pids()
    assert outcomes.pop(poison.request_id) is TaskStatus.FAILED
    assert len(pids_of(run, poison.request_id)) == POISON_RETRIES + 1
    assert set(outcomes.values()) == {TaskStatus.COMPLETED}
    assert restarts == POISON_RETRIES + 1
    assert supervisors, "one poison task tripped the supervisor's restart intensity"


async def test_poison_task_is_dead_lettered_after_its_retries_without_tripping_the_supervisor(
    settings: Settings, tmp_path: Path
) -> None:
    await poison_task(settings, tmp_path, 0)


@pytest.mark.slow
@pytest.mark.parametrize("repeat", repeats())
async def test_poison_task_repeated(settings: Settings, tmp_path: Path, repeat: int) -> None:
    await poison_task(settings, tmp_path, repeat)


# -- W7: a task that leaks memory --------------------------------------------------------


async def memory_leak(settings: Settings, workdir: Path, repeat: int) -> None:
    fault = "W7 leaking worker recycled at max_memory_mb"
    limit = 160
    # max_restarts = 0: a counted restart (a crash) would make the supervisor give
    # up, so a replacement with the supervisor still up proves an uncounted recycle.
    settings = with_sections(
        settings,
        worker={"scripts": (MISBEHAVING,), "max_memory_mb": limit},
        supervisor={"max_restarts": 0},
    )
    async with FaultRun(fault, settings, workdir, repeat=repeat) as run:
        with Cluster(settings, workdir, workers=1, mode="supervisor") as cluster:
            (first,) = cluster.worker_pids()
            peak = worker_rss_mb([first]) or 0.0
            # Two leaks of 64 MiB take a ~60 MiB worker past 160 MiB; a pause of two
            # heartbeats after each lets the watchdog see every step.
            for request in run.tasks(2, script="leak", parameters={"mb": 64}):
                await run.submit([request])
                await run.outcomes([request.request_id])
                peak = max(peak, worker_rss_mb([first]) or 0.0)
                await asyncio.sleep(2 * settings.heartbeat.interval)

            def replaced() -> bool:
                pids = cluster.worker_pids()
                return len(pids) == 1 and pids[0] != first

            await wait_for(replaced, 20, interval=0.1, message=cluster.logs())
            after = await run.outcomes(await run.submit(run.tasks(5)))
            await run.judge(
                worker_pids=cluster.worker_pids(),
                restarts=run.events.total("worker.registered") - 1,
                peak_rss_mb=round(peak, 1),
            )
            supervisors = cluster.supervisor_pids()
            logs = cluster.logs()
    assert f"max_memory_mb={limit}" in logs
    assert set(after.values()) == {TaskStatus.COMPLETED}
    assert supervisors, "the recycle was counted as a crash"


async def test_leaking_worker_is_recycled_at_max_memory_mb_and_replaced(
    settings: Settings, tmp_path: Path
) -> None:
    await memory_leak(settings, tmp_path, 0)


@pytest.mark.slow
@pytest.mark.parametrize("repeat", repeats())
async def test_leaking_worker_recycled_repeated(
    settings: Settings, tmp_path: Path, repeat: int
) -> None:
    await memory_leak(settings, tmp_path, repeat)


# -- C1: one worker's wall clock 90 s off ------------------------------------------------


async def skewed_clock(
    settings: Settings, workdir: Path, repeat: int, offset: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    fault = f"C1 worker clock {offset:+g} s"
    lease = settings.heartbeat.timeout
    monkeypatch.setenv(CLOCK_SKEW_ENV, str(offset))  # read by faults.skew in the spawned worker
    skewed = with_sections(settings, worker={"scripts": ("faults.skew",)})
    async with FaultRun(fault, settings, workdir, repeat=repeat) as run:
        # Its heartbeat and reaper actors keep the true time: only the worker imports scripts.
        with Cluster(skewed, workdir, workers=1, concurrency=10) as cluster:
            (clock,) = run.tasks(1, script="clock")
            await run.outcomes(await run.submit([clock]))
            response = await TaskManager(run.queue).get_response(clock.request_id)
            long = run.tasks(4, seconds=2.5 * lease)  # must be renewed, never taken back
            retried = run.tasks(4, script="fail", parameters={"times": 1})
            outcomes = await run.outcomes(await run.submit([*long, *retried]))
            delays = retry_delays(run, [r.request_id for r in retried])
            report = await run.judge(
                worker_pids=cluster.worker_pids(),
                restarts=0,
                retry_delay_max_s=round(max(delays), 3),
            )
    assert response is not None
    assert abs(response.data["time"] - time.time() - offset) < 5, "the skew is not in force"
    assert set(outcomes.values()) == {TaskStatus.COMPLETED}
    assert report.duplicate_executions == {}, "a lease expired early"
    assert run.events.total("task.requeued") == run.events.total("worker.lost") == 0
    backoff = settings.tasks.retry_backoff
    assert all(0.75 * backoff - 0.005 <= delay <= backoff + 0.5 for delay in delays), delays


def retry_delays(run: FaultRun, ids: list[str]) -> list[float]:
    """Per task, the Redis-clock seconds from its retry being scheduled to its second start."""
    delays = []
    for request_id in ids:
        mine = [e for e in run.events.events if e.get("request_id") == request_id]
        retrying = next(e["ts"] for e in mine if e["event"] == "task.retrying")
        second = next(
            e["ts"] for e in mine if e["event"] == "task.started" and e.get("attempt") == 2
        )
        delays.append(float(second) - float(retrying))
    return delays


@pytest.mark.parametrize("offset", [90.0, -90.0])
async def test_worker_with_its_clock_90_s_off_keeps_leases_and_retry_delays_exact(
    settings: Settings, tmp_path: Path, offset: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    await skewed_clock(settings, tmp_path, 0, offset, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("offset", [90.0, -90.0])
@pytest.mark.parametrize("repeat", repeats())
async def test_worker_with_its_clock_off_repeated(
    settings: Settings,
    tmp_path: Path,
    repeat: int,
    offset: float,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await skewed_clock(settings, tmp_path, repeat, offset, monkeypatch)


# -- W8: soak ------------------------------------------------------------------------------


def flat(samples: list[tuple[float, float]], duration: float, slack: float) -> dict[str, float]:
    """The plateau after warm-up and the final stretch; fails if the final one grew.

    Warm-up is the first sixth of the run, the plateau the second sixth, the
    final stretch the last third: its peak may exceed the plateau's by 20 % + ``slack``.
    """
    plateau = [v for t, v in samples if duration / 6 <= t < duration / 3]
    final = [v for t, v in samples if t >= duration * 2 / 3]
    assert plateau, f"no samples after warm-up in a {duration:.0f} s soak"
    assert final, f"no samples in the last third of a {duration:.0f} s soak"
    figures = {"plateau": max(plateau), "final": max(final)}
    assert figures["final"] <= figures["plateau"] * 1.2 + slack, figures
    return figures


@pytest.mark.soak
@pytest.mark.timeout(int(SOAK_MINUTES * 60) + 300)
async def test_soak_keeps_worker_memory_open_files_and_redis_clients_flat(
    settings: Settings, tmp_path: Path
) -> None:
    duration = SOAK_MINUTES * 60
    rss: list[tuple[float, float]] = []
    fds: list[tuple[float, float]] = []
    clients: list[tuple[float, float]] = []
    async with FaultRun(f"W8 soak {SOAK_MINUTES:g} min", settings, tmp_path) as run:
        with Cluster(settings, tmp_path, workers=2, concurrency=20, mode="supervisor") as cluster:
            begun = time.monotonic()

            async def produce() -> None:
                serial = 0
                while time.monotonic() - begun < duration:
                    serial += 1
                    if serial % 10 == 0:  # one in ten raises once, then succeeds
                        batch = run.tasks(1, script="fail", parameters={"times": 1})
                    else:
                        batch = run.tasks(1, seconds=0.01 + (serial % 5) * 0.01)
                    await run.submit(batch)
                    await asyncio.sleep(1 / SOAK_RATE)

            async def sample() -> None:
                while time.monotonic() - begun < duration:
                    now = time.monotonic() - begun
                    processes = [psutil.Process(pid) for pid in cluster.worker_pids()]
                    rss.append((now, max(p.memory_info().rss for p in processes) / 2**20))
                    fds.append((now, max(p.num_fds() for p in processes)))
                    info: dict[str, Any] = await admin(run.queue).info("clients")
                    clients.append((now, int(info["connected_clients"])))
                    await asyncio.sleep(SOAK_SAMPLE_EVERY)

            await asyncio.gather(produce(), sample())

            async def drained() -> bool:
                stats = await TaskManager(run.queue).queue_stats()
                return stats["pending"] + stats["running"] + stats["retrying"] == 0

            await wait_for(drained, 60, interval=0.5)
            memory = flat(rss, duration, slack=8)
            files = flat(fds, duration, slack=4)
            connections = flat(clients, duration, slack=4)
            await run.judge(
                worker_pids=cluster.worker_pids(),
                restarts=run.events.total("worker.registered") - 2,
                rss_plateau_mb=round(memory["plateau"], 1),
                rss_final_mb=round(memory["final"], 1),
                rss_median_mb=round(statistics.median(v for _, v in rss), 1),
                fds_plateau=files["plateau"],
                fds_final=files["final"],
                clients_plateau=connections["plateau"],
                clients_final=connections["final"],
                tasks_per_second=round(len(run.submitted) / duration, 1),
            )
