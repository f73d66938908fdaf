"""Latency and throughput: counted by the workers, kept in Redis, read by status and /metrics.

Each worker counts the queue wait of every task it starts (the claim says
how long the task waited since it last became claimable) and the execution
time and outcome of every attempt it ends, in fixed buckets, per script
(:class:`TelemetryBatch`), and adds its counts up in Redis about once a
second (``record_metrics.lua``), in two structures: ``KeySpace.metrics`` (per
script, since the queue was created: the Prometheus histograms and counters)
and one hash per minute, kept 65 minutes (status, ``status --watch`` and the
dashboard). Counting in the worker costs the scripts nothing per task; a
worker killed loses at most its last second of counts (its tasks run again
and are counted then). Percentiles are estimated from the bucket counts as
Prometheus' ``histogram_quantile`` does: linearly inside the bucket that
holds the rank.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from actors.calls import Calls
from actors.connection import translated_errors
from actors.keys import KeySpace

#: Upper bounds (seconds) of the latency buckets, suited to scraping; a last one, +Inf, follows.
LATENCY_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 600.0,
)  # fmt: skip
#: What each minute hash counts besides latency buckets.
OUTCOMES = ("started", "completed", "failed", "retried")
#: Minutes the per-minute hashes are kept (status reads at most this many).
MINUTES_KEPT = 65
QUANTILES = (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))


def bucket_of(seconds: float) -> int:
    """The 1-based bucket of a latency (``len(LATENCY_BUCKETS) + 1``: +Inf)."""
    return bisect.bisect_left(LATENCY_BUCKETS, seconds) + 1


class _Tally:
    """One script's counts in a batch (field names are built once, when recorded)."""

    __slots__ = ("execution", "execution_us", "outcomes", "wait", "wait_us")

    def __init__(self) -> None:
        size = len(LATENCY_BUCKETS) + 1
        self.wait, self.execution = [0] * size, [0] * size
        self.wait_us = self.execution_us = 0
        self.outcomes: Counter[str] = Counter()


class TelemetryBatch:
    """A worker's counts since it last recorded them (``TaskStore.record_metrics``).

    Per task it costs a bisect and a few additions (no strings built): the
    worker's CPU is the dispatch rate's limit.
    """

    def __init__(self) -> None:
        self._scripts: dict[str, _Tally] = {}

    def _tally(self, script: str) -> _Tally:
        tally = self._scripts.get(script)
        if tally is None:
            tally = self._scripts[script] = _Tally()
        return tally

    def started(self, script: str, queued: float) -> None:
        tally = self._tally(script)
        queued = max(0.0, queued)
        tally.wait[bucket_of(queued) - 1] += 1
        tally.wait_us += round(queued * 1e6)
        tally.outcomes["started"] += 1

    def ended(self, script: str, execution: float) -> None:
        """An attempt ended after ``execution`` seconds (its outcome is counted apart)."""
        tally = self._tally(script)
        execution = max(0.0, execution)
        tally.execution[bucket_of(execution) - 1] += 1
        tally.execution_us += round(execution * 1e6)

    def outcome(self, script: str, outcome: str) -> None:
        self._tally(script).outcomes[outcome] += 1

    def fields(self) -> tuple[dict[str, int], dict[str, int]]:
        """The fields to add to the metrics hash (sums in µs) and to this minute's hash."""
        totals: Counter[str] = Counter()
        minute: Counter[str] = Counter()
        for script, tally in self._scripts.items():
            for kind, buckets, total_us in (
                ("w", tally.wait, tally.wait_us),
                ("e", tally.execution, tally.execution_us),
            ):
                for index, count in enumerate(buckets, start=1):
                    if count:
                        totals[f"{kind}|{script}|{index}"] += count
                        minute[f"{kind}{index}"] += count
                if any(buckets):
                    totals[f"{kind}|{script}|sum"] += total_us
            for outcome, count in tally.outcomes.items():
                totals[f"o|{script}|{outcome}"] += count
                minute[outcome] += count
        return dict(totals), dict(minute)

    def take(self) -> TelemetryBatch:
        """These counts, leaving this batch empty (give them back with ``merge``)."""
        taken = TelemetryBatch()
        taken._scripts, self._scripts = self._scripts, {}
        return taken

    def merge(self, other: TelemetryBatch) -> None:
        for script, theirs in other._scripts.items():
            mine = self._tally(script)
            mine.wait = [a + b for a, b in zip(mine.wait, theirs.wait, strict=True)]
            mine.execution = [a + b for a, b in zip(mine.execution, theirs.execution, strict=True)]
            mine.wait_us += theirs.wait_us
            mine.execution_us += theirs.execution_us
            mine.outcomes.update(theirs.outcomes)

    def __bool__(self) -> bool:
        return bool(self._scripts)


