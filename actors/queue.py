"""The public queue API: ``RedisQueue``, ``TaskManager`` and ``WorkerMonitor``.

Gateway side: ``enqueue_task`` / ``enqueue_many``, ``wait_for_response``,
``cancel_task``. Worker side: ``dequeue_task`` and
``TaskManager.complete_task``. Every state change runs in one Lua script
(``actors/store.py``); these classes validate input and translate results.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from actors import redis_errors
from actors.calls import Calls
from actors.connection import open_calls, translated_errors
from actors.exceptions import (
    BackpressureException,
    InvalidTaskException,
    PartitionLayoutMismatch,
    QueueConnectionException,
    RedisRightsMissing,
    TaskTimeoutException,
)
from actors.keys import KeySpace
from actors.models import (
    DEFAULT_MAX_RETRIES,
    ResultTooLarge,
    ScrapingRequest,
    ScrapingResponse,
    TaskStatus,
    stored_result,
)
from actors.partitions import partition_keys, place
from actors.ratelimits import rate_keys
from actors.rights import PRODUCER_PROBED
from actors.store import Completion, EnqueueItem, FailOutcome, Lease, TaskStore
from actors.waiters import ResponseHub
from actors.wakeup import Wakeup
from config.settings import Settings

logger = logging.getLogger(__name__)

#: Tasks per enqueue script call in ``enqueue_many``; each chunk is all or nothing.
ENQUEUE_CHUNK = 500
#: Leases ``dequeue_task`` remembers for ``complete_task`` at most.
MAX_LEASES = 10_000
#: Chunks of one ``enqueue_many`` in flight at once (sent while Redis runs the previous).
ENQUEUE_WINDOW = 4


class RedisQueue:
    """A connection to one queue in Redis: its ``[redis] partitions`` key spaces.

    ``keys`` and ``store`` are partition 0's, the home of what is the queue's
    (workers, locks, metrics); ``partitions`` and ``stores`` are all of them,
    in order. With one partition the two are the same.
    """

    def __init__(
        self,
        settings: Settings,
        queue: str = "default",
        *,
        rights: Sequence[str] = PRODUCER_PROBED,
        adopt_layout: bool = False,
    ) -> None:
        """``rights``: the commands (actors/rights.py) ``connect`` checks the Redis user
        may run; a Gateway's by default, ``supervisor start`` asks for a worker host's.
        ``adopt_layout``: ``connect`` lays the queue out over ``[redis] partitions``
        (``supervisor start``) instead of refusing another count."""
        self.settings = settings
        self._rights = rights
        self._adopt_layout = adopt_layout
        self.queue_name = queue
        self.partitions = partition_keys(
            settings.redis.key_prefix, queue, settings.redis.partitions
        )
        self.keys: KeySpace = self.partitions[0]
        self._connection: Calls | None = None
        self._durable: Calls | None = None  # [redis] durable_enqueue > 0
        self._stores: list[TaskStore] = []
        self._next_partition = 0  # where dequeue_task's next claim starts
        self._hub: ResponseHub | None = None
        self._wakeup: Wakeup | None = None
        # Leases this instance handed out through dequeue_task: request id ->
        # (worker id, attempt, partition); the attempt is the fencing token
        # complete_task reports with. Bounded: the oldest of a caller that never
        # reports are forgotten (their report is refused; the lease expires and
        # the task reruns).
        self.leases: OrderedDict[str, tuple[str, int, int]] = OrderedDict()

    async def connect(self) -> None:
        if self._connection is not None:
            return
        connection = open_calls(self.settings)
        # Durable writes WAIT for replicas on a connection of their own (TaskStore).
        durable = open_calls(self.settings) if self.settings.redis.durable_enqueue else None
        stores = [
            TaskStore(connection, keys, self.settings, durable, index)
            for index, keys in enumerate(self.partitions)
        ]
        store = stores[0]
        try:
            with translated_errors():
                await connection.execute("PING")
            # An ACL user without a right the API needs is refused now, by name,
            # not on some later call (and not half-way through a script).
            missing = await store.missing_rights(self._rights)
            if missing:
                raise RedisRightsMissing(missing)
            await self._settle_layout(connection)
        except BaseException:
            await connection.close()
            if durable is not None:
                await durable.close()
            raise
        self._connection = connection
        self._durable = durable
        self._stores = stores
        self._hub = ResponseHub(self.settings, self.keys, self.read_responses)

    async def _settle_layout(self, connection: Calls) -> None:
        """Refuse a partition count other than the queue's in Redis, or (``adopt_layout``)
        make it the queue's when the partitions it drops hold no task.

        Raises ``PartitionLayoutMismatch``.
        """
        configured = len(self.partitions)
        with translated_errors():
            raw = await connection.execute("HGET", self.keys.layout, "partitions")
        stored = int(raw) if raw is not None and raw.isdigit() and int(raw) >= 1 else 1
        if stored == configured:
            return
        if not self._adopt_layout:
            raise PartitionLayoutMismatch(configured, stored)
        kept = {keys.base for keys in self.partitions}
        dropped = [
            keys
            for keys in partition_keys(self.settings.redis.key_prefix, self.queue_name, stored)
            if keys.base not in kept
        ]
        commands: list[tuple[str, ...]] = []
        for keys in dropped:
            commands += [("ZCARD", key) for key in (keys.pending, keys.running, keys.delayed)]
            commands += [("ZCARD", keys.dead), ("HGET", keys.stats, "gated")]  # gated: in a gate
        with translated_errors():
            replies = await connection.execute_many(*commands)
            stranded = sum(r if isinstance(r, int) else count_of(r) for r in replies)
            if stranded:
                raise PartitionLayoutMismatch(configured, stored, stranded)
            if configured == 1:
                await connection.execute("DEL", self.keys.layout)  # today's layout: no key
            else:
                await connection.execute("HSET", self.keys.layout, "partitions", configured)
        logger.info("대기열 배치를 파티션 %d개에서 %d개로 정함", stored, configured)

    async def close(self) -> None:
        if self._hub is not None:
            await self._hub.close()
        if self._wakeup is not None:
            await self._wakeup.close()
        if self._connection is not None:
            await self._connection.close()
        if self._durable is not None:
            await self._durable.close()
        self._connection = self._durable = None
        self._hub = self._wakeup = None
        self._stores = []

    async def publish_settings(self, settings: Settings) -> None:
        """Publish the limits (``TaskStore.set_limits``) and the history's bounds
        (``keep_history``) in every partition: each partition's scripts read their own."""
        for store in self.stores:
            await store.set_limits(settings, share=len(self.stores))
            await store.keep_history(settings.events, share=len(self.stores))

    async def ping(self) -> None:
        """One round trip to Redis; raises QueueConnectionException if it is away."""
        with translated_errors():
            await self.connection.execute("PING")

    async def __aenter__(self) -> RedisQueue:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connection(self) -> Calls:
        """The connection every call of this queue shares (scripts, reads; many at once)."""
        if self._connection is None:
            raise QueueConnectionException("RedisQueue is not connected: call connect() first")
        return self._connection

    @property
    def store(self) -> TaskStore:
        """Partition 0's store: the home of the workers, the locks and the metrics."""
        return self.stores[0]

    @property
    def stores(self) -> list[TaskStore]:
        """One store per partition, in partition order."""
        if not self._stores:
            raise QueueConnectionException("RedisQueue is not connected: call connect() first")
        return self._stores

    def store_for(self, item: EnqueueItem) -> TaskStore:
        """The store of the partition a task is placed in (``actors/partitions.py``)."""
        stores = self.stores
        return stores[place(item.rate_keys, item.request_id, len(stores))]

    # -- Gateway side ---------------------------------------------------------

    def prepare(self, request: ScrapingRequest) -> EnqueueItem:
        """Apply the configured defaults and check the size limit."""
        tasks = self.settings.tasks
        defaults: dict[str, Any] = {}
        given = request.model_fields_set
        if "timeout" not in given and request.timeout != tasks.default_timeout:
            defaults["timeout"] = tasks.default_timeout
        if "max_retries" not in given and request.max_retries != tasks.max_retries:
            defaults["max_retries"] = tasks.max_retries
        if defaults:
            request = request.model_copy(update=defaults)
        payload = request.stored_json()
        size = len(payload.encode())
        if size > tasks.max_payload_bytes:
            raise InvalidTaskException(
                "parameters",
                f"request is {size} bytes, over max_payload_bytes={tasks.max_payload_bytes}",
            )
        expires_ms = int(request.expires_in * 1000) if request.expires_in else 0
        return EnqueueItem(
            request.request_id,
            payload,
            request.priority,
            request.max_retries,
            expires_ms,
            rate_keys(request),
        )

    async def enqueue_task(self, request: ScrapingRequest) -> str:
        """Store one task; returns its request id.

        Enqueuing the very same request twice is harmless (idempotent); a
        different request with a used id raises ``DuplicateTaskException``.
        """
        item = self.prepare(request)
        await self.store_for(item).enqueue([item])
        return request.request_id

    async def enqueue_many(self, requests: Sequence[ScrapingRequest]) -> list[str]:
        """Store many tasks in chunks of ``ENQUEUE_CHUNK``, each chunk all or nothing.

        Every request is validated before anything is written. A chunk holds
        tasks of one partition. Up to ``ENQUEUE_WINDOW`` chunks are in flight
        at once, so Redis runs one while the next is sent. If one fails
        (backpressure, a duplicate id), others may be stored: enqueueing the
        same requests again is safe, since an id already holding the same
        request is a no-op.
        """
        items = [self.prepare(request) for request in requests]
        window = asyncio.Semaphore(ENQUEUE_WINDOW)

        async def send(store: TaskStore, chunk: Sequence[EnqueueItem]) -> None:
            async with window:
                await store.enqueue(chunk)

        by_partition: dict[int, list[EnqueueItem]] = {}
        for item in items:
            by_partition.setdefault(self.store_for(item).partition, []).append(item)
        await asyncio.gather(
            *(
                send(self.stores[index], part[i : i + ENQUEUE_CHUNK])
                for index, part in by_partition.items()
                for i in range(0, len(part), ENQUEUE_CHUNK)
            )
        )
        return [item.request_id for item in items]

    async def read_response(self, request_id: str) -> bytes | None:
        """The stored response JSON of a finished task, else None."""
        (response,) = await self.read_responses([request_id])
        return response

    async def read_responses(self, request_ids: Sequence[str]) -> list[bytes | None]:
        """The stored responses of many tasks, pipelined on the multiplexed connection.

        A partitioned queue asks every partition for each id (the id alone
        does not say where its domain placed it): still O(1) in the tasks.
        """
        connection, partitions = self.connection, self.partitions
        with translated_errors():
            responses = await asyncio.gather(
                *(
                    connection.execute("HGET", keys.task(rid), "response")
                    for rid in request_ids
                    for keys in partitions
                )
            )
        n = len(partitions)
        return [
            next((r for r in responses[i * n : (i + 1) * n] if r is not None), None)
            for i in range(len(request_ids))
        ]

    async def locate(self, request_id: str) -> int | None:
        """The partition holding the task's record, or None when none does."""
        if len(self.partitions) == 1:
            return 0
        with translated_errors():
            found = await self.connection.execute_many(
                *(("EXISTS", keys.task(request_id)) for keys in self.partitions)
            )
        return next((index for index, exists in enumerate(found) if exists), None)

    async def wait_for_response(self, request_id: str, timeout: float) -> ScrapingResponse:
        """Wait (push-based) for the task's final response.

        Raises ``TaskTimeoutException`` if it does not finish within ``timeout``.
        """
        if self._hub is None:
            raise QueueConnectionException("RedisQueue is not connected: call connect() first")
        raw = await self._hub.wait(request_id, timeout)
        if raw is None:
            raise TaskTimeoutException(request_id, timeout)
        return ScrapingResponse.model_validate_json(raw)

    async def cancel_task(self, request_id: str) -> bool:
        """Cancel a pending, retrying or running task; False if it already finished."""
        index = await self.locate(request_id)
        return index is not None and await self.stores[index].cancel(request_id)

    # -- Worker side ----------------------------------------------------------

    async def dequeue_task(self, worker_id: str, timeout: float = 5.0) -> ScrapingRequest | None:
        """Lease the next task to ``worker_id``, waiting up to ``timeout`` for one.

        A partitioned queue is asked partition by partition, starting one
        further each call, so that no partition starves.
        """
        deadline = time.monotonic() + timeout
        stores = self.stores
        while True:
            wait_ms = -1
            for turn in range(len(stores)):
                store = stores[(self._next_partition + turn) % len(stores)]
                claim = await store.claim(worker_id, 1)
                for lease in claim.leases:
                    self._next_partition = store.partition + 1
                    request = await self.decode_lease(worker_id, lease)
                    if request is not None:
                        self._remember(
                            request.request_id, (worker_id, lease.attempt, store.partition)
                        )
                        return request
                if claim.wait_ms >= 0:
                    wait_ms = claim.wait_ms if wait_ms < 0 else min(wait_ms, claim.wait_ms)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            if wait_ms >= 0:
                remaining = min(remaining, wait_ms / 1000)
            if self._wakeup is None:
                self._wakeup = Wakeup(self.settings, [keys.wake for keys in self.partitions])
            await self._wakeup.wait(remaining)

    def _remember(self, request_id: str, lease: tuple[str, int, int]) -> None:
        self.leases[request_id] = lease
        if len(self.leases) > MAX_LEASES:
            forgotten, _ = self.leases.popitem(last=False)
            logger.warning(
                "보고되지 않은 임대가 %d개를 넘어 가장 오래된 작업 %s 의 임대를 잊음",
                MAX_LEASES,
                forgotten,
            )

    async def decode_lease(self, worker_id: str, lease: Lease) -> ScrapingRequest | None:
        """The request of a lease; a corrupt record is dead-lettered, not crashed on."""
        try:
            return ScrapingRequest.from_stored(lease.request_json, lease.request_id)
        except (InvalidTaskException, ValueError) as exc:
            logger.error("작업 %s 의 저장된 요청이 손상됨, 격리함: %s", lease.request_id, exc)
            await self.stores[lease.partition].fail(
                worker_id,
                lease.request_id,
                lease.attempt,
                f"invalid task record: {exc}",
                permanent=True,
            )
            return None


