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
from actors.history import PAGE, Event, EventHistory, event_filter
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

    ``cursor`` says where the answer's reading ended (``EventHistory``: an
    entry id, one per partition); the page sends it back as ``after`` to get
    only what came since. ``gap`` says events were skipped because more
    arrived than one poll reads, or because the cursor is not one of this
    history's (the queue's partitions changed): the page says so.
    """
    history = EventHistory(queue.connection, queue.partitions)
    with translated_errors():
        if not await history.kept():
            return {"kept": False, "cursor": history.beginning, "events": [], "gap": False}
        reader = _Reader(history, query)
        if query.after is None or not history.fits(query.after):
            start = None if query.since is None else await history.start_id(query.since)
            cursor, found = await reader.newest(start, start or history.beginning)
            gap = query.after is not None
        else:
            cursor, found, gap = await reader.following(query.after)
    return {"kept": True, "cursor": cursor, "events": found, "gap": gap}


class _Reader:
    """Reads history entries and keeps the events that pass the page's filters."""

    def __init__(self, history: EventHistory, query: EventQuery) -> None:
        self._history = history
        self._matches = event_filter(task=query.task, worker=query.worker, kinds=query.kinds)

    async def newest(self, after: str | None, empty_cursor: str) -> tuple[str, list[Event]]:
        """Up to EVENTS_SHOWN matching events of the entries after ``after``, newest first.

        Reads backwards from the newest entries (``EventHistory.backwards``), a
        page at a time, at most ENTRIES_SCANNED entries; the cursor is after
        the newest entry of each partition, or ``empty_cursor``'s position
        where a partition has no entry after ``after``.
        """
        back = self._history.backwards(after)
        found: list[Event] = []
        scanned = 0
        while scanned < ENTRIES_SCANNED and len(found) < EVENTS_SHOWN:
            page = await back.page()
            for entry_events in page:
                found += reversed([e for e in entry_events if self._matches(e)])
            scanned += len(page)
            if len(page) < PAGE:
                break
        return back.cursor(empty_cursor), found[:EVENTS_SHOWN]

    async def following(self, after: str) -> tuple[str, list[Event], bool]:
        """Matching events of the entries after ``after``, newest first; whether some were skipped.

        More than FOLLOW_PAGES pages behind, the page would never catch up
        reading forwards: the newest events are read instead, and the ones in
        between are skipped.
        """
        cursor = after
        found: list[Event] = []
        for _ in range(FOLLOW_PAGES):
            entries = await self._history.after(cursor)
            for entry_id, entry_events in entries:
                found += [e for e in entry_events if self._matches(e)]
                cursor = entry_id
            if len(entries) < PAGE:
                found.reverse()
                return cursor, found[:EVENTS_SHOWN], False
        newest, latest = await self.newest(after, cursor)
        return newest, latest, True


async def dead_letters(queue: RedisQueue, limit: int) -> dict[str, Any]:
    """The newest ``limit`` dead letters (request, last error, attempt history)."""
    return {"dead_letters": await TaskManager(queue).list_dead_letters(limit)}


async def task(queue: RedisQueue, request_id: str) -> dict[str, Any] | None:
    """Everything stored about one task, as ``supervisor task --json`` prints it; None if gone."""
    record = await TaskManager(queue).get_task(request_id)
    return None if record is None else {"request_id": request_id, **record}
