"""The worker actor, run in-process on the test's loop against a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from helpers import admin, wait_for

from actors.exceptions import RateLimited
from actors.exit_codes import ChildExit
from actors.models import ScrapingRequest, ScrapingResponse, TaskStatus
from actors.queue import RedisQueue, TaskManager, WorkerMonitor
from actors.scripts import current_attempt, script
from actors.worker import Worker
from config.settings import Settings
from supervisor.redis_server import RedisServer

pytestmark = pytest.mark.usefixtures("restore_signals")

# -- test scripts: each reports to the Probe named in its parameters ------------------------


@dataclass
class Probe:
    """What the test scripts saw; ``release`` (or, per attempt, ``gates``) lets one finish."""

    key: str = field(default_factory=lambda: uuid.uuid4().hex)
    active: int = 0
    peak: int = 0
    order: list[Any] = field(default_factory=list)
    runs: list[tuple[int, float]] = field(default_factory=list)  # (attempt, monotonic time)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    gates: defaultdict[int, asyncio.Event] = field(
        default_factory=lambda: defaultdict(asyncio.Event)
    )
    cancelled: bool = False


PROBES: dict[str, Probe] = {}


@script("test-gate")
async def gate(parameters: dict[str, Any]) -> dict[str, int]:
    """Sleeps ``seconds`` if given, else holds until the probe releases it."""
    probe = PROBES[parameters["probe"]]
    probe.active += 1
    probe.peak = max(probe.peak, probe.active)
    probe.order.append(parameters.get("tag"))
    probe.runs.append((current_attempt(), time.monotonic()))
    probe.started.set()
    try:
        if "seconds" in parameters:
            await asyncio.sleep(parameters["seconds"])
        else:
            await probe.release.wait()
    except asyncio.CancelledError:
        probe.cancelled = True
        raise
    finally:
        probe.active -= 1
    return {"attempt": current_attempt()}


@script("test-per-attempt")
async def per_attempt(parameters: dict[str, Any]) -> dict[str, int]:
    """Holds until the probe opens the gate of this attempt."""
    probe = PROBES[parameters["probe"]]
    probe.runs.append((current_attempt(), time.monotonic()))
    await probe.gates[current_attempt()].wait()
    return {"attempt": current_attempt()}


@script("test-rate-limited")
async def rate_limited_once(parameters: dict[str, Any]) -> dict[str, int]:
    probe = PROBES[parameters["probe"]]
    probe.runs.append((current_attempt(), time.monotonic()))
    if len(probe.runs) == 1:
        raise RateLimited(retry_after=0.3)
    return {"attempt": current_attempt()}


@script("test-own-timeout")
async def own_timeout(parameters: dict[str, Any]) -> None:
    raise TimeoutError("upstream took too long")


@script("test-not-json")
async def not_json(parameters: dict[str, Any]) -> object:
    return {1, 2, 3} if parameters["kind"] == "set" else object()


# -- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture
def probe() -> Iterator[Probe]:
    made = Probe()
    PROBES[made.key] = made
    yield made
    del PROBES[made.key]


def derive(settings: Settings, **sections: dict[str, Any]) -> Settings:
    """``settings`` with some keys of some sections replaced (Settings is frozen)."""
    data = settings.model_dump(mode="json")
    for section, values in sections.items():
        data[section] = {**data[section], **values}
    return Settings.from_json(json.dumps(data))


@dataclass
class Running:
    worker: Worker
    main: asyncio.Task[int]

    async def exit_code(self, timeout: float = 10) -> int:
        return await asyncio.wait_for(asyncio.shield(self.main), timeout)


@contextlib.asynccontextmanager
async def run_worker(settings: Settings, actor_id: str = "w1") -> AsyncIterator[Running]:
    """A worker on this loop; stopped at once (abort) on exit unless it already returned."""
    # The parent pid is the one the worker watches: ours, as seen from this process.
    worker = Worker(actor_id, settings, os.getppid())
    running = Running(worker, asyncio.create_task(worker.main()))
    try:
        yield running
    finally:
        worker.request_stop(abort=True)
        await asyncio.wait_for(running.main, 15)


async def enqueue(queue: RedisQueue, script_name: str, **fields: Any) -> str:
    return await queue.enqueue_task(ScrapingRequest(script_name=script_name, **fields))


async def outcome(queue: RedisQueue, request_id: str, timeout: float = 10) -> ScrapingResponse:
    return await queue.wait_for_response(request_id, timeout)


async def dead_letter(manager: TaskManager, request_id: str) -> dict[str, Any]:
    letters = {letter["request_id"]: letter for letter in await manager.list_dead_letters()}
    assert request_id in letters, f"{request_id} is not in the dead-letter queue"
    return letters[request_id]


async def just_renewed(queue: RedisQueue, worker_id: str) -> None:
    """Return right after the worker's next heartbeat (and the lease renewal that follows it)."""
    key = queue.keys.worker(worker_id)
    before = await admin(queue).hget(key, "last_heartbeat")

    async def beat() -> bool:
        return await admin(queue).hget(key, "last_heartbeat") != before

    await wait_for(beat, 2, interval=0.005)
    await asyncio.sleep(0.02)


