"""The public queue API (RedisQueue, TaskManager, WorkerMonitor) against a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import admin, count, event_log, wait_for
from redis.exceptions import ResponseError

from actors import queue as queue_module
from actors.exceptions import (
    BackpressureException,
    DuplicateTaskException,
    InvalidTaskException,
    QueueConnectionException,
)
from actors.models import ScrapingRequest, ScrapingResponse, TaskStatus
from actors.queue import ENQUEUE_CHUNK, RedisQueue, TaskManager, WorkerMonitor
from actors.store import Completion, EnqueueItem
from config.settings import Settings
from supervisor.redis_server import RedisServer, free_port


def derive(settings: Settings, **sections: dict[str, Any]) -> Settings:
    """``settings`` with some keys of some sections replaced (Settings is frozen)."""
    data = settings.model_dump()
    for section, values in sections.items():
        data[section] = {**data[section], **values}
    return Settings.model_validate(data)


def request(**fields: Any) -> ScrapingRequest:
    return ScrapingRequest(**{"script_name": "echo", **fields})


def completed(request_id: str, data: Any = None) -> ScrapingResponse:
    return ScrapingResponse(
        request_id=request_id, status=TaskStatus.COMPLETED, data=data, execution_time=0.1
    )


def failed(request_id: str, error: str = "boom") -> ScrapingResponse:
    return ScrapingResponse(request_id=request_id, status=TaskStatus.FAILED, error=error)


def cancelled(request_id: str) -> ScrapingResponse:
    return ScrapingResponse(request_id=request_id, status=TaskStatus.CANCELLED)


async def keys_of(queue: RedisQueue) -> list[bytes]:
    """Every key of the test's prefix: proves what a refused call did not write."""
    prefix = queue.settings.redis.key_prefix
    return [key async for key in admin(queue).scan_iter(match=f"{prefix}:*")]


async def dequeue(queue: RedisQueue, worker: str = "w1") -> ScrapingRequest:
    got = await queue.dequeue_task(worker, timeout=5)
    assert got is not None
    return got


async def expire_lease(queue: RedisQueue, request_id: str) -> None:
    await admin(queue).zadd(queue.keys.running, {request_id: 0}, xx=True)
    await queue.store.requeue_expired()


# -- enqueue -------------------------------------------------------------------------------


async def test_enqueue_many_returns_ids_in_order_and_they_run_in_order(
    queue: RedisQueue,
) -> None:
    sent = [request() for _ in range(ENQUEUE_CHUNK + 3)]

    ids = await queue.enqueue_many(sent)

    assert ids == [r.request_id for r in sent]
    assert [(await dequeue(queue)).request_id for _ in range(3)] == ids[:3]
    assert await admin(queue).zcard(queue.keys.pending) == ENQUEUE_CHUNK


async def test_enqueue_many_keeps_fifo_order_across_chunks_sent_in_parallel(
    queue: RedisQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queue_module, "ENQUEUE_CHUNK", 3)  # 10 chunks, 4 in flight at once
    sent = [request() for _ in range(30)]

    ids = await queue.enqueue_many(sent)

    assert [(await dequeue(queue)).request_id for _ in range(30)] == ids


async def test_enqueue_many_after_a_refused_chunk_can_be_sent_again_whole(
    queue: RedisQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queue_module, "ENQUEUE_CHUNK", 3)
    taken = request()
    await queue.enqueue_task(taken)
    clash = request(request_id=taken.request_id, priority=5)  # same id, other request
    batch = [request() for _ in range(7)] + [clash] + [request() for _ in range(7)]

    with pytest.raises(DuplicateTaskException):
        await queue.enqueue_many(batch)
    without_clash = [r for r in batch if r is not clash]
    await queue.enqueue_many(without_clash)  # chunks stored the first time are no-ops

    assert await admin(queue).zcard(queue.keys.pending) == 1 + len(without_clash)


