"""Reading the event history: the stream the scripts write (``_lib.lua``, ``history.lua``).

Each stream entry holds the events of one script call, in order (field ``e``:
one event's JSON object, or a JSON array of them). A reader replays entries
from a time or after an entry id, then follows new ones with ``XREAD BLOCK``
from the last id it saw: the seam between replay and live has no gap and no
duplicate, and a reader that reconnects resumes from its last id.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from actors.keys import KeySpace
from actors.multiplexed import MultiplexedConnection

logger = logging.getLogger(__name__)

#: Entries one XRANGE / XREAD returns at most.
PAGE = 500

#: One event: a JSON object with at least ``event`` and ``ts``.
Event = dict[str, Any]


def parse_entry(fields: list[bytes]) -> list[Event]:
    """The events of one stream entry (its flat field/value reply); none if it is damaged."""
    values = dict(zip(fields[::2], fields[1::2], strict=False))  # n (how many), e (the events)
    raw = values.get(b"e")
    if raw is None:
        return []
    try:
        decoded = json.loads(raw)
    except ValueError:
        logger.warning("해석할 수 없는 이벤트 기록 무시: %r", raw[:200])
        return []
    items = decoded if isinstance(decoded, list) else [decoded]
    events: list[Event] = []
    for item in items:
        if isinstance(item, dict):
            events.extend(_expand(item) if "request_ids" in item else [item])
    return events


def _expand(batch: Event) -> list[Event]:
    """The events of one per-call batch of a per-task event (``_lib.lua``'s emit_task)."""
    ids, attempts = batch.get("request_ids"), batch.get("attempts")
    if not isinstance(ids, list) or not isinstance(attempts, list):
        return []
    common = {
        "event": batch.get("event"),
        "ts": batch.get("ts"),
        "worker_id": batch.get("worker_id"),
    }
    return [
        {**common, "request_id": request_id, "attempt": attempt}
        for request_id, attempt in zip(ids, attempts, strict=False)
    ]


def _entries(reply: list[Any] | None) -> list[tuple[str, list[Event]]]:
    return [(entry_id.decode(), parse_entry(fields or [])) for entry_id, fields in reply or []]


class EventHistory:
    """The event history of one queue, read through ``connection``."""

    def __init__(self, connection: MultiplexedConnection, keys: KeySpace) -> None:
        self._connection = connection
        self._key = keys.history

    async def kept(self) -> bool:
        """Whether the history is on (the stream exists: ``[events] history`` > 0)."""
        return int(await self._connection.execute("EXISTS", self._key)) == 1

    async def last_id(self) -> str:
        """The id of the newest entry, or ``0-0`` when there is none."""
        reply = await self._connection.execute("XREVRANGE", self._key, "+", "-", "COUNT", 1)
        return str(reply[0][0].decode()) if reply else "0-0"

    async def start_id(self, seconds_ago: float) -> str:
        """An id just before the entries of the last ``seconds_ago`` seconds (Redis's clock)."""
        seconds, micros = await self._connection.execute("TIME")
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        return f"{max(0, now_ms - int(seconds_ago * 1000) - 1)}-{2**64 - 1}"

    async def after(self, last_id: str) -> list[tuple[str, list[Event]]]:
        """Entries after ``last_id`` that exist now (at most ``PAGE``), oldest first."""
        reply = await self._connection.execute(
            "XRANGE", self._key, f"({last_id}", "+", "COUNT", PAGE
        )
        return _entries(reply)

    async def wait_after(self, last_id: str, block_ms: int) -> list[tuple[str, list[Event]]]:
        """Entries after ``last_id``, waiting up to ``block_ms`` for the first."""
        reply = await self._connection.execute(
            "XREAD", "COUNT", PAGE, "BLOCK", block_ms, "STREAMS", self._key, last_id
        )
        if not reply:
            return []
        return _entries(reply[0][1])


def event_filter(
    *, task: str | None = None, worker: str | None = None, kinds: frozenset[str] = frozenset()
) -> Callable[[Event], bool]:
    """A predicate over events for ``supervisor events``' filters (all given must match)."""

    def matches(event: Event) -> bool:
        if task is not None and event.get("request_id") != task:
            return False
        if worker is not None and event.get("worker_id") != worker:
            return False
        return not kinds or event.get("event") in kinds

    return matches


class EventDomains:
    """The domain (host) an event is about: its rate key's, else its task's.

    Task events carry no domain (it would cost every event bytes), so the task
    record's ``rate_keys`` is read once per task and remembered (at most
    ``CACHED`` tasks).
    """

    CACHED = 10_000

    def __init__(self, connection: MultiplexedConnection, keys: KeySpace) -> None:
        self._connection = connection
        self._keys = keys
        self._tasks: dict[str, str | None] = {}

    async def of(self, event: Event) -> str | None:
        key = event.get("key")
        if isinstance(key, str) and key.startswith("domain:"):
            return key.removeprefix("domain:")
        request_id = event.get("request_id")
        if not isinstance(request_id, str):
            return None
        if request_id not in self._tasks:
            if len(self._tasks) >= self.CACHED:
                self._tasks.clear()
            raw = await self._connection.execute("HGET", self._keys.task(request_id), "rate_keys")
            found = [k for k in (raw or b"").decode().split() if k.startswith("domain:")]
            self._tasks[request_id] = found[0].removeprefix("domain:") if found else None
        return self._tasks[request_id]
