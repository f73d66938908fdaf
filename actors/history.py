"""Reading the event history: the stream the scripts write (``_lib.lua``, ``history.lua``).

Each stream entry holds the events of one script call, in order (field ``e``:
one event's JSON object, or a JSON array of them). A reader replays entries
from a time or after an entry id, then follows new ones with ``XREAD BLOCK``
from the last id it saw: the seam between replay and live has no gap and no
duplicate, and a reader that reconnects resumes from its last id. A
partitioned queue (``actors/partitions.py``) keeps one stream per partition;
``EventHistory`` reads them all, merged, behind one cursor string.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

from actors.calls import Calls
from actors.keys import KeySpace

logger = logging.getLogger(__name__)

#: Entries one XRANGE / XREAD returns at most.
PAGE = 500

#: One event: a JSON object with at least ``event`` and ``ts``.
Event = dict[str, Any]

#: A stream entry id.
_ID = re.compile(r"\d+-\d+")
#: A cursor of an event history (``EventHistory``): one entry id per partition, by ``,``.
CURSOR = re.compile(r"\d+-\d+(?:,\d+-\d+)*")
#: The id before every stream entry.
_BEGINNING = "0-0"


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


class EventHistory:
    """The event history of one queue, every partition's stream, read through ``connection``.

    Each partition's scripts write their own stream (``KeySpace.history``;
    on a Redis Cluster each on its partition's master), so each is read with
    commands of its own and the entries are merged oldest first, by entry
    time: stream ids are ``<ms>-<seq>``, ordered across partitions by (ms,
    seq, partition).

    A cursor (where a reader is) is one string: with one partition the id of
    the last entry read, exactly as the stream names it; with N, the N
    partitions' last ids in partition order, joined by ``,``
    (:data:`CURSOR`). A plain id given to a partitioned history stands for
    that point in every partition (``0-0``: the beginning). Each entry read
    comes with the cursor just after it, which advances only the partition
    that entry is in: a reader that resumes from it sees every later entry of
    every partition once.
    """

    def __init__(self, connection: Calls, partitions: Sequence[KeySpace]) -> None:
        if not partitions:
            raise ValueError("EventHistory needs at least one partition")
        self._connection = connection
        self._keys = [keys.history for keys in partitions]

    @property
    def beginning(self) -> str:
        """The cursor before every entry (``0-0`` in each partition)."""
        return _joined([_BEGINNING] * len(self._keys))

    def fits(self, cursor: str) -> bool:
        """Whether ``cursor`` is one of this history's (or a plain id, for every partition)."""
        try:
            self._positions(cursor)
        except ValueError:
            return False
        return True

    async def kept(self) -> bool:
        """Whether the history is on (partition 0's stream exists: ``[events] history`` > 0)."""
        return int(await self._connection.execute("EXISTS", self._keys[0])) == 1

    async def last_id(self) -> str:
        """The cursor after the newest entry of each partition (``0-0`` where there is none)."""
        replies = await self._connection.execute_many(
            *(("XREVRANGE", key, "+", "-", "COUNT", 1) for key in self._keys)
        )
        return _joined([str(reply[0][0].decode()) if reply else _BEGINNING for reply in replies])

    async def start_id(self, seconds_ago: float) -> str:
        """A cursor just before the entries of the last ``seconds_ago`` seconds (Redis's clock)."""
        seconds, micros = await self._connection.execute("TIME")
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        start = f"{max(0, now_ms - int(seconds_ago * 1000) - 1)}-{2**64 - 1}"
        return _joined([start] * len(self._keys))

    async def after(self, cursor: str) -> list[tuple[str, list[Event]]]:
        """Entries after ``cursor`` that exist now (at most ``PAGE``), oldest first.

        Each comes as (the cursor just after it, its events).
        """
        positions = self._positions(cursor)
        replies = await self._connection.execute_many(
            *(
                ("XRANGE", key, f"({position}", "+", "COUNT", PAGE)
                for key, position in zip(self._keys, positions, strict=True)
            )
        )
        return _merged(positions, replies)

    async def wait_after(self, cursor: str, block_ms: int) -> list[tuple[str, list[Event]]]:
        """Entries after ``cursor``, waiting up to about ``block_ms`` for the first.

        One ``XREAD BLOCK`` per partition, at once. A blocked read holds up
        every later command on its server's connection (and, on one server,
        the other partitions' reads), so a partitioned history looks for
        entries already there first and then blocks each read for a share of
        ``block_ms``: one poll waits no longer than one stream's would (so
        ``block_ms`` = 0, for ever on one stream, is not for ever here).
        """
        positions = self._positions(cursor)
        block = block_ms
        if len(self._keys) > 1:
            found = await self.after(cursor)
            if found:
                return found
            block = max(1, block_ms // len(self._keys))
        replies = await self._connection.execute_many(
            *(
                ("XREAD", "COUNT", PAGE, "BLOCK", block, "STREAMS", key, position)
                for key, position in zip(self._keys, positions, strict=True)
            )
        )
        return _merged(positions, [reply[0][1] if reply else [] for reply in replies])

    def backwards(self, after: str | None) -> Backwards:
        """A reader of the entries after ``after`` (None: all), newest first."""
        lower = ["-"] * len(self._keys) if after is None else self._positions(after)
        return Backwards(self._connection, self._keys, lower, after is not None)

    def _positions(self, cursor: str) -> list[str]:
        """The per-partition ids of ``cursor``; ValueError when it is none of this history's."""
        ids = cursor.split(",")
        if len(ids) == 1:
            ids *= len(self._keys)
        if len(ids) != len(self._keys) or not all(_ID.fullmatch(i) for i in ids):
            raise ValueError(
                f"not a cursor of an event history of {len(self._keys)} partition(s): {cursor!r}"
            )
        return ids


class Backwards:
    """Pages of a history's entries, newest first (``EventHistory.backwards``)."""

    def __init__(
        self, connection: Calls, keys: Sequence[str], lower: Sequence[str], exclusive: bool
    ) -> None:
        self._connection = connection
        self._keys = list(keys)
        self._lower = [f"({i}" if exclusive else i for i in lower]
        self._upper = ["+"] * len(keys)
        self._newest: list[str | None] = [None] * len(keys)
        self._open = list(range(len(keys)))  # partitions that may have entries left

    async def page(self) -> list[list[Event]]:
        """The next (older) entries' events, at most ``PAGE`` entries; fewer: none are left.

        A partition whose read came back full may have older entries than
        the page's oldest; the page stops at ``PAGE`` entries, so it never
        reaches past them and the next page takes them up.
        """
        if not self._open:
            return []
        replies = await self._connection.execute_many(
            *(
                ("XREVRANGE", self._keys[p], self._upper[p], self._lower[p], "COUNT", PAGE)
                for p in self._open
            )
        )
        read: list[tuple[tuple[int, int], int, str, list[bytes]]] = []
        for p, reply in zip(self._open, replies, strict=True):
            for raw_id, fields in reply or []:
                entry_id = raw_id.decode()
                read.append((_order(entry_id), p, entry_id, fields or []))
                if self._newest[p] is None:
                    self._newest[p] = entry_id
        read.sort(reverse=True)
        taken = read[:PAGE]
        left = {p: len(reply or []) == PAGE for p, reply in zip(self._open, replies, strict=True)}
        for _, p, _, _ in read[PAGE:]:
            left[p] = True
        for _, p, entry_id, _ in taken:
            self._upper[p] = f"({entry_id}"
        self._open = [p for p in self._open if left[p]]
        return [parse_entry(fields) for _, _, _, fields in taken]

    def cursor(self, empty: str) -> str:
        """The cursor after the newest entry each partition's reads met (else ``empty``'s id).

        ``empty``: a cursor of this history, or a plain id for every partition.
        """
        fallback = empty.split(",")
        if len(fallback) == 1:
            fallback *= len(self._keys)
        return _joined([n or f for n, f in zip(self._newest, fallback, strict=True)])


def _order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq)