async def test_oversized_payload_is_rejected_naming_parameters_and_writes_nothing(
    settings: Settings,
) -> None:
    small = derive(settings, tasks={"max_payload_bytes": 1000})
    async with RedisQueue(small) as queue:
        big = request(parameters={"blob": "x" * 1000})

        with pytest.raises(InvalidTaskException) as caught:
            await queue.enqueue_task(big)
        assert caught.value.field == "parameters"
        with pytest.raises(InvalidTaskException):
            await queue.enqueue_many([request(), big])

        assert await keys_of(queue) == []


@pytest.mark.parametrize(
    "bad_id", ["a:b", "a*", "a b", "x" * 10_240], ids=["colon", "star", "space", "10-KB"]
)
async def test_bad_request_id_is_rejected_naming_request_id_and_writes_nothing(
    queue: RedisQueue, bad_id: str
) -> None:
    with pytest.raises(InvalidTaskException) as caught:
        await queue.enqueue_task(request(request_id=bad_id))

    assert caught.value.field == "request_id"
    assert await keys_of(queue) == []


async def test_nan_parameters_are_rejected_before_reaching_redis(queue: RedisQueue) -> None:
    with pytest.raises(InvalidTaskException) as caught:
        await queue.enqueue_task(request(parameters={"x": float("nan")}))

    assert caught.value.field == "parameters"
    assert await keys_of(queue) == []


async def test_configured_defaults_fill_fields_the_request_left_unset(
    settings: Settings,
) -> None:
    custom = derive(settings, tasks={"default_timeout": 42, "max_retries": 1})
    async with RedisQueue(custom) as queue:
        plain = await queue.enqueue_task(request())
        explicit = await queue.enqueue_task(request(timeout=7, max_retries=5))

        got = {r.request_id: r for r in [await dequeue(queue), await dequeue(queue)]}
        stored = await admin(queue).hget(queue.keys.task(plain), "max_retries")

    assert (got[plain].timeout, got[plain].max_retries) == (42, 1)
    assert stored == b"1"
    assert (got[explicit].timeout, got[explicit].max_retries) == (7, 5)


# -- dequeue ------------------------------------------------------------------------------


async def test_dequeue_returns_none_once_its_timeout_passes(queue: RedisQueue) -> None:
    started = time.monotonic()

    assert await queue.dequeue_task("w1", timeout=0.2) is None
    assert time.monotonic() - started >= 0.2


async def test_dequeue_is_woken_by_an_enqueue_instead_of_polling(queue: RedisQueue) -> None:
    waiting = asyncio.create_task(queue.dequeue_task("w1", timeout=10))
    await asyncio.sleep(0.2)
    started = time.monotonic()

    request_id = await queue.enqueue_task(request())

    got = await asyncio.wait_for(waiting, 2)
    assert got is not None
    assert got.request_id == request_id
    assert time.monotonic() - started < 1


async def test_corrupt_task_record_is_dead_lettered_not_crashed_on(
    queue: RedisQueue, manager: TaskManager
) -> None:
    await queue.store.enqueue([EnqueueItem("corrupt", "{not json", 0, 3, 0, rate_keys="")])
    good = await queue.enqueue_task(request())

    assert (await dequeue(queue)).request_id == good
    assert await manager.get_task_status("corrupt") is TaskStatus.FAILED
    (letter,) = await manager.list_dead_letters()
    assert letter["request_id"] == "corrupt"
    assert "invalid task record" in letter["error"]


# -- complete_task -----------------------------------------------------------------------


async def test_completed_task_has_its_response_and_status(
    queue: RedisQueue, manager: TaskManager
) -> None:
    request_id = await queue.enqueue_task(request())
    await dequeue(queue)

    assert await manager.complete_task(completed(request_id, {"title": "ok"})) is True

    assert await manager.get_task_status(request_id) is TaskStatus.COMPLETED
    response = await manager.get_response(request_id)
    assert response is not None
    assert (response.status, response.data, response.error) == (
        TaskStatus.COMPLETED,
        {"title": "ok"},
        None,
    )
    assert response.completed_at is not None


