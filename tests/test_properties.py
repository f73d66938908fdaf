"""Random operation sequences against a real Redis keep the queue's invariants.

A hypothesis state machine enqueues, claims, completes, fails, expires leases,
releases, cancels and requeues dead letters in random order, replaying stale
leases too, and after every step checks the whole queue:

- every task enqueued still exists (nothing lost) and no unknown id is queued;
- a task is in exactly one of the pending / running / delayed / dead sets and
  its status names that set, or it is in none and is completed or cancelled;
- a task never runs more than ``max_retries + 1`` attempts;
- a task is completed at most once, and the ``completed`` counter agrees.

Each example gets a fresh key prefix and its own event loop: pytest-asyncio's
loop and fixtures do not span hypothesis examples.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Awaitable
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from actors.models import ScrapingRequest
from actors.queue import RedisQueue, as_dict
from actors.store import Completion, FailOutcome, TaskStore
from config.settings import Settings

T = TypeVar("T")

#: Which status a task in each set must have.
SET_STATUS = {"pending": "pending", "running": "running", "delayed": "retrying", "dead": "failed"}
#: Statuses of tasks that are in no set.
SETLESS = {"completed", "cancelled"}
WORKERS = ("w1", "w2")


class QueueMachine(RuleBasedStateMachine):
    redis_url: str  # set by the test, which knows the session server

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.queue = RedisQueue(
            Settings.model_validate(
                {
                    "redis": {
                        "url": self.redis_url,
                        "embedded": "never",
                        "key_prefix": f"h{uuid.uuid4().hex[:12]}",
                    },
                    # leases expire only when a rule says so
                    "heartbeat": {"interval": 1, "timeout": 60},
                }
            )
        )
        self.run(self.queue.connect())
        # ids are numbered, not random: hypothesis replays a sequence by its choices,
        # so everything it draws from (ids, sets, leases) must be reproducible
        self.known: set[str] = set()
        # every lease ever handed out, (id, worker, attempt); stale ones are replayed
        self.leases: list[tuple[str, str, int]] = []
        self.completions: Counter[str] = Counter()
        # the members of each set after the last step: lets preconditions skip no-op steps
        self.snapshot: dict[str, list[str]] = {name: [] for name in SET_STATUS}

    def run(self, awaitable: Awaitable[T]) -> T:
        return self.loop.run_until_complete(awaitable)

    @property
    def store(self) -> TaskStore:
        return self.queue.store

    def fields(self, request_id: str) -> dict[str, str]:
        reply = self.run(self.queue.connection.execute("HGETALL", self.queue.keys.task(request_id)))
        return {k.decode(): v.decode() for k, v in as_dict(reply).items()}

    def members(self, set_name: str) -> list[str]:
        reply = self.run(
            self.queue.connection.execute("ZRANGE", getattr(self.queue.keys, set_name), 0, -1)
        )
        return sorted(item.decode() for item in reply)

    def pick_lease(self, data: st.DataObject) -> tuple[str, str, int]:
        """A lease to report on: mostly a live one, sometimes any (stale) one."""
        running = set(self.snapshot["running"])
        live = [lease for lease in self.leases if lease[0] in running]
        choices = st.sampled_from(self.leases)
        if live:
            choices = st.sampled_from(live) | choices
        return data.draw(choices)

    @staticmethod
    def holds(record: dict[str, str], worker: str, attempt: int) -> bool:
        return record.get("status") == "running" and (
            record.get("worker"),
            record.get("attempt"),
        ) == (worker, str(attempt))

    def teardown(self) -> None:
        async def clean() -> None:
            connection = self.queue.connection
            pattern = f"{self.queue.settings.redis.key_prefix}:*"
            cursor, keys = b"0", []
            while True:
                cursor, found = await connection.execute("SCAN", cursor, "MATCH", pattern)
                keys += found
                if cursor == b"0":
                    break
            if keys:
                await connection.execute("DEL", *keys)
            await self.queue.close()

        try:
            self.run(clean())
        finally:
            self.loop.close()

    # -- operations ---------------------------------------------------------------------

    @rule(priority=st.integers(-2, 2), max_retries=st.integers(0, 2), count=st.integers(1, 3))
    def enqueue(self, priority: int, max_retries: int, count: int) -> None:
        requests = [
            ScrapingRequest(
                request_id=f"t{len(self.known) + i}",
                script_name="echo",
                priority=priority,
                max_retries=max_retries,
            )
            for i in range(count)
        ]
        self.known.update(self.run(self.queue.enqueue_many(requests)))

    @precondition(lambda self: self.snapshot["pending"] or self.snapshot["delayed"])
    @rule(worker=st.sampled_from(WORKERS), count=st.integers(1, 3))
    def claim(self, worker: str, count: int) -> None:
        for lease in self.run(self.store.claim(worker, count)).leases:
            assert lease.request_id in self.known
            assert self.holds(self.fields(lease.request_id), worker, lease.attempt)
            self.leases.append((lease.request_id, worker, lease.attempt))

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        request_id, worker, attempt = self.pick_lease(data)
        before = self.fields(request_id)
        repeat = before["status"] == "completed" and (before["worker"], before["attempt"]) == (
            worker,
            str(attempt),
        )

        (accepted,) = self.run(
            self.store.complete(worker, [Completion(request_id, attempt, "1", 0.0)])
        )

        assert accepted == (self.holds(before, worker, attempt) or repeat)
        if accepted and not repeat:
            self.completions[request_id] += 1

    @precondition(lambda self: self.leases)
    @rule(data=st.data(), permanent=st.booleans())
    def fail(self, data: st.DataObject, permanent: bool) -> None:
        request_id, worker, attempt = self.pick_lease(data)
        before = self.fields(request_id)

        outcome, _ = self.run(
            self.store.fail(worker, request_id, attempt, "x", permanent=permanent)
        )

        if not self.holds(before, worker, attempt):
            assert outcome is FailOutcome.REFUSED
        elif permanent or attempt > int(before["max_retries"]):
            assert outcome is FailOutcome.DEAD_LETTERED
        else:
            assert outcome is FailOutcome.RETRYING
            # end the backoff now: whether a retry is due must not depend on timing
            self.run(
                self.queue.connection.execute("ZADD", self.queue.keys.delayed, "XX", 0, request_id)
            )

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        request_id, worker, attempt = self.pick_lease(data)
        before = self.fields(request_id)

        released = self.run(self.store.release(worker, [(request_id, attempt)], reason="drain"))

        assert released == int(self.holds(before, worker, attempt))
        if released:
            assert self.fields(request_id)["attempt"] == str(attempt - 1)

    @precondition(lambda self: self.snapshot["running"])
    @rule(data=st.data())
    def expire_lease(self, data: st.DataObject) -> None:
        request_id = data.draw(st.sampled_from(self.snapshot["running"]))
        before = self.fields(request_id)
        self.run(
            self.queue.connection.execute("ZADD", self.queue.keys.running, "XX", 0, request_id)
        )

        self.run(self.store.requeue_expired())

        poisoned = int(before["attempt"]) > int(before["max_retries"])
        assert self.fields(request_id)["status"] == ("failed" if poisoned else "pending")

    @precondition(lambda self: self.known)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        request_id = data.draw(st.sampled_from(sorted(self.known | {"never-enqueued"})))
        status = self.fields(request_id).get("status")

        cancelled = self.run(self.store.cancel(request_id))

        assert cancelled == (status in ("pending", "retrying", "running"))

    @precondition(lambda self: self.snapshot["dead"])
    @rule(data=st.data())
    def requeue_dead_letters(self, data: st.DataObject) -> None:
        dead = self.snapshot["dead"]
        chosen = data.draw(st.none() | st.lists(st.sampled_from(dead), min_size=1, unique=True))

        requeued, full, _ = self.run(self.store.dlq_requeue(chosen))

        assert not full

        assert requeued == len(dead if chosen is None else chosen)
        for request_id in dead if chosen is None else chosen:
            record = self.fields(request_id)
            assert (record["status"], record["attempt"]) == ("pending", "0")

    @precondition(lambda self: self.snapshot["delayed"])
    @rule()
    def promote_due_retries(self) -> None:
        self.run(self.store.promote_due())

    # -- invariants ---------------------------------------------------------------------

    @invariant()
    def every_task_is_where_its_status_says(self) -> None:
        where: dict[str, list[str]] = {}
        for set_name in SET_STATUS:
            self.snapshot[set_name] = self.members(set_name)
            for request_id in self.snapshot[set_name]:
                where.setdefault(request_id, []).append(set_name)
        assert where.keys() <= self.known, "an unknown id is queued"
        for request_id in self.known:
            record = self.fields(request_id)
            assert record, f"task {request_id} was lost"
            sets = where.get(request_id, [])
            if sets:
                assert len(sets) == 1, (request_id, sets)
                assert record["status"] == SET_STATUS[sets[0]], (request_id, sets, record)
            else:
                assert record["status"] in SETLESS, (request_id, record)
            # No attempt field until the first claim.
            assert int(record.get("attempt", 0)) <= int(record["max_retries"]) + 1

    @invariant()
    def no_task_completes_twice(self) -> None:
        assert all(n <= 1 for n in self.completions.values()), self.completions
        counted: Any = self.run(
            self.queue.connection.execute("HGET", self.queue.keys.stats, "completed")
        )
        assert int(counted or 0) == sum(self.completions.values())


def test_random_operation_sequences_keep_the_queue_consistent(redis_url: str) -> None:
    class Machine(QueueMachine):
        pass

    Machine.redis_url = redis_url
    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=30,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