def _joined(ids: Sequence[str]) -> str:
    return ",".join(ids)


def _merged(
    positions: Sequence[str], replies: Sequence[list[Any] | None]
) -> list[tuple[str, list[Event]]]:
    """The entries of each partition's read from ``positions``, oldest first, at most ``PAGE``.

    A partition whose read came back full may have later entries than its
    last one read; cutting the merge at ``PAGE`` entries never reaches past
    that last one (the full read alone fills the page up to it), so no entry
    is passed over. Each entry's cursor advances only its own partition.
    """
    read = sorted(
        (_order(raw_id.decode()), p, raw_id.decode(), fields or [])
        for p, reply in enumerate(replies)
        for raw_id, fields in reply or []
    )
    current = list(positions)
    entries: list[tuple[str, list[Event]]] = []
    for _, p, entry_id, fields in read[:PAGE]:
        current[p] = entry_id
        entries.append((_joined(current), parse_entry(fields)))
    return entries


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

    def __init__(self, connection: Calls, partitions: Sequence[KeySpace]) -> None:
        self._connection = connection
        self._partitions = list(partitions)
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
            found = [
                k for k in (await self._rate_keys(request_id)).split() if k.startswith("domain:")
            ]
            self._tasks[request_id] = found[0].removeprefix("domain:") if found else None
        return self._tasks[request_id]

    async def _rate_keys(self, request_id: str) -> str:
        """The task's ``rate_keys``, from its record in whichever partition holds it."""
        replies = await self._connection.execute_many(
            *(("HGET", keys.task(request_id), "rate_keys") for keys in self._partitions)
        )
        raw = next((reply for reply in replies if reply is not None), None)
        return (raw or b"").decode()