class TaskManager:
    """Outcomes, status, retention and the dead-letter queue."""

    def __init__(self, redis_queue: RedisQueue) -> None:
        self.queue = redis_queue

    async def complete_task(self, response: ScrapingResponse) -> bool:
        """Record a task's outcome; returns False if the report was refused.

        A ``failed`` response is retried with backoff until ``max_retries``,
        then dead-lettered; a ``cancelled`` one cancels the task. Every report
        is fenced by the lease this process got from ``dequeue_task``: a
        report for a lease taken over since (the task was redelivered after
        this worker stalled), or for a task this process never dequeued, is
        refused and logged. Raises ``InvalidTaskException`` (field ``data``)
        for a result that is not JSON; one over ``max_result_bytes`` fails the
        task for good. A completion that raises ``QueueConnectionException``
        (``NotReplicatedException`` included) may be reported again.
        """
        queue = self.queue
        lease = queue.leases.pop(response.request_id, None)
        if lease is None:
            logger.warning(
                "작업 %s 의 결과를 거부함: 이 프로세스가 임대한 작업이 아님 "
                "(dequeue_task로 받은 작업만 보고할 수 있음)",
                response.request_id,
            )
            return False
        worker_id, attempt, partition = lease
        store = queue.stores[partition]
        if response.status is TaskStatus.COMPLETED:
            limit = queue.settings.tasks.max_result_bytes
            try:
                data_json = stored_result(response.data, limit)
            except ResultTooLarge as exc:
                return await self._fail(store, (worker_id, response.request_id, attempt), str(exc))
            completion = Completion(
                response.request_id, attempt, data_json, response.execution_time or 0.0
            )
            try:
                (accepted,) = await store.complete(worker_id, [completion])
            except QueueConnectionException:
                # Not recorded, or not replicated (durable_enqueue): the lease stays
                # this process's, so the caller can report again (it is fenced).
                queue.leases[response.request_id] = lease
                raise
            if not accepted:
                logger.warning(
                    "작업 %s 시도 %d 의 임대가 만료되어 완료 보고를 거부함",
                    response.request_id,
                    attempt,
                )
            return accepted
        if response.status is TaskStatus.CANCELLED:
            return await store.cancel(response.request_id, lease=(worker_id, attempt))
        error = response.error or f"task reported status {response.status}"
        return await self._fail(
            store, (worker_id, response.request_id, attempt), error, permanent=False
        )

    @staticmethod
    async def _fail(
        store: TaskStore,
        lease: tuple[str, str, int],
        error: str,
        *,
        permanent: bool = True,
    ) -> bool:
        """Report a failed attempt of ``lease`` (worker id, request id, attempt)."""
        worker_id, request_id, attempt = lease
        outcome, _ = await store.fail(worker_id, request_id, attempt, error, permanent=permanent)
        return outcome is not FailOutcome.REFUSED

    async def get_task_status(self, request_id: str) -> TaskStatus | None:
        """The task's status in O(1) (one probe per partition), or None if it does not exist."""
        with translated_errors():
            found = await self.queue.connection.execute_many(
                *(("HGET", keys.task(request_id), "status") for keys in self.queue.partitions)
            )
        status = next((raw for raw in found if raw is not None), None)
        return None if status is None else TaskStatus(status.decode())

    async def get_response(self, request_id: str) -> ScrapingResponse | None:
        """The final response of a finished task, else None."""
        raw = await self.queue.read_response(request_id)
        return None if raw is None else ScrapingResponse.model_validate_json(raw)

    async def get_task(self, request_id: str) -> dict[str, Any] | None:
        """Everything stored about one task (for operators), or None."""
        with translated_errors():
            found = await self.queue.connection.execute_many(
                *(("HGETALL", keys.task(request_id)) for keys in self.queue.partitions)
            )
        record = as_dict(next((raw for raw in found if raw), []))
        return decode_record(record) if record else None

    async def cleanup_old_tasks(self) -> int:
        """Drop dead letters older than ``result_ttl``; returns how many.

        Completed, failed and cancelled records expire on their own after
        ``result_ttl`` (a Redis TTL set when they finish).
        """
        removed = 0
        for store in self.queue.stores:
            removed += (await store.cleanup())[0]
        return removed

    async def list_dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest dead letters (of all partitions): request, last error, attempt history."""
        partitions = self.queue.partitions
        connection = self.queue.connection
        with translated_errors():
            per_partition = await connection.execute_many(
                *(
                    ("ZRANGE", keys.dead, 0, max(0, limit - 1), "REV", "WITHSCORES")
                    for keys in partitions
                )
            )
            newest = sorted(
                (
                    (float(score), rid.decode(), keys)
                    for keys, reply in zip(partitions, per_partition, strict=True)
                    for rid, score in zip(reply[::2], reply[1::2], strict=True)
                ),
                key=lambda found: -found[0],
            )[:limit]
            records = await connection.execute_many(
                *(("HGETALL", keys.task(rid)) for _, rid, keys in newest)
            )
        return [
            decode_record(as_dict(record)) | {"request_id": rid}
            for (_, rid, _), record in zip(newest, records, strict=True)
            if record
        ]

    async def requeue_dead_letter(self, request_id: str) -> bool:
        """Give a dead letter a fresh set of attempts; False if it is not one.

        Raises ``BackpressureException`` when the queue is at its high watermark.
        """
        index = await self.queue.locate(request_id)
        if index is None:
            return False
        requeued, full, _ = await self.queue.stores[index].dlq_requeue([request_id])
        if full:
            raise BackpressureException(1.0, "the queue is at its high watermark")
        return requeued == 1

    async def requeue_all_dead_letters(self) -> int:
        """Requeue every dead letter, a batch per script call; returns how many.

        Like enqueues, requeues stop at the high watermark: then
        ``BackpressureException`` says how many were requeued, and the rest
        stay dead letters for a later retry.
        """
        total = 0
        for store in self.queue.stores:
            while True:
                requeued, full, taken = await store.dlq_requeue(None)
                total += requeued
                if full:
                    raise BackpressureException(
                        1.0,
                        f"the queue is at its high watermark after {total} dead letters requeued",
                    )
                if taken == 0:
                    break
        return total

    async def purge_dead_letters(self) -> int:
        return sum([await store.dlq_purge() for store in self.queue.stores])

    async def paused_keys(self) -> dict[str, float]:
        """Rate keys paused now (HTTP 429 or circuit breaker): key -> seconds left."""
        with translated_errors():
            time, *fields = await self.queue.connection.execute_many(
                ("TIME",), *(("HGETALL", keys.paused) for keys in self.queue.partitions)
            )
        now_ms = time_ms(time)
        return {
            key.decode(): (until - now_ms) / 1000
            for paused in fields
            for key, until in numbers(as_dict(paused)).items()
            if until > now_ms
        }

    async def domains(self) -> list[dict[str, Any]]:
        """Per domain seen recently: its politeness and rate-limit state, busiest first.

        Each: ``domain``, ``in_flight`` (tasks running now, all hosts),
        ``limit`` (configured tasks/s or None), ``rate`` (in force: learned or
        configured, None = unlimited), ``learned`` (or None), ``window`` (slow
        start; None once unknown), ``throttled_last_minute`` (429/503 answers)
        and ``paused_for`` (seconds, 0 = not paused). A domain's state lives in
        one partition (its tasks' placement), so the partitions' lists add up.
        """
        found: list[dict[str, Any]] = []
        for keys in self.queue.partitions:
            found += await self._domains_of(keys)
        found.sort(
            key=lambda d: (-int(d["in_flight"]), -int(d["throttled_last_minute"]), d["domain"])
        )
        return found

    async def _domains_of(self, keys: KeySpace) -> list[dict[str, Any]]:
        """``domains`` of one partition, unsorted."""
        connection = self.queue.connection
        with translated_errors():
            time, kind, limits, paused, policy = await connection.execute_many(
                ("TIME",),
                ("TYPE", keys.domains),
                ("HGETALL", keys.limits),
                ("HGETALL", keys.paused),
                ("HGETALL", keys.politeness),
            )
            # An index damaged from outside (not a zset) shows no domains.
            names = (
                await connection.execute("ZRANGE", keys.domains, 0, -1) if _is_zset(kind) else []
            )
            fields = FIELDS_OF_DOMAIN
            replies = await asyncio.gather(
                *(connection.execute("HMGET", keys.domain(n.decode()), *fields) for n in names),
                return_exceptions=True,
            )
            # A domain's hash of another type (written from outside) shows as empty.
            states: list[Any] = []
            for reply in replies:
                if isinstance(reply, redis_errors.ResponseError):
                    states.append([None] * len(fields))
                elif isinstance(reply, BaseException):
                    raise reply
                else:
                    states.append(reply)
        now_ms = time_ms(time)
        configured = {
            k.decode(): rate
            for k, v in as_dict(limits).items()
            if (rate := _number(v.decode())) is not None and rate > 0
        }
        pauses = numbers(as_dict(paused))
        adaptive = as_dict(policy).get(b"adaptive") == b"1"
        found: list[dict[str, Any]] = []
        for name, values in zip(names, states, strict=True):
            key = name.decode()
            state = {f: v.decode() for f, v in zip(fields, values, strict=True) if v is not None}
            limit = configured.get(key, configured.get("default_domain"))
            learned = _number(state.get("r")) if adaptive else None
            rate = min(r for r in (limit, learned) if r is not None) if limit or learned else None
            recent = [_number(at) or 0 for at in state.get("x", "").split()]
            found.append(
                {
                    "domain": key.removeprefix("domain:"),
                    "in_flight": _running(state.get("n")),
                    "limit": limit,
                    "rate": rate,
                    "learned": learned,
                    "window": _number(state.get("w")),
                    "throttled_last_minute": sum(1 for at in recent if at > now_ms - 60_000),
                    "paused_for": max(0.0, (pauses.get(name, 0) - now_ms) / 1000),
                }
            )
        return found

    async def queue_stats(self) -> dict[str, int]:
        """Counts per state (of all partitions): current depths and monotonic totals."""
        return total_stats(await self.partition_stats())

    async def partition_stats(self) -> list[dict[str, int]]:
        """``queue_stats`` of each partition, in partition order (one read of them all)."""
        commands: list[tuple[str, str]] = []
        for keys in self.queue.partitions:
            commands += [
                ("ZCARD", key) for key in (keys.pending, keys.running, keys.delayed, keys.dead)
            ]
            commands.append(("HGETALL", keys.stats))
        with translated_errors():
            replies = await self.queue.connection.execute_many(*commands)
        found = []
        for at in range(0, len(replies), 5):
            pending, running, retrying, dead, totals = replies[at : at + 5]
            counters = {k.decode(): v for k, v in numbers(as_dict(totals)).items()}
            gated = counters.get("gated", 0)
            found.append(
                {
                    "pending": pending + gated,
                    "running": running,
                    "retrying": retrying,
                    "completed": counters.get("completed", 0),
                    "failed": counters.get("failed", 0),
                    "dead_letter": dead,
                    "cancelled": counters.get("cancelled", 0),
                    "enqueued": counters.get("enqueued", 0),
                    "gated": gated,  # pending, but waiting for a rate-limited key
                    "repaired": counters.get("repaired", 0),  # in no set, found by the sweep
                }
            )
        return found

    async def throttled(self, reasons: Sequence[str]) -> dict[str, int]:
        """429/503 answers scripts reported, by reason (``RateLimited.reason``), ever."""
        fields = [f"throttled:{reason}" for reason in reasons]
        with translated_errors():
            replies = await self.queue.connection.execute_many(
                *(("HMGET", keys.stats, *fields) for keys in self.queue.partitions)
            )
        return {
            reason: sum(count_of(counts[i]) for counts in replies)
            for i, reason in enumerate(reasons)
        }

    async def backpressure_fields(self) -> dict[bytes, bytes]:
        """The governor's published state (``state``, ``depth``, ``rate``, ...), as stored."""
        with translated_errors():
            return as_dict(
                await self.queue.connection.execute("HGETALL", self.queue.keys.backpressure)
            )


#: The counts of ``TaskManager.queue_stats``, in the order it gives them.
STAT_NAMES = (
    "pending",
    "running",
    "retrying",
    "completed",
    "failed",
    "dead_letter",
    "cancelled",
    "enqueued",
    "gated",
    "repaired",
)


def total_stats(per_partition: Sequence[dict[str, int]]) -> dict[str, int]:
    """The queue's ``queue_stats`` from its partitions' (``partition_stats``)."""
    return {name: sum(counts[name] for counts in per_partition) for name in STAT_NAMES}


#: The mark a domain's ``n`` carries once its slow-start window reached the cap (lua/_lib.lua).
SETTLED = 1_000_000_000


def _running(n: str | None) -> int:
    """The tasks of a domain running now, from its stored ``n`` (lua/_lib.lua, ``running_of``):
    1 + the count once the domain is known, + ``SETTLED`` once its window reached the cap."""
    stored = int(_number(n) or 1)
    return max(0, (stored - SETTLED if stored > SETTLED else stored) - 1)


#: The fields of a domain's politeness hash that ``TaskManager.domains`` shows.
FIELDS_OF_DOMAIN = ("n", "w", "r", "x")


def _is_zset(kind: object) -> bool:
    """Whether a TYPE reply says zset (hiredis gives a status as str or bytes)."""
    return kind in ("zset", b"zset")


def _number(raw: str | None) -> float | None:
    """A number stored by a script, or None when absent or damaged."""
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


def time_ms(reply: list[bytes]) -> int:
    """A TIME reply in ms: the Redis clock, the one leases and pauses are measured on."""
    seconds, micros = reply
    return int(seconds) * 1000 + int(micros) // 1000


def as_dict(flat: list[bytes]) -> dict[bytes, bytes]:
    """An HGETALL reply (field, value, field, value, ...) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _is_integer(raw: bytes) -> bool:
    return raw.lstrip(b"-").isdigit()


def numbers(fields: dict[bytes, bytes]) -> dict[bytes, int]:
    """The integer fields of a hash; a value damaged from outside reads as absent."""
    return {k: int(v) for k, v in fields.items() if _is_integer(v)}


def count_of(raw: bytes | None) -> int:
    """A counter as stored (absent, or damaged from outside: 0; the scripts restart it)."""
    return int(raw) if raw is not None and _is_integer(raw) else 0


def decode_record(record: dict[bytes, bytes]) -> dict[str, Any]:
    """A task hash as a dict of str, with JSON fields parsed.

    The record leaves out ``attempt`` until the first claim (0) and
    ``max_retries`` at its default; both are filled in here.
    """
    out: dict[str, Any] = {"attempt": "0", "max_retries": str(DEFAULT_MAX_RETRIES)}
    out |= {k.decode(): v.decode() for k, v in record.items()}
    for field in ("request", "response", "history"):
        if field in out:
            with contextlib.suppress(ValueError):  # a corrupt field is shown as stored
                out[field] = json.loads(out[field])
    for field in ("attempt", "max_retries"):
        if field in out and out[field].lstrip("-").isdigit():
            out[field] = int(out[field])
    return out


class WorkerMonitor:
    """Worker registry and liveness, on the Redis clock."""

    def __init__(self, redis_queue: RedisQueue) -> None:
        self.queue = redis_queue

    async def register_worker(self, worker_id: str, **fields: str | int | float) -> None:
        await self.queue.store.heartbeat(worker_id, dict(fields), register=True)

    async def update_heartbeat(self, worker_id: str, **fields: str | int | float) -> None:
        await self.queue.store.heartbeat(worker_id, dict(fields))

    async def increment_task_counter(self, worker_id: str, count: int = 1) -> None:
        with translated_errors():
            await self.queue.connection.execute(
                "HINCRBY", self.queue.keys.worker(worker_id), "tasks_processed", count
            )

    async def get_active_workers(self) -> list[dict[str, Any]]:
        """Every known worker; ``status`` is ``inactive`` once its heartbeat is overdue."""
        keys = self.queue.keys
        timeout_ms = self.queue.settings.heartbeat.timeout * 1000
        connection = self.queue.connection
        with translated_errors():
            time, ids = await connection.execute_many(("TIME",), ("ZRANGE", keys.workers, 0, -1))
            records = await connection.execute_many(
                *(("HGETALL", keys.worker(worker_id.decode())) for worker_id in ids)
            )
        now_ms = time_ms(time)
        workers = []
        for record in records:
            if not record:
                continue
            info: dict[str, Any] = {k.decode(): v.decode() for k, v in as_dict(record).items()}
            last = int(info.get("last_heartbeat", 0))
            if now_ms - last > timeout_ms:
                info["status"] = "inactive"
            info["last_heartbeat"] = last / 1000
            for field in ("tasks_processed", "pid"):
                if field in info:
                    info[field] = int(info[field])
            workers.append(info)
        return workers

    async def liveness(self) -> dict[str, int]:
        """How many known workers are ``active`` and ``inactive`` (heartbeat overdue)."""
        timeout_ms = self.queue.settings.heartbeat.timeout * 1000
        with translated_errors():
            time, beats = await self.queue.connection.execute_many(
                ("TIME",), ("ZRANGE", self.queue.keys.workers, 0, -1, "WITHSCORES")
            )
        cutoff = time_ms(time) - timeout_ms
        active = sum(1 for last in beats[1::2] if float(last) >= cutoff)
        return {"active": active, "inactive": len(beats) // 2 - active}

    async def cleanup_inactive_workers(self) -> int:
        """Mark silent workers lost and forget long-gone ones; returns how many were forgotten."""
        await self.queue.store.mark_lost(self.queue.settings.heartbeat.timeout)
        _, forgotten = await self.queue.store.cleanup()
        return forgotten