# -- outcomes ------------------------------------------------------------------------------


async def test_echo_completes_with_its_parameters_and_the_worker_counts_it(
    settings: Settings, queue: RedisQueue
) -> None:
    parameters = {"query": "books", "page": 2, "tags": ["a", "b"]}
    async with run_worker(settings):
        request_id = await enqueue(queue, "echo", parameters=parameters)
        response = await outcome(queue, request_id)

        assert response.status is TaskStatus.COMPLETED
        assert response.data == parameters
        assert response.execution_time is not None
        assert response.execution_time >= 0
        monitor = WorkerMonitor(queue)

        async def counted() -> bool:
            workers = {w["worker_id"]: w for w in await monitor.get_active_workers()}
            return workers.get("w1", {}).get("tasks_processed") == 1

        await wait_for(counted, 3, message="tasks_processed never reached 1")


async def test_higher_priority_tasks_run_first_with_concurrency_one(
    settings: Settings, queue: RedisQueue, probe: Probe
) -> None:
    for tag, priority in enumerate([0, 5, -3, 10, 5]):
        params = {"probe": probe.key, "tag": tag, "seconds": 0}
        await enqueue(queue, "test-gate", parameters=params, priority=priority)
    async with run_worker(derive(settings, worker={"concurrency": 1})):
        await wait_for(lambda: len(probe.order) == 5, 10)

    assert probe.order == [3, 1, 4, 0, 2]


async def test_no_more_than_concurrency_tasks_run_at_once_and_that_many_do(
    settings: Settings, queue: RedisQueue, probe: Probe
) -> None:
    ids = [
        await enqueue(queue, "test-gate", parameters={"probe": probe.key, "seconds": 0.1})
        for _ in range(8)
    ]
    async with run_worker(derive(settings, worker={"concurrency": 3})):
        for request_id in ids:
            assert (await outcome(queue, request_id)).status is TaskStatus.COMPLETED

    assert probe.peak == 3


@pytest.mark.parametrize(
    ("script_name", "version", "named"),
    [("no-such-script", None, "'no-such-script'"), ("echo", "9", "'echo' version 9")],
)
async def test_unknown_script_fails_at_once_to_the_dead_letters(
    settings: Settings, manager: TaskManager, script_name: str, version: str | None, named: str
) -> None:
    async with run_worker(settings):
        request_id = await enqueue(
            manager.queue, script_name, script_version=version, max_retries=3
        )
        response = await outcome(manager.queue, request_id)

    assert response.status is TaskStatus.FAILED
    assert response.error == f"unknown script {named}"
    letter = await dead_letter(manager, request_id)
    assert letter["attempt"] == 1
    assert len(letter["history"]) == 1


async def test_failing_script_completes_on_the_attempt_after_its_failures(
    settings: Settings, queue: RedisQueue
) -> None:
    async with run_worker(settings):
        request_id = await enqueue(queue, "fail", parameters={"times": 2}, max_retries=3)
        response = await outcome(queue, request_id)

    assert response.status is TaskStatus.COMPLETED
    assert response.data == {"attempts": 3}


async def test_retry_starts_once_its_backoff_is_over_not_at_the_next_idle_poll(
    settings: Settings, queue: RedisQueue
) -> None:
    async with run_worker(settings):
        await outcome(queue, await enqueue(queue, "echo"))  # up and idle
        started = time.monotonic()
        response = await outcome(queue, await enqueue(queue, "fail", parameters={"times": 1}))
        elapsed = time.monotonic() - started

    assert response.data == {"attempts": 2}
    assert elapsed < 0.6  # retry_backoff is 0.05 s (x1.25 jitter at most)


async def test_always_failing_script_is_dead_lettered_after_max_retries_plus_one_attempts(
    settings: Settings, queue: RedisQueue, manager: TaskManager
) -> None:
    async with run_worker(settings):
        request_id = await enqueue(queue, "fail", parameters={"times": -1}, max_retries=2)
        response = await outcome(queue, request_id)

    assert response.status is TaskStatus.FAILED
    letter = await dead_letter(manager, request_id)
    assert letter["attempt"] == 3
    assert [entry["attempt"] for entry in letter["history"]] == [1, 2, 3]
    assert all("deliberate failure" in entry["error"] for entry in letter["history"])
    assert all(entry["worker"] == "w1" for entry in letter["history"])


