"""The steps every fault test shares: observe, submit a burst, wait, judge, record figures.

A fault test opens a :class:`FaultRun` (ledger, event recorder, connection
sampler and a producer queue on the real Redis), submits ledger tasks,
injects its fault, waits for the outcomes and calls :meth:`FaultRun.judge`.
``judge`` runs the ledger checker, cross-checks completions against Redis's
own commit counter (a second witness when pub/sub events were missed),
appends one line of figures to ``$FAULT_SUITE_FIGURES`` for
``run_report.py``, and fails on any lost task or double completion.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast

import psutil
from helpers import admin, wait_for

from actors.exceptions import QueueError
from actors.models import ScrapingRequest, TaskStatus
from actors.queue import RedisQueue
from config.settings import Settings
from faults.ledger import (
    Ledger,
    Report,
    append_record,
    await_outcome,
    check,
    ledger_request,
    submit,
)
from faults.observers import ConnectionSampler, EventRecorder
from faults.run_report import FIGURES_ENV, REPEATS_ENV, SOAK_MINUTES_ENV

DEFAULT_REPEATS = 20
DEFAULT_SOAK_MINUTES = 30.0
#: Seconds ``faults.skew`` sets its worker's clock off by (never import that module here).
CLOCK_SKEW_ENV = "FAULT_SUITE_CLOCK_SKEW"
#: How long a fault test waits for the outcome of its tasks after healing.
OUTCOME_TIMEOUT = 45.0
#: How long every worker gets to claim work again after a fault heals.
RECLAIM_WITHIN = 15.0
#: How long a run waits for an earlier run's leftovers to drain before it starts.
QUIESCE_TIMEOUT = 30.0
MIB = 1024 * 1024


def repeats() -> list[int]:
    """Repeat indexes for ``@pytest.mark.parametrize("repeat", repeats())``.

    They start at 1: repeat 0 is the default suite's single run of the same fault.
    """
    return list(range(1, int(os.environ.get(REPEATS_ENV, DEFAULT_REPEATS)) + 1))


def soak_minutes() -> float:
    return float(os.environ.get(SOAK_MINUTES_ENV, DEFAULT_SOAK_MINUTES))


def rng_for(fault: str, repeat: int) -> random.Random:
    """A seeded generator, so a failing repeat replays with the same moments."""
    return random.Random(f"{fault}#{repeat}")


def record_figures(fault: str, figures: Mapping[str, Any]) -> None:
    """Append ``figures`` of one run of ``fault`` to the figures file, if one is set."""
    path = os.environ.get(FIGURES_ENV)
    if path:
        append_record(path, {"fault": fault, **figures})


def with_sections(settings: Settings, **sections: Mapping[str, Any]) -> Settings:
    """``settings`` with some keys of some sections replaced."""
    data = settings.model_dump()
    for section, values in sections.items():
        data[section].update(values)
    return Settings.model_validate(data)


def fault_settings(url: str, prefix: str, state_dir: Path) -> Settings:
    """What the ``settings`` fixture gives, for fixtures that outlive one test."""
    return Settings.model_validate(
        {
            "redis": {"url": url, "embedded": "never", "key_prefix": prefix},
            "tasks": {"retry_backoff": 0.05, "retry_backoff_max": 0.2, "cleanup_interval": 1},
            "heartbeat": {"interval": 0.2, "timeout": 1.0},
            "supervisor": {"state_dir": state_dir, "metrics_port": 0},
        }
    )


def worker_rss_mb(pids: Iterable[int]) -> float | None:
    """The largest resident set of ``pids`` in MiB (None: none is alive)."""
    sizes = []
    for pid in pids:
        try:
            sizes.append(psutil.Process(pid).memory_info().rss / MIB)
        except psutil.NoSuchProcess:
            continue
    return round(max(sizes), 1) if sizes else None


class FaultRun:
    """One run of one fault: its evidence, its producer, its verdict.

    Usage::

        async with FaultRun("W1 worker SIGKILL", settings, tmp_path, repeat=0) as run:
            with Cluster(settings, tmp_path) as cluster:
                acked = await run.submit(run.tasks(20, seconds=0.3))
                ...inject the fault...
                await run.outcomes()
                run.judge(cluster_pids=cluster.worker_pids(), restarts=...)

    ``settings`` name the real Redis (never a proxy): the producer, the
    waiters and the observers keep reaching it whatever the fault.
    """

    def __init__(self, fault: str, settings: Settings, workdir: Path, *, repeat: int = 0) -> None:
        self.fault = fault
        self.repeat = repeat
        self.settings = settings
        safe = "".join(c if c.isalnum() else "-" for c in fault)
        self.ledger = Ledger(workdir / f"ledger-{safe}-{repeat}.jsonl")
        url, prefix = settings.redis.url, settings.redis.key_prefix
        self.events = EventRecorder(url, prefix)
        self.sampler = ConnectionSampler(url)
        self.queue = RedisQueue(settings)
        self.submitted: list[str] = []
        self._serial = 0
        self._token = uuid.uuid4().hex[:8]  # ids stay unique when runs share a key space
        self._commits_before = 0

    async def __aenter__(self) -> Self:
        self.events.start()
        self.sampler.start()
        await self.queue.connect()
        await self._quiesce()
        self._commits_before = await self.commits()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.queue.close()
        self.sampler.stop()
        self.events.stop()

    # -- workload ------------------------------------------------------------------

    def tasks(
        self,
        count: int,
        *,
        script: str = "ledger",
        seconds: float = 0.0,
        parameters: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> list[ScrapingRequest]:
        """``count`` ledger requests with ids unique within this run."""
        requests = []
        for _ in range(count):
            self._serial += 1
            requests.append(
                ledger_request(
                    self.ledger,
                    f"{script}-{self._token}-{self._serial}",
                    script=script,
                    parameters={"seconds": seconds, **(parameters or {})},
                    **options,
                )
            )
        return requests

    async def submit(self, requests: Sequence[ScrapingRequest], *, pace: float = 0.0) -> list[str]:
        """Enqueue one by one (``pace`` seconds apart); returns the acknowledged ids."""
        acked = []
        for index, request in enumerate(requests):
            if pace and index:
                await asyncio.sleep(pace)
            self.submitted.append(request.request_id)
            if await submit(self.queue, self.ledger, request):
                acked.append(request.request_id)
        return acked

    async def submit_batch(self, requests: Sequence[ScrapingRequest]) -> list[str]:
        """Enqueue all in one call (all or none, one wake-up for the workers); the acked ids."""
        ids = [request.request_id for request in requests]
        self.submitted += ids
        try:
            await self.queue.enqueue_many(requests)
        except QueueError as exc:
            for request_id in ids:
                self.ledger.append("refused", id=request_id, error=f"{type(exc).__name__}: {exc}")
            return []
        for request_id in ids:
            self.ledger.append("enqueued", id=request_id)
        return ids

    async def outcomes(
        self, ids: Iterable[str] | None = None, timeout: float = OUTCOME_TIMEOUT
    ) -> dict[str, TaskStatus | None]:
        """Wait for the final status of ``ids`` (default: every acknowledged one)."""
        wanted = list(self.acknowledged() if ids is None else ids)
        results = await asyncio.gather(
            *(await_outcome(self.queue, self.ledger, rid, timeout) for rid in wanted)
        )
        return dict(zip(wanted, results, strict=True))

    async def idle_workers(self, live: Callable[[], Iterable[int]], within: float) -> set[int]:
        """Workers that claim nothing for ``within`` seconds while tasks wait (zombies).

        Submits small batches until every pid ``live()`` names has started one of
        them. A worker still in its own backoff after a fault may take a few
        seconds; one that never claims again is the zombie consumer of the
        research (a live process that does no work).
        """
        deadline = time.monotonic() + within
        seen: set[int] = set()
        while True:
            batch = self.tasks(8, seconds=0.2)
            outcomes = await self.outcomes(await self.submit(batch))
            assert set(outcomes.values()) == {TaskStatus.COMPLETED}, outcomes
            ids = {request.request_id for request in batch}
            seen |= {
                r["pid"] for r in self.ledger.read() if r["kind"] == "started" and r["id"] in ids
            }
            missing = set(live()) - seen
            if not missing or time.monotonic() > deadline:
                return missing

    def acknowledged(self) -> list[str]:
        return [r["id"] for r in self.ledger.read() if r["kind"] == "enqueued"]

    def started(self, request_id: str) -> list[dict[str, Any]]:
        """The ``started`` records of one task, in order."""
        return [r for r in self.ledger.read() if r["kind"] == "started" and r["id"] == request_id]

    async def running_ids(self) -> set[str]:
        """Ids leased right now (the tasks a fault injected now would hit)."""
        raw = await admin(self.queue).zrange(self.queue.keys.running, 0, -1)
        return {item.decode() for item in cast(list[bytes], raw)}

    async def commits(self) -> int:
        """Redis's counter of completions committed in this key space."""
        raw = await admin(self.queue).hget(self.queue.keys.stats, "completed")
        return int(raw or 0)

    def recovery_since(self, moment: float, ids: Iterable[str] | None = None) -> float | None:
        """Seconds from ``moment`` (``time.time()``) to the first completion after it.

        With ``ids``, only their completions count (e.g. the tasks in flight at the fault).
        """
        wanted = set(ids) if ids is not None else None
        times = [
            float(event["ts"])
            for event in list(self.events.events)
            if event["event"] == "task.completed"
            and float(event["ts"]) >= moment
            and (wanted is None or event.get("request_id") in wanted)
        ]
        return round(min(times) - moment, 3) if times else None

    async def _quiesce(self) -> None:
        """Wait until no task of an earlier run is queued or running in this key space.

        A shared cluster may still be finishing what a failed run left behind;
        its completions would be counted as this run's.
        """
        keys = self.queue.keys

        async def idle() -> bool:
            pipe = admin(self.queue).pipeline(transaction=False)
            for zset in (keys.pending, keys.running, keys.delayed):
                pipe.zcard(zset)
            sizes: list[int] = await pipe.execute()
            return sum(sizes) == 0

        await wait_for(idle, QUIESCE_TIMEOUT, interval=0.1, message="the key space never idled")

    async def _snapshot(self) -> tuple[int, dict[str, str | None]]:
        """The commit counter and every submitted task's status, read atomically."""
        keys = self.queue.keys
        pipe = admin(self.queue).pipeline(transaction=True)
        pipe.hget(keys.stats, "completed")
        for request_id in self.submitted:
            pipe.hget(keys.task(request_id), "status")
        commits, *values = await pipe.execute()
        statuses = {
            rid: None if value is None else value.decode()
            for rid, value in zip(self.submitted, values, strict=True)
        }
        return int(commits or 0), statuses

    # -- verdict -------------------------------------------------------------------

    async def judge(
        self,
        *,
        worker_pids: Iterable[int] = (),
        recovery: float | None = None,
        restarts: int | None = None,
        count_commits: bool = True,
        **figures: Any,
    ) -> Report:
        """Check the run, record its figures, and fail on a lost or twice-completed task.

        ``count_commits`` cross-checks Redis's completion counter against the
        completed tasks (off when the fault resets Redis's data).
        """
        commits, statuses = await self._snapshot()
        report = check(self.ledger, self.events.counts("task.completed"), statuses=statuses)
        report.recovery_seconds = recovery
        report.restarts = restarts
        report.peak_connections = self.sampler.peak
        extra_commits = 0
        if count_commits:
            completed = sum(1 for status in statuses.values() if status == "completed")
            extra_commits = commits - self._commits_before - completed
        record_figures(
            self.fault,
            {
                "repeat": self.repeat,
                "test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0],
                **report.as_row(),
                "extra_commits": extra_commits,
                "event_gaps": self.events.gaps,
                "worker_rss_mb": worker_rss_mb(worker_pids),
                # Measured, whatever the test expects: a supervisor announces every
                # restart of any actor kind (none in an actors-mode cluster).
                "actor_restarts": self.events.total("worker.restarted"),
                "t": time.time(),
                **figures,
            },
        )
        report.assert_no_loss()
        assert extra_commits == 0, f"{extra_commits} completion(s) committed twice"
        return report