@contextlib.asynccontextmanager
async def taken_over(
    settings: Settings, queue: RedisQueue, request_id: str
) -> AsyncIterator[RedisQueue]:
    """``queue`` dequeues the task as "stalled", its lease expires, another process takes it."""
    await dequeue(queue, "stalled")
    await expire_lease(queue, request_id)
    async with RedisQueue(settings) as other:
        await dequeue(other, "fresh")
        yield other


async def test_late_completion_after_a_takeover_is_refused_and_the_task_completes_once(
    settings: Settings, queue: RedisQueue, manager: TaskManager
) -> None:
    request_id = await queue.enqueue_task(request())
    async with taken_over(settings, queue, request_id) as other:
        late = await manager.complete_task(completed(request_id, "late"))
        current = await TaskManager(other).complete_task(completed(request_id, "fresh"))

    assert (late, current) == (False, True)
    response = await manager.get_response(request_id)
    assert response is not None
    assert response.data == "fresh"
    assert (await manager.queue_stats())["completed"] == 1


async def test_failed_response_is_retried_then_dead_lettered(
    queue: RedisQueue, manager: TaskManager
) -> None:
    request_id = await queue.enqueue_task(request(max_retries=1))
    await dequeue(queue)
    assert await manager.complete_task(failed(request_id, "first")) is True
    assert await manager.get_task_status(request_id) is TaskStatus.RETRYING

    await dequeue(queue)
    assert await manager.complete_task(failed(request_id, "second")) is True

    assert await manager.get_task_status(request_id) is TaskStatus.FAILED
    response = await manager.get_response(request_id)
    assert response is not None
    assert response.error == "second"
    assert [d["request_id"] for d in await manager.list_dead_letters()] == [request_id]


async def test_oversized_result_fails_the_task_permanently_naming_the_limit(
    settings: Settings,
) -> None:
    small = derive(settings, tasks={"max_result_bytes": 100})
    async with RedisQueue(small) as queue:
        manager = TaskManager(queue)
        request_id = await queue.enqueue_task(request(max_retries=3))
        await dequeue(queue)

        assert await manager.complete_task(completed(request_id, "x" * 200)) is True

        assert await manager.get_task_status(request_id) is TaskStatus.FAILED
        response = await manager.get_response(request_id)
    assert response is not None
    assert response.error is not None
    assert "max_result_bytes" in response.error


async def test_non_json_result_is_rejected_naming_data(
    queue: RedisQueue, manager: TaskManager
) -> None:
    request_id = await queue.enqueue_task(request())
    await dequeue(queue)

    with pytest.raises(InvalidTaskException) as caught:
        await manager.complete_task(completed(request_id, {"x": float("inf")}))

    assert caught.value.field == "data"


async def test_report_for_a_task_that_is_not_running_is_refused(
    queue: RedisQueue, manager: TaskManager
) -> None:
    pending = await queue.enqueue_task(request())

    assert await manager.complete_task(completed(pending)) is False
    assert await manager.complete_task(completed("never-enqueued")) is False
    assert await manager.get_task_status(pending) is TaskStatus.PENDING


async def test_report_from_a_process_that_did_not_dequeue_the_task_is_refused(
    settings: Settings, queue: RedisQueue, manager: TaskManager
) -> None:
    request_id = await queue.enqueue_task(request())
    await dequeue(queue, "holder")
    async with RedisQueue(settings) as bystander:
        # No lease of its own to fence with: refused, whatever the status says.
        assert await TaskManager(bystander).complete_task(completed(request_id, "x")) is False
        assert await TaskManager(bystander).complete_task(cancelled(request_id)) is False

    assert await manager.get_task_status(request_id) is TaskStatus.RUNNING
    assert await manager.complete_task(completed(request_id, "mine")) is True


async def test_a_stale_workers_cancelled_report_does_not_cancel_the_new_holders_run(
    settings: Settings, queue: RedisQueue, manager: TaskManager
) -> None:
    request_id = await queue.enqueue_task(request())
    async with taken_over(settings, queue, request_id) as other:
        assert await manager.complete_task(cancelled(request_id)) is False
        assert await manager.get_task_status(request_id) is TaskStatus.RUNNING
        assert await TaskManager(other).complete_task(cancelled(request_id)) is True

    assert await manager.get_task_status(request_id) is TaskStatus.CANCELLED