# -- timeouts and results -----------------------------------------------------------------


async def test_script_running_past_its_timeout_fails_as_timed_out_and_is_retried(
    settings: Settings, queue: RedisQueue, manager: TaskManager
) -> None:
    async with run_worker(settings):
        request_id = await enqueue(
            queue, "sleep", parameters={"seconds": 5}, timeout=0.2, max_retries=1
        )
        response = await outcome(queue, request_id)

    assert response.status is TaskStatus.FAILED
    assert response.error == "timed out after 0.2s"
    letter = await dead_letter(manager, request_id)
    assert [entry["error"] for entry in letter["history"]] == ["timed out after 0.2s"] * 2


async def test_timeout_error_raised_by_the_script_itself_is_reported_as_that_error(
    settings: Settings, queue: RedisQueue
) -> None:
    async with run_worker(settings):
        request_id = await enqueue(queue, "test-own-timeout", timeout=30, max_retries=0)
        response = await outcome(queue, request_id)

    assert response.status is TaskStatus.FAILED
    assert response.error == "TimeoutError: upstream took too long"


@pytest.mark.parametrize("kind", ["set", "object"])
async def test_result_that_is_not_json_fails_the_task_permanently(
    settings: Settings, queue: RedisQueue, manager: TaskManager, kind: str
) -> None:
    async with run_worker(settings):
        request_id = await enqueue(queue, "test-not-json", parameters={"kind": kind})
        response = await outcome(queue, request_id)

    assert response.status is TaskStatus.FAILED
    assert response.error is not None
    assert response.error.startswith("script returned a value that is not JSON")
    assert (await dead_letter(manager, request_id))["attempt"] == 1


async def test_result_over_max_result_bytes_fails_the_task_naming_the_limit(
    settings: Settings, queue: RedisQueue, manager: TaskManager
) -> None:
    async with run_worker(derive(settings, tasks={"max_result_bytes": 200})):
        request_id = await enqueue(queue, "echo", parameters={"blob": "x" * 1000})
        response = await outcome(queue, request_id)

    assert response.status is TaskStatus.FAILED
    assert response.error is not None
    assert "max_result_bytes=200" in response.error
    assert (await dead_letter(manager, request_id))["attempt"] == 1


async def test_rate_limited_task_is_retried_after_retry_after_without_burning_an_attempt(
    settings: Settings, queue: RedisQueue, probe: Probe
) -> None:
    async with run_worker(settings):
        # max_retries=0: a burned attempt would dead-letter it instead.
        request_id = await enqueue(
            queue, "test-rate-limited", parameters={"probe": probe.key}, max_retries=0
        )
        response = await outcome(queue, request_id)

    assert response.status is TaskStatus.COMPLETED
    assert response.data == {"attempt": 1}
    (first, first_at), (second, second_at) = probe.runs
    assert (first, second) == (1, 1)
    assert second_at - first_at >= 0.25  # retry_after=0.3 on the Redis clock


# -- cancellation, draining, recycling ----------------------------------------------------


async def test_cancelled_running_task_is_stopped_at_the_next_lease_renewal(
    settings: Settings, queue: RedisQueue, manager: TaskManager, probe: Probe
) -> None:
    async with run_worker(settings):
        request_id = await enqueue(queue, "test-gate", parameters={"probe": probe.key})
        await asyncio.wait_for(probe.started.wait(), 5)
        assert await queue.cancel_task(request_id)
        await wait_for(lambda: probe.cancelled, 2, message="the script was never cancelled")

        assert await manager.get_task_status(request_id) is TaskStatus.CANCELLED
        response = await manager.get_response(request_id)
        assert response is not None
        assert response.status is TaskStatus.CANCELLED
        assert (await manager.queue_stats())["completed"] == 0


async def test_task_reclaimed_by_the_same_worker_keeps_its_new_lease_alive(
    settings: Settings, queue: RedisQueue, manager: TaskManager, probe: Probe
) -> None:
    async with run_worker(settings):
        request_id = await enqueue(queue, "test-per-attempt", parameters={"probe": probe.key})
        await wait_for(lambda: len(probe.runs) == 1, 5)
        await just_renewed(queue, "w1")  # so no renewal falls between requeue and reclaim
        # What the heartbeat actor does when the worker stalled past its lease:
        assert await queue.store.requeue_worker("w1") == (1, 0)
        await wait_for(lambda: len(probe.runs) == 2, 2)  # the same worker claims it again
        probe.gates[1].set()  # the stale run ends (its report is refused)

        await asyncio.sleep(1.5 * settings.heartbeat.timeout)
        assert await queue.store.requeue_expired() == (0, 0)
        probe.gates[2].set()
        response = await outcome(queue, request_id)

    assert response.data == {"attempt": 2}


