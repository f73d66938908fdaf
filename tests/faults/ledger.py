"""The ledger: what every process saw, kept outside Redis, and the checker that judges a run.

Redis is the thing a fault test may break, so the evidence lives in a plain
file. Every process (the test's producer and waiters, every worker running a
``faults.ledger_scripts`` script) appends one JSON line per event with a
single ``os.write`` on a file opened ``O_APPEND``, so lines from many
processes never interleave. Kinds:

* ``enqueued`` ``{id}``: ``enqueue_task`` returned (the task is acknowledged);
* ``refused`` ``{id, error}``: ``enqueue_task`` raised (not acknowledged; after
  a connection error the task may still exist and run: that is allowed);
* ``completed`` ``{id, status}``: a waiter got the task's final response;
* ``started`` / ``side_effect`` ``{id, pid, attempt}``: written by the scripts.

After the run, :func:`check` turns the ledger, the final statuses read from
Redis and the ``task.completed`` event counts into a :class:`Report`.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers import admin

from actors.exceptions import QueueError, TaskTimeoutException
from actors.models import ScrapingRequest, TaskStatus
from actors.queue import RedisQueue

#: Final statuses from Redis, or a function of the ids that reads them.
StatusSource = Mapping[str, str | None] | Callable[[Sequence[str]], Mapping[str, str | None]]

_TERMINAL = frozenset(status.value for status in TaskStatus if status.is_terminal)


def append_record(path: str | os.PathLike[str], record: Mapping[str, Any]) -> None:
    """Append ``record`` as one JSON line with one ``write`` on an ``O_APPEND`` descriptor."""
    data = (json.dumps(record, separators=(",", ":")) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
    finally:
        os.close(fd)
    if written != len(data):
        raise OSError(f"short write to ledger {path}: {written} of {len(data)} bytes")


class Ledger:
    """An append-only JSON-lines file shared by the test and the worker processes.

    Usage::

        ledger = Ledger(tmp_path / "ledger.jsonl")
        request = ledger_request(ledger, "t1", seconds=0.05)
        await submit(queue, ledger, request)            # writes enqueued / refused
        await await_outcome(queue, ledger, "t1", 10)    # writes completed
        ledger.read()                                   # every record, in file order
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def append(self, kind: str, **fields: Any) -> None:
        append_record(self.path, {"kind": kind, "t": time.time(), **fields})

    def read(self) -> list[dict[str, Any]]:
        """Every record; a line that is not a JSON object raises ``ValueError`` naming it."""
        if not self.path.exists():
            return []
        records: list[dict[str, Any]] = []
        with self.path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{self.path}:{number}: not JSON: {exc}") from None
                if not isinstance(record, dict) or "kind" not in record:
                    raise ValueError(f"{self.path}:{number}: not a ledger record: {line!r}")
                records.append(record)
        return records


def ledger_request(
    ledger: Ledger,
    task_id: str,
    *,
    script: str = "ledger",
    parameters: Mapping[str, Any] | None = None,
    **options: Any,
) -> ScrapingRequest:
    """A request for a ``faults.ledger_scripts`` script whose request id is ``task_id``.

    ``parameters`` are added to ``ledger`` and ``id`` (e.g. ``seconds``,
    ``crash_times``); ``options`` are ``ScrapingRequest`` fields (``max_retries``...).
    """
    return ScrapingRequest(
        script_name=script,
        request_id=task_id,
        parameters={"ledger": str(ledger.path), "id": task_id, **(parameters or {})},
        **options,
    )


async def submit(queue: RedisQueue, ledger: Ledger, request: ScrapingRequest) -> bool:
    """Enqueue ``request`` and record the outcome; True if it was acknowledged."""
    try:
        await queue.enqueue_task(request)
    except QueueError as exc:
        ledger.append("refused", id=request.request_id, error=f"{type(exc).__name__}: {exc}")
        return False
    ledger.append("enqueued", id=request.request_id)
    return True


async def await_outcome(
    queue: RedisQueue, ledger: Ledger, request_id: str, timeout: float
) -> TaskStatus | None:
    """Wait for the task's final response and record it; None if none came in ``timeout``."""
    try:
        response = await queue.wait_for_response(request_id, timeout)
    except TaskTimeoutException:
        return None
    ledger.append("completed", id=request_id, status=response.status.value)
    return response.status


