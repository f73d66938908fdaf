"""The Redis key schema: the one place that knows how keys are named.

Every key of one queue lives under ``<prefix>:{<queue>}:``. The braces are a
Redis Cluster hash tag, so all of a queue's keys share one slot and a Lua
script may touch any of them. A partitioned queue (``[redis] partitions``,
``actors/partitions.py``) is N such key spaces, one per hash tag; the
channels every consumer listens on (events, responses) stay the queue's, so
a listener never needs to know which partition a task is in. Scripts
receive the prefixes of per-task and per-worker keys (``task_prefix``,
``worker_prefix``) and append the id themselves; nothing else formats a key
string.
"""

from __future__ import annotations

import re

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class KeySpace:
    """Names of every key and channel of one queue."""

    __slots__ = (
        "backpressure",
        "base",
        "breaker",
        "breaker_settings",
        "dead",
        "delayed",
        "domains",
        "done_prefix",
        "epoch",
        "events",
        "gate_prefix",
        "gates",
        "governor_lock",
        "guard",
        "history",
        "history_count",
        "layout",
        "limits",
        "listeners",
        "metrics",
        "metrics_lock",
        "paced",
        "paused",
        "pending",
        "politeness",
        "rate_state",
        "reaper_lock",
        "running",
        "seq",
        "stats",
        "task_prefix",
        "wake",
        "worker_prefix",
        "workers",
    )

    def __init__(self, prefix: str, queue: str = "default", tag: str | None = None) -> None:
        """``tag``: the hash tag of one partition of ``queue`` (default: the queue's name)."""
        for field, value in (("redis.key_prefix", prefix), ("queue", queue)):
            if not _NAME.match(value):
                raise ValueError(f"{field} must match {_NAME.pattern}, got {value!r}")
        if tag is not None and not _NAME.match(tag):
            raise ValueError(f"partition tag must match {_NAME.pattern}, got {tag!r}")
        queue_base = f"{prefix}:{{{queue}}}:"
        base = f"{prefix}:{{{tag or queue}}}:"
        self.base = base
        self.pending = base + "pending"  # zset: id -> -priority * 1e12 + sequence
        self.running = base + "running"  # zset: id -> lease deadline (ms)
        self.delayed = base + "delayed"  # zset: id -> due time of a retry (ms)
        self.dead = base + "dead"  # zset: id -> time dead-lettered (ms)
        self.seq = base + "seq"  # string: FIFO sequence counter
        self.stats = base + "stats"  # hash: monotonic counters
        self.workers = base + "workers"  # zset: worker id -> last heartbeat (ms)
        self.task_prefix = base + "task:"  # hash per task
        self.worker_prefix = base + "worker:"  # hash per worker
        self.epoch = base + "epoch"  # string: set once; its absence means Redis lost its data
        self.backpressure = base + "backpressure"  # hash: state, depth, rate (the governor's)
        # Rate limits ("rl:"): a task over its limit waits in its key's gate.
        self.limits = base + "rl:limits"  # hash: rate key -> tasks/s, plus breaker settings
        self.rate_state = base + "rl:tat"  # hash: rate key -> GCRA theoretical arrival (ms)
        self.gates = base + "rl:gates"  # zset: rate key -> when its next task may start (ms)
        self.gate_prefix = base + "rl:gate:"  # zset per rate key: waiting ids -> queue score
        self.paused = base + "rl:paused"  # hash: rate key -> paused until (ms)
        self.breaker = base + "rl:failures"  # hash: rate key -> consecutive failures
        self.breaker_settings = base + "rl:breaker"  # hash: failures, cooldown_ms
        # Politeness: per-domain in-flight slots, windows, learned rates (lua/_lib.lua).
        self.domains = base + "rl:domains"  # zset: domain key -> last seen (ms); see domain()
        # Set: the domain keys whose hash holds a learned rate (the scripts build
        # the same name from `domains`; a domain key starts "domain:", so no
        # domain's hash has this name).
        self.paced = self.domains + ":paced"
        self.politeness = base + "rl:polite"  # hash: cap, cap:<rate key>, adaptive, ...
        self.reaper_lock = base + "lock:reaper"
        self.governor_lock = base + "lock:governor"
        self.metrics_lock = base + "lock:metrics"  # which /metrics exports the queue-wide metrics
        self.events = queue_base + "events"  # channel: JSON events (of every partition)
        # Stream: recent events, one entry per script call (_lib.lua derives it from the base).
        self.history = base + "events:history"
        self.history_count = self.history + ":count"  # string: events the history holds
        # Hash: latency buckets and outcomes per script, ever (_lib.lua, "Latency").
        self.metrics = base + "metrics"
        self.done_prefix = queue_base + "done:"  # channel per task: its final response
        self.wake = base + "wake"  # channel: tasks became claimable
        # Never written: every script names it last among its KEYS, so that on a
        # Redis Cluster a script is refused (TRYAGAIN) while its slot migrates,
        # before it runs, instead of failing half-way at a task key already moved
        # (docs/protocol.md, "Resharding").
        self.guard = base + "guard"
        # Hash: `partitions`, the count `supervisor start` laid the queue out over
        # when more than 1 (absent: one); actors/partitions.py.
        self.layout = base + "layout"
        # String with a TTL: on a Redis Cluster, someone listens to `events`
        # (actors/listeners.py); the scripts publish events only while it exists.
        self.listeners = base + "listeners"

    def task(self, request_id: str) -> str:
        return self.task_prefix + request_id

    def domain(self, rate_key: str) -> str:
        """The hash of one domain's politeness state (n, w, r, s, d, x; lua/_lib.lua).

        The scripts build the same name: ``domains`` + ``":"`` + the rate key.
        """
        return f"{self.domains}:{rate_key}"

    def metrics_minute(self, minute: int) -> str:
        """Hash of one minute's (Unix ms // 60000) latency buckets and outcomes, kept 65 min."""
        return f"{self.metrics}:{minute}"

    def worker(self, worker_id: str) -> str:
        return self.worker_prefix + worker_id

    def done(self, request_id: str) -> str:
        return self.done_prefix + request_id

    def script_context(self, *, on_cluster: bool = False) -> list[str]:
        """The ARGV[1..4] every Lua script starts with (see lua/_lib.lua).

        ``on_cluster``: the queue is on a Redis Cluster (marked by a ``{``
        before the events channel, which a channel name cannot start with).
        A node there counts only its own subscribers and forwards every
        PUBLISH to every master, so the scripts publish events only while a
        listener announces itself in ``listeners`` (actors/listeners.py).
        """
        events = "{" + self.events if on_cluster else self.events
        return [self.task_prefix, events, self.done_prefix, self.wake]