async def test_stop_lets_a_running_task_finish_and_exits_zero(
    settings: Settings, queue: RedisQueue, manager: TaskManager, probe: Probe
) -> None:
    async with run_worker(settings) as running:
        params = {"probe": probe.key, "seconds": 0.5}
        request_id = await enqueue(queue, "test-gate", parameters=params)
        await asyncio.wait_for(probe.started.wait(), 5)
        running.worker.request_stop()

        assert await running.exit_code() == ChildExit.OK
    assert await manager.get_task_status(request_id) is TaskStatus.COMPLETED
    assert not probe.cancelled


async def test_task_outlasting_drain_timeout_is_handed_back_unburned(
    settings: Settings, queue: RedisQueue, manager: TaskManager, probe: Probe
) -> None:
    async with run_worker(derive(settings, supervisor={"drain_timeout": 0.3})) as running:
        request_id = await enqueue(queue, "test-gate", parameters={"probe": probe.key})
        await asyncio.wait_for(probe.started.wait(), 5)
        stopped_at = time.monotonic()
        running.worker.request_stop()

        assert await running.exit_code() == ChildExit.OK
        assert 0.25 <= time.monotonic() - stopped_at < 3
    assert probe.cancelled
    task = await manager.get_task(request_id)
    assert task is not None
    assert (task["status"], task["attempt"]) == ("pending", 0)


async def test_abort_hands_running_tasks_back_at_once(
    settings: Settings, queue: RedisQueue, manager: TaskManager, probe: Probe
) -> None:
    async with run_worker(settings) as running:  # drain_timeout stays 30 s
        request_id = await enqueue(queue, "test-gate", parameters={"probe": probe.key})
        await asyncio.wait_for(probe.started.wait(), 5)
        running.worker.request_stop(abort=True)

        assert await running.exit_code(timeout=2) == ChildExit.OK
    task = await manager.get_task(request_id)
    assert task is not None
    assert (task["status"], task["attempt"]) == ("pending", 0)


async def test_worker_recycles_after_max_tasks_per_child_having_finished_them(
    settings: Settings, queue: RedisQueue, manager: TaskManager
) -> None:
    for n in range(6):
        await enqueue(queue, "echo", parameters={"n": n})
    recycled = derive(settings, worker={"concurrency": 1, "max_tasks_per_child": 3})
    async with run_worker(recycled) as running:
        assert await running.exit_code() == ChildExit.RECYCLE

    stats = await manager.queue_stats()
    assert 3 <= stats["completed"] <= int(3 * 1.1)  # up to +10% jitter
    assert stats["running"] == 0
    assert stats["pending"] == 6 - stats["completed"]


# -- faults -------------------------------------------------------------------------------


async def test_corrupt_task_record_is_dead_lettered_and_the_worker_carries_on(
    settings: Settings, queue: RedisQueue, manager: TaskManager
) -> None:
    broken = await enqueue(queue, "echo")
    await admin(queue).hset(queue.keys.task(broken), "request", "{not json")
    async with run_worker(settings):
        response = await outcome(queue, broken)
        assert response.status is TaskStatus.FAILED
        assert response.error is not None
        assert response.error.startswith("invalid task record")
        assert (await dead_letter(manager, broken))["attempt"] == 1

        after = await enqueue(queue, "echo", parameters={"still": "working"})
        assert (await outcome(queue, after)).data == {"still": "working"}


async def test_worker_rides_out_a_redis_stall_with_few_log_lines(
    settings: Settings,
    queue: RedisQueue,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with run_worker(settings):
        await outcome(queue, await enqueue(queue, "echo"))  # up and idle
        redis_server.pause()
        try:
            await asyncio.sleep(1.5)
        finally:
            redis_server.resume()
        request_id = await enqueue(queue, "echo", parameters={"after": "stall"})

        assert (await outcome(queue, request_id)).data == {"after": "stall"}
    failures = [
        r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("actors")
    ]
    assert len(failures) <= 6, [r.getMessage() for r in failures]


async def test_worker_recovers_from_a_redis_restart_with_few_log_lines(
    settings: Settings,
    queue: RedisQueue,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with run_worker(settings):
        await outcome(queue, await enqueue(queue, "echo"))  # up and idle
        redis_server.kill()
        try:
            await asyncio.sleep(1.0)
        finally:
            redis_server.start()
        request_id = await enqueue(queue, "echo", parameters={"after": "restart"})

        assert (await outcome(queue, request_id, timeout=15)).data == {"after": "restart"}
    failures = [
        r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("actors")
    ]
    assert len(failures) <= 10, [r.getMessage() for r in failures]