async def test_leases_remembered_for_reports_are_bounded(
    queue: RedisQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queue_module, "MAX_LEASES", 3)
    ids = [await queue.enqueue_task(request()) for _ in range(5)]
    for _ in ids:
        await dequeue(queue)

    assert list(queue.leases) == ids[2:]  # the two oldest forgotten


# -- cancel_task ---------------------------------------------------------------------------


async def test_cancelled_running_task_refuses_its_workers_result(
    queue: RedisQueue, manager: TaskManager
) -> None:
    request_id = await queue.enqueue_task(request())
    await dequeue(queue)
    worker, attempt, _ = queue.leases[request_id]

    assert await queue.cancel_task(request_id) is True

    assert await queue.store.renew(worker, [(request_id, attempt)]) == [request_id]
    assert await manager.complete_task(completed(request_id)) is False
    assert await manager.get_task_status(request_id) is TaskStatus.CANCELLED
    assert await queue.cancel_task(request_id) is False


# -- dead-letter queue ----------------------------------------------------------------------


async def dead_letter(queue: RedisQueue, manager: TaskManager, error: str) -> str:
    request_id = await queue.enqueue_task(request(max_retries=0, parameters={"e": error}))
    await dequeue(queue)
    await manager.complete_task(failed(request_id, error))
    return request_id


async def test_dead_letters_are_listed_newest_first_with_error_history_and_request(
    queue: RedisQueue, manager: TaskManager
) -> None:
    ids = []
    for error in ("one", "two", "three"):
        ids.append(await dead_letter(queue, manager, error))
        await asyncio.sleep(0.002)  # distinct dead-letter times

    letters = await manager.list_dead_letters(limit=2)

    assert [letter["request_id"] for letter in letters] == ids[:0:-1]
    newest = letters[0]
    assert newest["error"] == "three"
    assert newest["status"] == "failed"
    assert newest["request"]["parameters"] == {"e": "three"}
    assert [(h["attempt"], h["error"]) for h in newest["history"]] == [(1, "three")]


async def test_dead_lettered_poison_task_lists_every_lost_attempt(
    queue: RedisQueue, manager: TaskManager
) -> None:
    request_id = await queue.enqueue_task(request(max_retries=1))
    for _ in range(2):
        await dequeue(queue)
        await expire_lease(queue, request_id)

    (letter,) = await manager.list_dead_letters()

    assert letter["request_id"] == request_id
    assert [h["attempt"] for h in letter.get("history", [])] == [1, 2]


async def test_requeued_dead_letter_runs_again_with_fresh_attempts_and_no_ttl(
    queue: RedisQueue, manager: TaskManager
) -> None:
    request_id = await dead_letter(queue, manager, "oops")

    assert await manager.requeue_dead_letter(request_id) is True
    assert await manager.requeue_dead_letter(request_id) is False

    assert await admin(queue).pttl(queue.keys.task(request_id)) == -1
    assert await manager.get_task_status(request_id) is TaskStatus.PENDING
    assert await manager.get_response(request_id) is None
    await dequeue(queue)
    assert queue.leases[request_id][1] == 1
    assert await manager.complete_task(completed(request_id, "second life")) is True


async def test_requeue_all_puts_every_dead_letter_back_in_the_queue(
    queue: RedisQueue, manager: TaskManager
) -> None:
    ids = [await dead_letter(queue, manager, error) for error in ("a", "b")]

    assert await manager.requeue_all_dead_letters() == 2

    assert await manager.list_dead_letters() == []
    assert [await manager.get_task_status(i) for i in ids] == [TaskStatus.PENDING] * 2


async def test_purge_deletes_every_dead_letter_and_its_record(
    queue: RedisQueue, manager: TaskManager
) -> None:
    ids = [await dead_letter(queue, manager, error) for error in ("a", "b")]

    assert await manager.purge_dead_letters() == 2

    assert await manager.list_dead_letters() == []
    assert [await manager.get_task_status(i) for i in ids] == [None, None]