async def read_statuses(queue: RedisQueue, ids: Iterable[str]) -> dict[str, str | None]:
    """Each task's status in Redis now (None: no record), in one round trip."""
    wanted = list(ids)
    pipe = admin(queue).pipeline(transaction=False)
    for request_id in wanted:
        pipe.hget(queue.keys.task(request_id), "status")
    values: list[bytes | None] = await pipe.execute()
    return {
        request_id: None if value is None else value.decode()
        for request_id, value in zip(wanted, values, strict=True)
    }


@dataclass
class Report:
    """What one fault run did to the tasks. See :func:`check`.

    ``lost`` maps each lost id to its final status in Redis (None: no record).
    The ``duplicate_*`` maps hold the ids seen more than once, with the count.
    ``recovery_seconds``, ``restarts`` and ``peak_connections`` are measured
    by the test (e.g. ``ConnectionSampler.peak``) and set on the report.
    """

    acknowledged: int
    refused: int
    executions: int
    lost: dict[str, str | None]
    duplicate_completions: dict[str, int]
    duplicate_executions: dict[str, int]
    duplicate_side_effects: dict[str, int]
    recovery_seconds: float | None = None
    restarts: int | None = None
    peak_connections: int | None = None

    def as_row(self) -> dict[str, int | float | None]:
        """One row of figures for a report table (``dup_*``: extra occurrences)."""
        return {
            "acknowledged": self.acknowledged,
            "refused": self.refused,
            "lost": len(self.lost),
            "dup_complete": _extra(self.duplicate_completions),
            "executions": self.executions,
            "dup_exec": _extra(self.duplicate_executions),
            "dup_side_effect": _extra(self.duplicate_side_effects),
            "recovery_s": self.recovery_seconds,
            "restarts": self.restarts,
            "peak_connections": self.peak_connections,
        }

    def assert_no_loss(self) -> None:
        """Fail, naming the ids, if a task was lost or completed more than once."""
        problems = []
        if self.lost:
            listed = ", ".join(f"{rid} ({st or 'no record'})" for rid, st in self.lost.items())
            problems.append(f"{len(self.lost)} acknowledged task(s) lost: {listed}")
        if self.duplicate_completions:
            listed = ", ".join(f"{rid} x{n}" for rid, n in self.duplicate_completions.items())
            problems.append(f"task(s) completed more than once: {listed}")
        if problems:
            raise AssertionError("; ".join(problems) + f" -- figures: {self.as_row()}")


def check(
    ledger: Ledger | Sequence[Mapping[str, Any]],
    completed_events: Mapping[str, int] | None = None,
    *,
    statuses: StatusSource,
) -> Report:
    """Judge a run.

    An acknowledged task is lost unless Redis holds it in a terminal status
    (completed, failed, cancelled) or a waiter recorded its final response.
    ``statuses`` is a mapping from ``read_statuses`` or a function of the
    acknowledged ids. ``completed_events`` is ``EventRecorder.counts("task.completed")``;
    without it no duplicate completion can be seen.
    """
    records = ledger.read() if isinstance(ledger, Ledger) else list(ledger)
    by_kind: dict[str, list[str]] = {}
    for record in records:
        by_kind.setdefault(record["kind"], []).append(record["id"])
    acknowledged = list(dict.fromkeys(by_kind.get("enqueued", [])))
    final = statuses(acknowledged) if callable(statuses) else statuses
    answered = set(by_kind.get("completed", []))
    lost = {
        request_id: final.get(request_id)
        for request_id in acknowledged
        if request_id not in answered and final.get(request_id) not in _TERMINAL
    }
    return Report(
        acknowledged=len(acknowledged),
        refused=len(set(by_kind.get("refused", []))),
        executions=len(by_kind.get("started", [])),
        lost=lost,
        duplicate_completions=_repeated((completed_events or {}).items()),
        duplicate_executions=_repeated(Counter(by_kind.get("started", [])).items()),
        duplicate_side_effects=_repeated(Counter(by_kind.get("side_effect", [])).items()),
    )


def _repeated(counts: Iterable[tuple[str, int]]) -> dict[str, int]:
    return {key: count for key, count in counts if count > 1}


def _extra(duplicates: Mapping[str, int]) -> int:
    return sum(count - 1 for count in duplicates.values())
