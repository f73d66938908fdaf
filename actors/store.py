"""The typed façade over the Lua scripts in ``actors/lua``.

Each ``.lua`` file is one atomic operation; ``_lib.lua`` is prepended to all
of them. Scripts run with EVALSHA over one multiplexed connection
(``actors/multiplexed.py``), loaded again whenever Redis answers NOSCRIPT
(after a restart emptied its script cache). Every state change of a task
happens inside one of these scripts.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from importlib import resources
from typing import Any, NamedTuple

from actors import redis_errors
from actors.calls import Calls
from actors.connection import translated_errors
from actors.exceptions import (
    BackpressureException,
    DuplicateTaskException,
    NotReplicatedException,
    ScriptError,
)
from actors.keys import KeySpace
from actors.ratelimits import politeness_fields
from config.settings import EventsSettings, Settings

#: Scripts by name; a test checks that this matches the folder exactly.
SCRIPT_NAMES = (
    "backpressure",
    "cancel",
    "claim",
    "cleanup",
    "complete",
    "dlq_purge",
    "dlq_requeue",
    "enqueue",
    "fail",
    "heartbeat",
    "history",
    "lock",
    "mark_lost",
    "probe",
    "promote",
    "prune_domains",
    "recount_slots",
    "record_metrics",
    "release",
    "renew",
    "repair",
    "requeue_leases",
    "set_limits",
)

#: Dead letters one dlq_requeue call takes at most (a call never blocks Redis long).
DLQ_BATCH = 1000

#: A worker silent this long is forgotten by the cleanup.
WORKER_FORGET_MS = 5 * 60 * 1000


#: The longest error text stored for a failed attempt. It is kept in the task's
#: record, in up to 20 history entries, in the response and in an event: an
#: exception that carries a whole scraped page must not multiply into megabytes.
MAX_ERROR_CHARS = 4000


def bounded_error(error: str) -> str:
    """``error`` cut to ``MAX_ERROR_CHARS``, with a marker saying that it was and from what."""
    if len(error) <= MAX_ERROR_CHARS:
        return error
    marker = f" ... [truncated: the error had {len(error)} characters]"
    return error[: MAX_ERROR_CHARS - len(marker)] + marker


def script_source(name: str) -> str:
    """``_lib.lua``, then script ``name`` as a function whose return saves the call's history.

    Wrapped so that every ``return`` of the script, wherever it is, goes
    through ``save_history()`` (the call's events become one history entry).
    """
    folder = resources.files("actors") / "lua"
    body = (folder / f"{name}.lua").read_text()
    return (
        (folder / "_lib.lua").read_text()
        + "\nlocal function run_script()\n"
        + body
        + "\nend\nlocal result = run_script()\nsave_history()\nreturn result\n"
    )


class EnqueueItem(NamedTuple):
    """One task as the enqueue script takes it (a tuple: built once per task, cheaply)."""

    request_id: str
    request_json: str
    priority: int
    max_retries: int
    expires_in_ms: int  # 0 = never
    rate_keys: str  # space-separated rate keys ("" = none)


#: The KEYS of every script, in the order the script reads them: the wiring
#: between ``TaskStore`` and ``actors/lua``, declared once. A name is a
#: ``KeySpace`` attribute; a name in angle brackets is a key only the call
#: knows (a worker's hash, which lock), passed to ``script_keys`` by that name.
#: Each script's header repeats this list as ``-- KEYS[n] name`` lines, and
#: tests/test_script_wiring.py checks the two agree, so editing one without
#: the other fails a test instead of handing a script the wrong key.
SCRIPT_KEYS: dict[str, tuple[str, ...]] = {
    "backpressure": ("backpressure", "guard"),
    "cancel": ("pending", "delayed", "running", "stats", "domains", "politeness", "gates", "guard"),
    "claim": (
        "pending",
        "running",
        "delayed",
        "stats",
        "limits",
        "rate_state",
        "paused",
        "breaker",
        "gates",
        "breaker_settings",
        "dead",
        "domains",
        "politeness",
        "guard",
    ),
    "cleanup": ("dead", "workers", "guard"),
    "complete": (
        "running",
        "stats",
        "breaker",
        "paused",
        "breaker_settings",
        "gates",
        "domains",
        "politeness",
        "limits",
        "guard",
    ),
    "dlq_purge": ("dead", "guard"),
    "dlq_requeue": ("dead", "pending", "stats", "guard"),
    "enqueue": ("pending", "seq", "stats", "backpressure", "limits", "paused", "gates", "guard"),
    "fail": (
        "running",
        "delayed",
        "dead",
        "stats",
        "breaker",
        "paused",
        "breaker_settings",
        "domains",
        "politeness",
        "gates",
        "guard",
    ),
    "heartbeat": ("workers", "<worker>", "guard"),
    "history": ("history", "guard"),
    "lock": ("<lock>", "guard"),
    "mark_lost": ("workers", "guard"),
    "probe": ("stats", "guard"),
    "promote": ("pending", "delayed", "guard"),
    "prune_domains": ("domains", "rate_state", "paused", "breaker", "limits", "guard"),
    "recount_slots": ("running", "domains", "gates", "guard"),
    "record_metrics": ("metrics", "guard"),
    "release": (
        "running",
        "pending",
        "delayed",
        "stats",
        "paused",
        "domains",
        "politeness",
        "gates",
        "limits",
        "rate_state",
        "guard",
    ),
    "renew": ("running", "guard"),
    "repair": ("pending", "running", "delayed", "dead", "stats", "guard"),
    "requeue_leases": (
        "running",
        "pending",
        "dead",
        "stats",
        "domains",
        "politeness",
        "gates",
        "guard",
    ),
    "set_limits": ("limits", "breaker_settings", "politeness", "guard"),
}


def script_keys(keys: KeySpace, name: str, **call_keys: str) -> list[str]:
    """The KEYS of one call of script ``name``, in the order ``SCRIPT_KEYS`` declares.

    ``call_keys`` fills the names in angle brackets: ``script_keys(keys,
    "lock", lock=keys.reaper_lock)``.
    """
    return [
        call_keys[attr[1:-1]] if attr.startswith("<") else getattr(keys, attr)
        for attr in SCRIPT_KEYS[name]
    ]


def enqueue_call(
    keys: KeySpace, items: Sequence[EnqueueItem], high_watermark: int, stale_ms: int
) -> tuple[list[str], list[Any]]:
    """The KEYS and the script's own ARGV (after the shared context) of one enqueue call."""
    args: list[Any] = [keys.gate_prefix, high_watermark, stale_ms, len(items)]
    for item in items:
        args += item  # the six fields, in the order enqueue.lua reads them
    return script_keys(keys, "enqueue"), args


def _with_sha(source: str) -> tuple[str, str]:
    return hashlib.sha1(source.encode()).hexdigest(), source


#: name -> (SHA1, source) of every script, read once per process.
_SCRIPTS = {name: _with_sha(script_source(name)) for name in SCRIPT_NAMES}


@dataclass(frozen=True, slots=True)
class Lease:
    """A task leased to a worker; ``attempt`` is the lease's fencing token."""

    request_id: str
    attempt: int
    request_json: bytes
    queued: float = 0.0  # seconds it waited since it last became claimable
    partition: int = 0  # which partition of the queue holds the task (actors/partitions.py)


@dataclass(frozen=True, slots=True)
class ClaimResult:
    leases: list[Lease]
    wait_ms: int  # ms until the next retry is due; -1 if none


@dataclass(frozen=True, slots=True)
class Completion:
    request_id: str
    attempt: int
    data_json: str
    execution_time: float
    partition: int = 0  # of the queue: where the lease is (actors/partitions.py)


class FailOutcome(IntEnum):
    REFUSED = 0  # the lease was not held: the report is discarded
    RETRYING = 1
    DEAD_LETTERED = 2


class TaskStore:
    """One async method per Lua script, with typed arguments and results.

    Every method runs its script through ``_call``, which takes the script's
    KEYS from ``SCRIPT_KEYS``: no method names keys of its own.
    """

    def __init__(
        self,
        connection: Calls,
        keys: KeySpace,
        settings: Settings,
        durable: Calls | None = None,
        partition: int = 0,
    ) -> None:
        """``durable``: the connection of the durable writes (``[redis] durable_enqueue`` > 0);
        ``partition``: which partition of the queue ``keys`` are (its leases say so)."""
        self.partition = partition
        self._connection = connection
        self._durable = durable
        self._durable_replicas = settings.redis.durable_enqueue
        self._durable_ms = int(settings.redis.durable_timeout * 1000)
        self.keys = keys
        self._context = keys.script_context(on_cluster=settings.redis.cluster)
        # The KEYS of every script that needs none from the call, built once.
        self._script_keys = {
            name: script_keys(keys, name)
            for name, wiring in SCRIPT_KEYS.items()
            if not any(attr.startswith("<") for attr in wiring)
        }
        tasks = settings.tasks
        self._ttl_ms = int(tasks.result_ttl * 1000)
        self._backoff_ms = int(tasks.retry_backoff * 1000)
        self._backoff_max_ms = int(tasks.retry_backoff_max * 1000)
        self.lease_ms = int(settings.heartbeat.timeout * 1000)
        self._high_watermark = settings.backpressure.high_watermark
        self._stale_ms = int(settings.backpressure.stale_after * 1000)

    async def _run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        sha, source = _SCRIPTS[name]
        with translated_errors():
            return await self._connection.evalsha(sha, source, keys, [*self._context, *args])

    async def _run_durably(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run script ``name``, then ``WAIT`` until ``durable_enqueue`` replicas have it.

        On a connection of its own: WAIT holds up every later command on its
        connection until it returns, and covers every write sent before it
        on that connection, and only on that server. So a reconnect between
        the script and the WAIT (the old master demoted after a failover, its
        clients killed: the WAIT would be retried on the new master, where
        it proves nothing about the write) counts as not replicated, and so
        does a WAIT the server refuses (a demoted master, now a replica).
        Raises ``NotReplicatedException`` when too few replicas acknowledged
        within ``durable_timeout``: the caller retries, and the script runs
        again on the server that is master now.
        """
        if self._durable is None:
            return await self._run(name, keys, args)
        sha, source = _SCRIPTS[name]
        durable = self._durable
        with translated_errors():
            connection_before = durable.reconnects
            reply = await durable.evalsha(sha, source, keys, [*self._context, *args])
            try:
                # On a cluster: the master the script wrote to (its first key's).
                waited = await durable.execute_at(
                    keys[0], "WAIT", self._durable_replicas, self._durable_ms
                )
            except redis_errors.ResponseError:
                waited = 0
        acknowledged = int(waited) if durable.reconnects == connection_before else 0
        if acknowledged < self._durable_replicas:
            raise NotReplicatedException(
                self._durable_replicas, acknowledged, self._durable_ms / 1000
            )
        return reply

    async def _call(self, name: str, args: Sequence[Any], **call_keys: str) -> Any:
        """Run script ``name`` with its declared KEYS (``SCRIPT_KEYS``) and its own ARGV."""
        keys = script_keys(self.keys, name, **call_keys) if call_keys else self._script_keys[name]
        return await self._run(name, keys, args)

    async def enqueue(self, items: Sequence[EnqueueItem]) -> int:
        """Store tasks, all or none; returns how many were new.

        Raises ``DuplicateTaskException`` or ``BackpressureException`` (nothing written),
        or, with ``durable_enqueue``, ``NotReplicatedException`` (written; retry it).
        """
        keys, args = enqueue_call(self.keys, items, self._high_watermark, self._stale_ms)
        reply = await self._run_durably("enqueue", keys, args)
        code, value = int(reply[0]), int(reply[1])
        if code == 0:
            raise DuplicateTaskException(items[value - 1].request_id)
        if code == 2:
            state = reply[2].decode()
            raise BackpressureException(value / 1000, f"queue is {state} by backpressure")
        return value

    async def claim(self, worker_id: str, count: int, promote_limit: int = 100) -> ClaimResult:
        """Lease up to ``count`` tasks, after promoting at most ``promote_limit`` due retries."""
        reply = await self._call(
            "claim",
            [
                worker_id,
                count,
                self.lease_ms,
                promote_limit,
                self._ttl_ms,
                self.keys.gate_prefix,
            ],
        )
        leases = [
            Lease(
                reply[i].decode(),
                int(reply[i + 1]),
                reply[i + 2],
                int(reply[i + 3]) / 1000,
                self.partition,
            )
            for i in range(1, len(reply), 4)
        ]
        return ClaimResult(leases, int(reply[0]))

    async def promote_due(self, limit: int = 1000) -> int:
        """Move retries whose backoff is over back to pending; returns how many (promote.lua).

        Every claim promotes as well; the reaper calls this too, so due
        retries reach pending even while no worker claims (all busy, or none).
        """
        return int(await self._call("promote", [limit]))

    async def complete(self, worker_id: str, results: Sequence[Completion]) -> list[bool]:
        args: list[Any] = [worker_id, self._ttl_ms, len(results)]
        for r in results:
            args += [r.request_id, r.attempt, r.data_json, repr(r.execution_time)]
        codes = await self._run_durably("complete", self._script_keys["complete"], args)
        return [code == 1 for code in codes]

    async def fail(
        self, worker_id: str, request_id: str, attempt: int, error: str, *, permanent: bool
    ) -> tuple[FailOutcome, float]:
        """Report a failed attempt; returns the outcome and the retry delay in seconds.

        ``error`` is stored cut to ``MAX_ERROR_CHARS`` (see :func:`bounded_error`).
        """
        code, delay_ms = await self._call(
            "fail",
            [
                worker_id,
                request_id,
                attempt,
                bounded_error(error),
                1 if permanent else 0,
                self._backoff_ms,
                self._backoff_max_ms,
                random.random(),
                self._ttl_ms,
            ],
        )
        return FailOutcome(code), delay_ms / 1000

    async def renew(self, worker_id: str, leases: Sequence[tuple[str, int]]) -> list[str]:
        """Extend leases; returns the ids whose lease is no longer held."""
        args: list[Any] = [worker_id, self.lease_ms, len(leases)]
        for request_id, attempt in leases:
            args += [request_id, attempt]
        lost = await self._call("renew", args)
        return [item.decode() for item in lost]

    async def release(
        self,
        worker_id: str,
        leases: Sequence[tuple[str, int]],
        *,
        reason: str,
        delay: float = 0.0,
        pause_key: str = "",
        pause: float = 0.0,
    ) -> int:
        """Hand leased tasks back without burning an attempt.

        ``delay`` holds them back before they are claimable again;
        ``pause_key`` pauses that rate key for ``pause`` seconds on every host.
        """
        args: list[Any] = [
            worker_id,
            int(delay * 1000),
            reason,
            pause_key,
            int(pause * 1000),
            len(leases),
        ]
        for request_id, attempt in leases:
            args += [request_id, attempt]
        return int(await self._call("release", args))

    async def requeue_expired(self, limit: int = 1000) -> tuple[int, int]:
        """Take back leases past their deadline; returns (requeued, dead-lettered)."""
        return await self._requeue_leases("expired", str(limit))

    async def requeue_worker(self, worker_id: str) -> tuple[int, int]:
        """Take back every lease of a worker known to be dead."""
        return await self._requeue_leases("worker", worker_id)

    async def _requeue_leases(self, selector: str, target: str) -> tuple[int, int]:
        requeued, dead = await self._call("requeue_leases", [selector, target, self._ttl_ms])
        return int(requeued), int(dead)

    async def cancel(
        self, request_id: str, reason: str = "cancelled", lease: tuple[str, int] | None = None
    ) -> bool:
        """Cancel a task not yet finished; with ``lease`` (worker, attempt) only while it is held.

        An operator's cancel takes no lease; a worker reporting its own task
        cancelled does, so a stale worker cannot cancel the new holder's run.
        """
        worker, attempt = lease if lease is not None else ("", 0)
        return bool(
            await self._call(
                "cancel",
                [request_id, reason, self._ttl_ms, self.keys.gate_prefix, worker, attempt],
            )
        )

    async def scan_tasks(self, cursor: int, count: int) -> tuple[int, list[str]]:
        """One SCAN step over the task records; returns the next cursor (0: done) and ids."""
        prefix = self.keys.task_prefix
        with translated_errors():
            next_cursor, found = await self._connection.execute_at(
                self.keys.stats, "SCAN", cursor, "MATCH", prefix + "*", "COUNT", count
            )
        return int(next_cursor), [key.decode()[len(prefix) :] for key in found]

    async def repair(self, request_ids: Sequence[str]) -> list[str]:
        """Put records that sit in no queue set back where their status says (repair.lua)."""
        repaired = await self._call("repair", [self.keys.gate_prefix, self._ttl_ms, *request_ids])
        return [item.decode() for item in repaired]

    async def dlq_requeue(
        self, request_ids: Sequence[str] | None, limit: int = DLQ_BATCH
    ) -> tuple[int, bool, int]:
        """Requeue the given dead letters, or up to ``limit`` of the oldest when None.

        Returns how many were requeued, whether the high watermark stopped the
        call, and how many ids it took off the dead-letter set (0: none left).
        """
        selection = ["all", limit] if request_ids is None else ["ids", *request_ids]
        requeued, full, taken = await self._call("dlq_requeue", [self._high_watermark, *selection])
        return int(requeued), bool(full), int(taken)

    async def missing_rights(self, commands: Sequence[str]) -> list[str]:
        """Which of ``commands`` (names as in actors/rights.py) this Redis user may not run.

        Runs probe.lua, which tries each with harmless arguments. A user that
        may not even load or run a script gets ``["EVALSHA", "SCRIPT|LOAD"]``.
        """
        try:
            missing = await self._call("probe", list(commands))
        except ScriptError as exc:
            if "noperm" in str(exc).lower() or "permission" in str(exc).lower():
                return ["EVALSHA", "SCRIPT|LOAD"]
            raise
        return [name.decode() for name in missing]

    async def dlq_purge(self) -> int:
        return int(await self._call("dlq_purge", []))

    async def cleanup(self) -> tuple[int, int]:
        """Retention; returns (dead letters removed, workers forgotten)."""
        removed, forgotten = await self._call(
            "cleanup", [self._ttl_ms, WORKER_FORGET_MS, self.keys.worker_prefix]
        )
        return int(removed), int(forgotten)

    async def heartbeat(
        self, worker_id: str, fields: dict[str, str | int | float], *, register: bool = False
    ) -> int:
        """Record a worker's liveness (Redis clock); returns the heartbeat time in ms."""
        args: list[Any] = [worker_id, "register" if register else "beat", len(fields)]
        for name, value in fields.items():
            args += [name, value]
        return int(await self._call("heartbeat", args, worker=self.keys.worker(worker_id)))

    async def mark_lost(self, timeout: float) -> list[str]:
        """Flip silent workers to inactive; returns the ones newly lost."""
        lost = await self._call("mark_lost", [int(timeout * 1000), self.keys.worker_prefix])
        return [item.decode() for item in lost]

    async def hold_lock(self, key: str, owner: str, lease: float) -> bool:
        """Take or renew a singleton lease; True while ``owner`` holds it."""
        return bool(await self._call("lock", [owner, int(lease * 1000), "acquire"], lock=key))

    async def release_lock(self, key: str, owner: str) -> None:
        await self._call("lock", [owner, 0, "release"], lock=key)

    async def set_limits(self, settings: Settings, share: int = 1) -> int:
        """Publish ``[rate_limits]``, ``[circuit_breaker]`` and ``[politeness]`` for every host.

        ``share``: of how many partitions this is one. A domain's tasks are
        all in one partition, so its limit applies whole there; the tasks of
        a script are spread over all, so each partition gets ``1/share`` of a
        ``script:`` key's rate (their sum is the configured rate).
        """
        breaker = settings.circuit_breaker
        args: list[Any] = [
            breaker.failures,
            int(breaker.cooldown * 1000),
            len(settings.rate_limits),
        ]
        for key, rate in settings.rate_limits.items():
            args += [key, rate / share if key.startswith("script:") else rate]
        policy = politeness_fields(settings.politeness)
        args.append(len(policy))
        for name, value in policy.items():
            args += [name, value]
        return int(await self._call("set_limits", args))

    async def keep_history(self, events: EventsSettings, share: int = 1) -> int:
        """Create or trim the event history as ``[events]`` says (delete it at 0); its length.

        ``share``: of how many partitions this is one; each keeps its share of
        ``history`` events (at least one), so the queue keeps about ``history``.
        """
        age_ms = int(events.history_max_age * 1000)
        kept = -(-events.history // share)  # rounded up: 0 stays 0 (off)
        return int(await self._call("history", [kept, age_ms]))

    async def record_metrics(self, totals: Mapping[str, int], minute: Mapping[str, int]) -> int:
        """Add counts to the metrics hash and to this minute's (``TelemetryBatch``)."""
        args: list[Any] = [len(totals)]
        for name, count in totals.items():
            args += [name, count]
        args.append(len(minute))
        for name, count in minute.items():
            args += [name, count]
        return int(await self._call("record_metrics", args))

    async def recount_slots(self) -> int:
        """Set each domain's in-flight count from the running tasks; returns how many were wrong."""
        return int(await self._call("recount_slots", []))

    async def prune_domains(
        self, cursors: str, count: int, decay: float, forget: float
    ) -> tuple[str, int]:
        """One step of the walk over per-domain state (``prune_domains.lua``).

        Returns the cursors to go on from and how many domains were forgotten.
        """
        cursors_after, forgotten = await self._call(
            "prune_domains", [cursors, count, int(decay * 1000), int(forget * 1000)]
        )
        return cursors_after.decode(), int(forgotten)

    async def publish_backpressure(self, state: str, depth: int, rate: float, drain: float) -> str:
        """Publish the governor's state in this partition; returns the previous one ("" if none).

        ``rate``: the enqueues per second this partition admits while throttled.
        """
        home = 1 if self.partition == 0 else 0
        previous = await self._call("backpressure", [state, depth, repr(rate), repr(drain), home])
        return str(previous.decode())