def quantile(counts: Sequence[int], q: float) -> float | None:
    """The ``q`` quantile (seconds) of per-bucket ``counts`` (the last is +Inf); None if empty."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            if index >= len(LATENCY_BUCKETS):
                return LATENCY_BUCKETS[-1]  # in +Inf: the last finite bound, as Prometheus says
            lower = LATENCY_BUCKETS[index - 1] if index else 0.0
            return lower + (LATENCY_BUCKETS[index] - lower) * (rank - seen) / count
        seen += count
    return LATENCY_BUCKETS[-1]


def percentiles(counts: Sequence[int]) -> dict[str, float | None]:
    return {name: quantile(counts, q) for name, q in QUANTILES}


def _buckets() -> list[int]:
    return [0] * (len(LATENCY_BUCKETS) + 1)


@dataclass(slots=True)
class Minute:
    """One minute's counts (``start``: Unix seconds of its first second)."""

    start: int
    wait: list[int] = field(default_factory=_buckets)
    execution: list[int] = field(default_factory=_buckets)
    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    depth: int | None = None  # the governor's last depth sample in this minute

    @classmethod
    def parse(cls, start: int, fields: Mapping[bytes, bytes]) -> Minute:
        minute = cls(start)
        for raw_name, raw_value in fields.items():
            name, value = raw_name.decode(), _int(raw_value)
            if name == "depth":
                minute.depth = value
            elif name in minute.outcomes:
                minute.outcomes[name] = value
            elif name[:1] in ("w", "e") and name[1:].isdigit():
                index = int(name[1:]) - 1
                buckets = minute.wait if name[0] == "w" else minute.execution
                if 0 <= index < len(buckets):
                    buckets[index] = value
        return minute


def _int(raw: bytes) -> int:
    try:
        return int(raw)
    except ValueError:
        return 0  # damaged from outside: counts as nothing


@dataclass(slots=True)
class ScriptTotals:
    """One script's counts since the queue was created (the Prometheus families)."""

    wait: list[int] = field(default_factory=_buckets)
    wait_sum: float = 0.0  # seconds
    execution: list[int] = field(default_factory=_buckets)
    execution_sum: float = 0.0
    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))


def parse_totals(fields: Mapping[bytes, bytes]) -> dict[str, ScriptTotals]:
    """``KeySpace.metrics`` by script: fields ``w|S|i``, ``w|S|sum``, ``e|...``, ``o|S|outcome``."""
    scripts: dict[str, ScriptTotals] = {}
    for raw_name, raw_value in fields.items():
        kind, _, rest = raw_name.decode().partition("|")
        script, _, part = rest.rpartition("|")
        if kind not in ("w", "e", "o") or not script:
            continue
        totals = scripts.setdefault(script, ScriptTotals())
        value = _int(raw_value)
        if kind == "o":
            totals.outcomes[part] = value
        elif part == "sum":
            if kind == "w":
                totals.wait_sum = value / 1e6
            else:
                totals.execution_sum = value / 1e6
        elif part.isdigit() and 1 <= int(part) <= len(LATENCY_BUCKETS) + 1:
            (totals.wait if kind == "w" else totals.execution)[int(part) - 1] = value
    return scripts


class QueueTelemetry:
    """Reads the latency and throughput counts of one queue."""

    def __init__(self, connection: Calls, keys: KeySpace) -> None:
        self._connection = connection
        self._keys = keys

    async def redis_time(self) -> float:
        """Redis's clock (Unix seconds): the scripts number the minutes by it."""
        with translated_errors():
            seconds, micros = await self._connection.execute("TIME")
        return int(seconds) + int(micros) / 1e6

    async def minutes(self, count: int, now: float | None = None) -> list[Minute]:
        """The last ``count`` minutes, oldest first, the current (partial) one last."""
        current = int((await self.redis_time() if now is None else now) // 60)
        numbers = range(current - min(count, MINUTES_KEPT) + 1, current + 1)
        with translated_errors():
            replies = await self._connection.execute_many(
                *(("HGETALL", self._keys.metrics_minute(n)) for n in numbers)
            )
        return [
            Minute.parse(n * 60, dict(zip(reply[::2], reply[1::2], strict=True)))
            for n, reply in zip(numbers, replies, strict=True)
        ]

    async def totals(self) -> dict[str, ScriptTotals]:
        with translated_errors():
            reply = await self._connection.execute("HGETALL", self._keys.metrics)
        return parse_totals(dict(zip(reply[::2], reply[1::2], strict=True)))

    async def recent(self, now: float | None = None) -> dict[str, Any]:
        """``status``' ``latency`` (last 5 minutes) and ``throughput`` (per second)."""
        now = await self.redis_time() if now is None else now
        minutes = await self.minutes(6, now)
        last_five = minutes[1:]
        wait = [sum(column) for column in zip(*(m.wait for m in last_five), strict=True)]
        execution = [sum(column) for column in zip(*(m.execution for m in last_five), strict=True)]
        return {
            "latency": {"queue_wait": percentiles(wait), "execution": percentiles(execution)},
            "throughput": {
                **{f"{name}_per_s": per_second(minutes, name, 60, now) for name in OUTCOMES},
                **{f"{name}_per_s_5m": per_second(minutes, name, 300, now) for name in OUTCOMES},
            },
        }


def per_second(minutes: Sequence[Minute], outcome: str, seconds: int, now: float) -> float:
    """The rate of ``outcome`` over the last ``seconds`` (minute counts, the oldest prorated)."""
    since = now - seconds
    total = 0.0
    for minute in minutes:
        end = minute.start + 60
        if end <= since:
            continue
        share = 1.0 if minute.start >= since else (end - since) / 60
        total += minute.outcomes.get(outcome, 0) * share
    return round(total / seconds, 3)