async def test_cleanup_removes_dead_letters_older_than_result_ttl(settings: Settings) -> None:
    short = derive(settings, tasks={"result_ttl": 0.2})
    async with RedisQueue(short) as queue:
        manager = TaskManager(queue)
        await dead_letter(queue, manager, "old")
        await asyncio.sleep(0.3)

        assert await manager.cleanup_old_tasks() == 1

        assert await manager.list_dead_letters() == []
        assert await admin(queue).zcard(queue.keys.dead) == 0


# -- status and response lookups ----------------------------------------------------------


async def command_calls(queue: RedisQueue) -> dict[str, int]:
    stats = await admin(queue).info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


async def test_status_and_response_lookups_are_one_hget_at_any_depth(
    queue: RedisQueue, manager: TaskManager
) -> None:
    request_id = (await queue.enqueue_many([request() for _ in range(2000)]))[1234]

    before = await command_calls(queue)
    status = await manager.get_task_status(request_id)
    response = await manager.get_response(request_id)
    after = await command_calls(queue)

    used = {name: after[name] - before.get(name, 0) for name in after}
    assert {name: n for name, n in used.items() if n and name != "info"} == {"hget": 2}
    assert (status, response) == (TaskStatus.PENDING, None)


async def test_unknown_task_has_no_status_response_or_record(manager: TaskManager) -> None:
    assert await manager.get_task_status("unknown") is None
    assert await manager.get_response("unknown") is None
    assert await manager.get_task("unknown") is None


async def test_task_record_is_decoded_for_operators(
    queue: RedisQueue, manager: TaskManager
) -> None:
    request_id = await queue.enqueue_task(request(parameters={"k": "v"}))

    record = await manager.get_task(request_id)

    assert record is not None
    assert (record["status"], record["attempt"], record["max_retries"]) == ("pending", 0, 3)
    assert record["request"]["parameters"] == {"k": "v"}


async def test_queue_stats_count_each_state(queue: RedisQueue, manager: TaskManager) -> None:
    ids = await queue.enqueue_many([request(max_retries=0) for _ in range(4)])
    await dequeue(queue)
    await manager.complete_task(completed(ids[0]))
    await dequeue(queue)
    await manager.complete_task(failed(ids[1]))
    await dequeue(queue)
    await queue.cancel_task(ids[3])

    stats = await manager.queue_stats()

    expected = {
        "pending": 0,
        "running": 1,
        "retrying": 0,
        "completed": 1,
        "failed": 1,
        "dead_letter": 1,
        "cancelled": 1,
        "enqueued": 4,
    }
    assert {name: stats[name] for name in expected} == expected


# -- WorkerMonitor ----------------------------------------------------------------------------


async def test_registered_worker_is_listed_active_with_its_counters(queue: RedisQueue) -> None:
    monitor = WorkerMonitor(queue)
    await monitor.register_worker("w1", pid=123, host="box")
    await monitor.increment_task_counter("w1")
    await monitor.increment_task_counter("w1", 2)
    await monitor.update_heartbeat("w1")

    (worker,) = await monitor.get_active_workers()

    assert worker["worker_id"] == "w1"
    assert worker["status"] == "active"
    assert (worker["tasks_processed"], worker["pid"], worker["host"]) == (3, 123, "box")
    assert abs(worker["last_heartbeat"] - time.time()) < 5


async def test_worker_is_shown_inactive_once_its_heartbeat_is_overdue(queue: RedisQueue) -> None:
    monitor = WorkerMonitor(queue)
    await monitor.register_worker("w1")

    async def inactive() -> bool:
        (worker,) = await monitor.get_active_workers()
        return bool(worker["status"] == "inactive")

    assert not await inactive()
    await wait_for(inactive, timeout=3)  # heartbeat.timeout is 1 s in the fixture
    await monitor.update_heartbeat("w1")
    assert not await inactive()


