"""What the dashboard's JSON endpoints answer, read through the supervisor's own queue.

The numbers are those of ``supervisor status --json`` (:func:`snapshot`), the
per-minute counts the workers keep (``QueueTelemetry.minutes``) and the event
history (``EventHistory``); nothing here keeps state between requests, the
page carries its own cursor into the history.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from actors.connection import translated_errors
from actors.history import PAGE, Event, EventHistory, event_filter, parse_entry
from actors.queue import RedisQueue, TaskManager
from actors.telemetry import Minute, QueueTelemetry, percentiles
from supervisor.cli_status import snapshot

#: Minutes the charts cover (the workers keep 65).
CHART_MINUTES = 60
#: Events one answer carries at most: the page shows the newest of them.
EVENTS_SHOWN = 200
#: History entries one look back reads at most, so a filter nothing matches stays cheap.
ENTRIES_SCANNED = 10 * PAGE
#: Pages a follow-up poll reads before it gives up catching up and jumps to the newest.
FOLLOW_PAGES = 4
#: The id before every stream entry: the cursor of an empty history.
BEGINNING = "0-0"


async def overview(queue: RedisQueue) -> dict[str, Any]:
    """The status object, the last hour minute by minute (oldest first) and Redis's clock.

    The page measures heartbeat ages against ``now``, the clock they were taken by.
    """
    status = await snapshot(queue)
    telemetry = QueueTelemetry(queue.connection, queue.keys)
    now = await telemetry.redis_time()
    minutes = await telemetry.minutes(CHART_MINUTES, now)
    return {"status": status, "now": now, "minutes": [_minute(m) for m in minutes]}


def _minute(minute: Minute) -> dict[str, Any]:
    return {
        "start": minute.start,
        "outcomes": minute.outcomes,
        "depth": minute.depth,
        "wait": percentiles(minute.wait),
        "execution": percentiles(minute.execution),
    }


@dataclass(frozen=True, slots=True)
class EventQuery:
    """The page's filters (all given must match) and where it left off."""

    task: str | None = None
    worker: str | None = None
    kinds: frozenset[str] = frozenset()
    since: float | None = None  # look back this many seconds (else as far as ENTRIES_SCANNED)
    after: str | None = None  # the cursor of the page's last answer: only newer events


async def events(queue: RedisQueue, query: EventQuery) -> dict[str, Any]:
    """``{"kept", "cursor", "events", "gap"}``: matching events, newest first.

    ``cursor`` is the id of the last entry read; the page sends it back as
    ``after`` to get only what came since. ``gap`` says events were skipped
    because more arrived than one poll reads (the page says so).
    """
    history = EventHistory(queue.connection, queue.keys)
    with translated_errors():
        if not await history.kept():
            return {"kept": False, "cursor": BEGINNING, "events": [], "gap": False}
        reader = _Reader(queue, query)
        if query.after is None:
            lower = "-" if query.since is None else await history.start_id(query.since)
            cursor, found = await reader.newest(lower, BEGINNING if lower == "-" else lower)
            gap = False
        else:
            cursor, found, gap = await reader.following(history, query.after)
    return {"kept": True, "cursor": cursor, "events": found, "gap": gap}


class _Reader:
    """Reads history entries and keeps the events that pass the page's filters."""

    def __init__(self, queue: RedisQueue, query: EventQuery) -> None:
        self._connection = queue.connection
        self._key = queue.keys.history
        self._matches = event_filter(task=query.task, worker=query.worker, kinds=query.kinds)

    async def newest(self, lower: str, empty_cursor: str) -> tuple[str, list[Event]]:
        """Up to EVENTS_SHOWN matching events of the entries above ``lower``, newest first.

        Reads backwards from the newest entry (``XREVRANGE``), a page at a
        time, at most ENTRIES_SCANNED entries; the cursor is the newest entry's
        id, or ``empty_cursor`` when no entry is above ``lower``.
        """
        cursor: str | None = None
        found: list[Event] = []
        upper = "+"
        scanned = 0
        while scanned < ENTRIES_SCANNED and len(found) < EVENTS_SHOWN:
            reply = await self._connection.execute(
                "XREVRANGE", self._key, upper, lower, "COUNT", PAGE
            )
            for raw_id, fields in reply or []:
                entry_id = raw_id.decode()
                cursor = cursor or entry_id
                found += reversed([e for e in parse_entry(fields or []) if self._matches(e)])
                upper = f"({entry_id}"
            scanned += len(reply or [])
            if len(reply or []) < PAGE:
                break
        return cursor or empty_cursor, found[:EVENTS_SHOWN]

    async def following(self, history: EventHistory, after: str) -> tuple[str, list[Event], bool]:
        """Matching events of the entries after ``after``, newest first; whether some were skipped.

        More than FOLLOW_PAGES pages behind, the page would never catch up
        reading forwards: the newest events are read instead, and the ones in
        between are skipped.
        """
        cursor = after
        found: list[Event] = []
        for _ in range(FOLLOW_PAGES):
            entries = await history.after(cursor)
            for entry_id, entry_events in entries:
                found += [e for e in entry_events if self._matches(e)]
                cursor = entry_id
            if len(entries) < PAGE:
                found.reverse()
                return cursor, found[:EVENTS_SHOWN], False
        newest, latest = await self.newest(f"({after}", cursor)
        return newest, latest, True


async def dead_letters(queue: RedisQueue, limit: int) -> dict[str, Any]:
    """The newest ``limit`` dead letters (request, last error, attempt history)."""
    return {"dead_letters": await TaskManager(queue).list_dead_letters(limit)}


async def task(queue: RedisQueue, request_id: str) -> dict[str, Any] | None:
    """Everything stored about one task, as ``supervisor task --json`` prints it; None if gone."""
    record = await TaskManager(queue).get_task(request_id)
    return None if record is None else {"request_id": request_id, **record}