async def test_lost_worker_is_announced_once_even_with_two_monitors(
    settings: Settings, queue: RedisQueue
) -> None:
    monitor = WorkerMonitor(queue)
    await monitor.register_worker("silent")
    seconds, _ = await admin(queue).time()
    await admin(queue).zadd(queue.keys.workers, {"silent": (int(seconds) - 5) * 1000})
    async with RedisQueue(settings) as other, event_log(queue) as events:
        first, second = await asyncio.gather(
            monitor.cleanup_inactive_workers(), WorkerMonitor(other).cleanup_inactive_workers()
        )
        await asyncio.sleep(0.2)  # let any duplicate arrive

    assert (first, second) == (0, 0)
    lost = [event for event in events if event["event"] == "worker.lost"]
    assert [event["worker_id"] for event in lost] == ["silent"]


async def test_cleanup_forgets_workers_gone_for_long(queue: RedisQueue) -> None:
    monitor = WorkerMonitor(queue)
    await monitor.register_worker("gone")
    await monitor.register_worker("here")
    await admin(queue).zadd(queue.keys.workers, {"gone": 1})

    assert await monitor.cleanup_inactive_workers() == 1

    assert [w["worker_id"] for w in await monitor.get_active_workers()] == ["here"]


# -- events ---------------------------------------------------------------------------------


async def publish_calls(queue: RedisQueue) -> int:
    """PUBLISH commands Redis ran since the last CONFIG RESETSTAT (inside scripts too)."""
    stats: dict[str, Any] = await admin(queue).info("commandstats")
    return int(stats.get("cmdstat_publish", {}).get("calls", 0))


async def claim_and_complete(queue: RedisQueue, tasks: int) -> list[str]:
    """Enqueue ``tasks``, claim them in one call and complete them in one call."""
    ids = await queue.enqueue_many([request() for _ in range(tasks)])
    claim = await queue.store.claim("w1", tasks)
    assert len(claim.leases) == tasks
    results = [Completion(lease.request_id, lease.attempt, "null", 0.1) for lease in claim.leases]
    assert await queue.store.complete("w1", results) == [True] * tasks
    return ids


async def test_batches_publish_all_their_events_to_a_listener(queue: RedisQueue) -> None:
    async with event_log(queue) as events:
        ids = await claim_and_complete(queue, 5)
        await wait_for(lambda: count(events, "task.completed") == 5, timeout=5)
    for name in ("task.enqueued", "task.started", "task.completed"):
        assert sorted(e["request_id"] for e in events if e["event"] == name) == sorted(ids), name


async def test_batches_skip_their_events_when_nobody_listens(queue: RedisQueue) -> None:
    assert await admin(queue).pubsub_numpat() == 0, "a pattern subscriber is left over"
    await admin(queue).config_resetstat()
    await claim_and_complete(queue, 5)
    # enqueue: its first event and the wake signal; claim: its first event;
    # complete: its first event and each task's response channel (waiters).
    assert await publish_calls(queue) == 2 + 1 + (1 + 5)


async def test_a_pattern_subscriber_hears_every_event_of_a_batch(queue: RedisQueue) -> None:
    pubsub = admin(queue).pubsub()
    try:
        await pubsub.psubscribe(queue.keys.events[:-1] + "*")
        assert await pubsub.get_message(timeout=5) is not None  # the confirmation
        ids = await queue.enqueue_many([request() for _ in range(5)])
        heard = []
        while len(heard) < 5:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
            assert message is not None, f"heard only {heard}"
            heard.append(json.loads(message["data"])["request_id"])
        # Confirmed before closing: a pattern left behind would count for
        # every later test (PUBSUB NUMPAT is server-wide).
        await pubsub.punsubscribe()
        assert await pubsub.get_message(timeout=5) is not None
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
    assert sorted(heard) == sorted(ids)


async def test_every_lifecycle_step_is_published_as_an_event(
    queue: RedisQueue, manager: TaskManager
) -> None:
    async with event_log(queue) as events:
        done = await queue.enqueue_task(request())
        await dequeue(queue)
        await manager.complete_task(completed(done))

        dead = await queue.enqueue_task(request(max_retries=1))
        await dequeue(queue)
        await manager.complete_task(failed(dead))
        await dequeue(queue)
        await manager.complete_task(failed(dead))

        cancelled = await queue.enqueue_task(request())
        await queue.cancel_task(cancelled)

        lost = await queue.enqueue_task(request())
        await dequeue(queue)
        await expire_lease(queue, lost)

        await wait_for(lambda: len(events) >= 13, timeout=5)

    def names(request_id: str) -> list[str]:
        return [e["event"] for e in events if e.get("request_id") == request_id]

    assert names(done) == ["task.enqueued", "task.started", "task.completed"]
    assert names(dead) == [
        "task.enqueued",
        "task.started",
        "task.retrying",
        "task.started",
        "task.failed",
    ]
    assert names(cancelled) == ["task.enqueued", "task.cancelled"]
    assert names(lost) == ["task.enqueued", "task.started", "task.requeued"]
    now = time.time()
    for event in events:
        assert {"event", "ts", "request_id"} <= event.keys(), event
        assert abs(event["ts"] - now) < 30


# -- Redis unreachable or full --------------------------------------------------------------


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, so stopping it leaves the session server alone."""
    server = RedisServer(tmp_path / "own", appendonly=False)
    server.start()
    yield server
    server.stop()


def settings_for(url: str, settings: Settings) -> Settings:
    return derive(settings, redis={"url": url})


async def test_connect_to_a_closed_port_raises_queue_connection_exception(
    settings: Settings,
) -> None:
    closed = settings_for(f"redis://127.0.0.1:{free_port()}/0", settings)

    with pytest.raises(QueueConnectionException):
        await RedisQueue(closed).connect()


async def test_calls_after_redis_went_away_raise_queue_connection_exception(
    settings: Settings, own_server: RedisServer
) -> None:
    async with RedisQueue(settings_for(own_server.url, settings)) as queue:
        request_id = await queue.enqueue_task(request())
        own_server.stop()

        with pytest.raises(QueueConnectionException):
            await queue.enqueue_task(request())
        with pytest.raises(QueueConnectionException):
            await TaskManager(queue).get_task_status(request_id)


@pytest.fixture
def full_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(
        tmp_path / "full",
        appendonly=False,
        extra={"maxmemory": "1mb", "maxmemory-policy": "noeviction"},
    )
    server.start()
    yield server
    server.stop()


async def fill_until_refused(queue: RedisQueue) -> tuple[int, str, Exception]:
    """Enqueue 20 KB tasks until Redis refuses one; returns (stored, refused id, error)."""
    for stored in range(200):
        refused = request(parameters={"blob": "x" * 20_000})
        try:
            await queue.enqueue_task(refused)
        except (BackpressureException, ResponseError) as exc:
            return stored, refused.request_id, exc
    raise AssertionError("1 MB Redis accepted 4 MB of tasks")


async def test_redis_at_maxmemory_is_reported_as_backpressure(
    settings: Settings, full_server: RedisServer
) -> None:
    async with RedisQueue(settings_for(full_server.url, settings)) as queue:
        _, _, error = await fill_until_refused(queue)

    assert isinstance(error, BackpressureException)
    assert error.retry_after > 0


async def test_enqueue_refused_at_maxmemory_leaves_no_half_written_task(
    settings: Settings, full_server: RedisServer
) -> None:
    async with RedisQueue(settings_for(full_server.url, settings)) as queue:
        stored, refused, _ = await fill_until_refused(queue)

        records = [key async for key in admin(queue).scan_iter(match=queue.keys.task("*"))]
        assert not await admin(queue).exists(queue.keys.task(refused))
        assert await admin(queue).zscore(queue.keys.pending, refused) is None
        assert len(records) == await admin(queue).zcard(queue.keys.pending) == stored
        assert int(await admin(queue).hget(queue.keys.stats, "enqueued") or 0) == stored
