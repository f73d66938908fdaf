"""The process tree of ``supervisor start``: worker pool plus singleton actors.

One main loop owns every decision. Its inbox receives commands (from signal
handlers, `signals.py`) and child exits (from the process backend); timers
come from the restart policy (backoff, promotion) and from stop deadlines.
A separate health loop reads Redis each tick: it kills workers whose
heartbeat went stale while their process lives on, feeds the systemd
watchdog while heartbeats advance (and through a Redis outage, however
long), sends READY=1 once the pool is up, keeps STATUS= current and checks
that Redis still holds our data.

Children are named for the restart policy: ``worker-<slot>`` and one name
per singleton kind. Each start of a child (an incarnation) gets a fresh actor
id, so a worker's Redis records and leases belong to exactly one process,
and a dead incarnation's leases can be taken back at once by its id.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import socket
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

from actors.connection import translated_errors
from actors.exceptions import QueueConnectionException, QueueError
from actors.exit_codes import ChildExit, CliExit
from actors.queue import RedisQueue, TaskManager, WorkerMonitor, time_ms
from actors.reachability import RedisReachability
from actors.runtime import ActorSpec
from actors.worker import AFTER_DRAIN
from config.settings import ConfigError, Settings
from supervisor.metrics import RESTARTS
from supervisor.notify import ProgressWatchdog, SystemdNotifier
from supervisor.process_backend import ChildProcess, ProcessBackend
from supervisor.redis_checks import EpochGuard
from supervisor.reload import keep_restart_only, replaces
from supervisor.restart_policy import Action, Fatal, GiveUp, RestartPolicy, Spawn
from supervisor.signals import Command

logger = logging.getLogger(__name__)

WORKER = "worker"
SINGLETON_KINDS: tuple[str, ...] = ("heartbeat", "reaper", "governor")
"""Actors that run once per supervisor, started in this order after the workers."""

EXIT_GAVE_UP = 1
"""Exit status when restart intensity is exceeded (systemd's Restart=on-failure acts on it)."""

DRAIN_GRACE = AFTER_DRAIN + 2.0
"""A draining child still alive this long after ``drain_timeout`` is SIGKILLed: longer
than a worker's own bound on its hand-back and final flush, which a SIGKILL at
``drain_timeout + 5`` used to cut (their tasks then ran twice)."""
STOP_NOW_GRACE = 3.0
"""How long a stop-at-once waits for children before SIGKILL."""
REAP_TIMEOUT = 5.0
"""How long SIGKILLed children may take to be reaped before the tree stops waiting."""
READY_TIMEOUT = 30.0
"""READY=1 is sent after this long even if some worker has not registered yet."""
STARTUP_TICK = 0.1
"""Health tick period until READY=1, so readiness is reported promptly."""
OUTAGE_LOG_EVERY = 30.0
"""During a Redis outage, one log line this often (seconds)."""
BACKGROUND_TIMEOUT = 5.0
"""How long the tree waits for outstanding requeues and events when it exits."""


def worker_name(slot: int) -> str:
    return f"{WORKER}-{slot}"


def kind_of(name: str) -> str:
    """``worker-3`` -> ``worker``; a singleton's name is its kind."""
    return WORKER if name.startswith(WORKER + "-") else name


@dataclass(eq=False)
class _Child:
    """One incarnation: a started process of a named child."""

    name: str
    spec: ActorSpec
    process: ChildProcess
    retiring: bool = False
    """Replaced (rolled) or removed (shrunk): not tracked by the restart policy."""
    stop_sent: bool = False
    kill_at: float | None = None
    """When to SIGKILL it if it has not exited by then."""


@dataclass(frozen=True, slots=True)
class _Exited:
    actor_id: str
    code: int


_Event = Command | _Exited


class ProcessTree:
    """Runs and supervises the actor processes until drained, stopped or given up."""

    def __init__(
        self,
        settings: Settings,
        queue: RedisQueue,
        backend: ProcessBackend,
        epoch: EpochGuard,
        *,
        load_settings: Callable[[], Settings],
        notifier: SystemdNotifier,
    ) -> None:
        """``queue`` is connected; ``load_settings`` re-reads the config file on RELOAD."""
        self._settings = settings
        self._settings_json = settings.to_json()
        self._queue = queue
        self._monitor = WorkerMonitor(queue)
        self._tasks = TaskManager(queue)
        self._backend = backend
        self._epoch = epoch
        self._load_settings = load_settings
        self._notifier = notifier
        sup = settings.supervisor
        self._policy = RestartPolicy(sup.max_restarts, sup.restart_window, sup.restart_backoff_max)
        self._inbox: asyncio.Queue[_Event] = asyncio.Queue()
        self._children: dict[str, _Child] = {}  # every running incarnation, by actor id
        self._current: dict[str, _Child] = {}  # the policy-tracked incarnation, by name
        self._workers = 0  # pool size: slots 0..n-1
        self._rolls: deque[str] = deque()
        self._incarnations = 0
        self._id_prefix = f"{socket.gethostname()}-{os.getpid()}"
        self._exit_code: int | None = None
        self._abandon_at: float | None = None
        self._previous_ids: dict[str, str] = {}  # name -> actor id of its last incarnation
        self._background: set[asyncio.Task[None]] = set()
        self._ready = False
        self._ready_by = 0.0
        self._status = ""
        watchdog_period = notifier.watchdog_interval()
        self._watchdog = ProgressWatchdog(watchdog_period) if watchdog_period else None
        self._health_ticks = 0
        self._reachability = RedisReachability()
        self._outage_since = self._outage_logged = 0.0  # loop time
        self._tick_started: float | None = None  # loop time the running health check began
        self._finished = asyncio.Event()

    # -- public ---------------------------------------------------------------

    def command(self, command: Command) -> None:
        """Queue a command for the main loop; safe to call from a signal handler's callback."""
        self._inbox.put_nowait(command)

    @property
    def worker_count(self) -> int:
        """The current pool size (after GROW/SHRINK/RELOAD)."""
        return self._workers

    async def run(self) -> int:
        """Start the pool and supervise it; returns the exit status of ``supervisor start``.

        On every way out (a return, an exception, cancellation) no child is left alive.
        """
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.TaskGroup() as group:
                health = group.create_task(self._health_loop(), name="supervisor-health")
                if self._watchdog is not None:
                    group.create_task(
                        self._outage_watchdog(self._watchdog), name="supervisor-watchdog"
                    )
                self._start(loop.time())
                code = await self._supervise()
                # Both: on Python 3.11 a cancellation that lands while redis-py's
                # internal asyncio.wait_for completes is lost; the flag still ends it.
                self._finished.set()
                health.cancel()
            return code
        finally:
            self._kill_all()
            if self._background:
                await asyncio.wait(self._background, timeout=BACKGROUND_TIMEOUT)

    # -- main loop ------------------------------------------------------------

    def _start(self, now: float) -> None:
        logger.info(
            "감독 프로세스 시작: 워커 %d개, 단일 액터 %s",
            self._settings.worker.processes,
            ", ".join(SINGLETON_KINDS),
        )
        self._resize(self._settings.worker.processes, now)
        for kind in SINGLETON_KINDS:
            self._spawn(kind, now)
        self._ready_by = now + READY_TIMEOUT

    async def _supervise(self) -> int:
        loop = asyncio.get_running_loop()
        while self._exit_code is None or self._children:
            now = loop.time()
            if self._abandon_at is not None and now >= self._abandon_at:
                logger.error(
                    "SIGKILL 후에도 회수되지 않은 자식 프로세스: %s",
                    ", ".join(f"{c.spec.actor_id}(pid={c.process.pid})" for c in self._all()),
                )
                break
            event: _Event | None = None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(self._next_deadline()):
                    event = await self._inbox.get()
            if isinstance(event, _Exited):
                self._on_exit(event, loop.time())
            elif event is not None:
                await self._on_command(event)
            self._on_time(loop.time())
        assert self._exit_code is not None
        logger.info("감독 프로세스 종료 (종료 코드 %d)", self._exit_code)
        return self._exit_code

    def _next_deadline(self) -> float | None:
        deadlines = [self._policy.next_deadline(), self._abandon_at]
        deadlines += [child.kill_at for child in self._all()]
        return min((d for d in deadlines if d is not None), default=None)

    def _on_time(self, now: float) -> None:
        for action in self._policy.tick(now):
            self._apply(action, now)
        for child in self._all():
            if child.kill_at is not None and now >= child.kill_at:
                logger.warning(
                    "%s (pid=%d) 가 제때 종료되지 않아 강제 종료합니다",
                    child.spec.actor_id,
                    child.process.pid,
                )
                child.kill_at = None
                self._backend.kill(child.process)
        self._advance_roll(now)

    def _on_exit(self, event: _Exited, now: float) -> None:
        child = self._children.pop(event.actor_id)
        if child.spec.kind == WORKER:
            # Its leases are orphaned now: redeliver them at once, not after expiry.
            self._in_background(self._requeue(child.spec.actor_id))
        if child.retiring:
            logger.info("%s 종료 (교체/축소, 종료 코드 %d)", child.spec.actor_id, event.code)
            return
        del self._current[child.name]
        if child.stop_sent and event.code == ChildExit.OK:
            logger.info("%s 정상 종료", child.spec.actor_id)
        else:
            logger.warning(
                "%s (pid=%d) 종료, 종료 코드 %d",
                child.spec.actor_id,
                child.process.pid,
                event.code,
            )
        for action in self._policy.exited(child.name, event.code, now):
            self._apply(action, now)

    def _apply(self, action: Action, now: float) -> None:
        if isinstance(action, Spawn):
            self._spawn(action.child, now)
        elif isinstance(action, Fatal):
            logger.error("%s — 설정 오류이므로 재시작하지 않고 전체를 종료합니다", action.reason)
            self._begin_stop(CliExit.USAGE, now)
        elif isinstance(action, GiveUp):
            logger.error("재시작 한도 초과: %s — 모든 액터를 멈추고 종료합니다", action.reason)
            self._begin_stop(EXIT_GAVE_UP, now)

    async def _on_command(self, command: Command) -> None:
        now = asyncio.get_running_loop().time()
        if command is Command.STOP_NOW:
            logger.warning("즉시 종료: 실행 중인 작업을 바로 반환합니다")
            self._begin_stop(CliExit.OK, now, at_once=True)
        elif self._exit_code is not None:
            logger.info("종료 중이므로 %s 명령을 무시합니다", command.value)
        elif command is Command.DRAIN:
            logger.info(
                "드레인 시작: 새 작업을 받지 않고 실행 중인 작업을 최대 %.0f초 기다립니다",
                self._settings.supervisor.drain_timeout,
            )
            self._begin_stop(CliExit.OK, now)
        elif command is Command.RELOAD:
            await self._reload()
        elif command is Command.GROW:
            logger.info("워커 프로세스 추가: %d → %d", self._workers, self._workers + 1)
            self._resize(self._workers + 1, now)
        elif self._workers == 0:  # SHRINK
            logger.info("워커 프로세스가 이미 0개입니다")
        else:
            logger.info("워커 프로세스 축소: %d → %d", self._workers, self._workers - 1)
            self._resize(self._workers - 1, now)

    # -- children -------------------------------------------------------------

    def _spawn(self, name: str, now: float) -> None:
        self._incarnations += 1
        spec = ActorSpec(
            kind=kind_of(name),
            actor_id=f"{self._id_prefix}-{name}-{self._incarnations}",
            settings_json=self._settings_json,
            parent_pid=os.getpid(),
        )
        try:
            process = self._backend.spawn(spec, functools.partial(self._post_exit, spec.actor_id))
        except OSError as exc:
            logger.error("%s 프로세스를 시작할 수 없습니다: %s", spec.actor_id, exc)
            self._policy.spawned(name, now)
            for action in self._policy.exited(name, ChildExit.CRASH, now):
                self._apply(action, now)
            return
        child = _Child(name, spec, process)
        self._children[spec.actor_id] = child
        self._current[name] = child
        self._policy.spawned(name, now)
        logger.info("%s 시작 (pid=%d)", spec.actor_id, process.pid)
        previous = self._previous_ids.get(name)
        self._previous_ids[name] = spec.actor_id
        if previous is not None:
            RESTARTS.labels(spec.kind).inc()
            self._in_background(self._announce_restart(previous, spec.actor_id, spec.kind))

    def _post_exit(self, actor_id: str, code: int) -> None:
        self._inbox.put_nowait(_Exited(actor_id, code))

    def _resize(self, target: int, now: float) -> None:
        while self._workers < target:
            self._workers += 1
            self._spawn(worker_name(self._workers - 1), now)
        while self._workers > target:
            self._workers -= 1
            name = worker_name(self._workers)
            self._policy.forget(name)
            self._previous_ids.pop(name, None)
            with contextlib.suppress(ValueError):
                self._rolls.remove(name)
            child = self._current.pop(name, None)
            if child is not None:
                self._retire(child, now)

    def _retire(self, child: _Child, now: float) -> None:
        """Drain an incarnation that the policy no longer tracks."""
        child.retiring = True
        self._stop(child, now + self._settings.supervisor.drain_timeout + DRAIN_GRACE)

    def _stop(self, child: _Child, kill_at: float, *, at_once: bool = False) -> None:
        if at_once and child.spec.kind == WORKER:
            self._backend.signal(child.process, signal.SIGUSR1)
        elif not child.stop_sent:
            self._backend.signal(child.process, signal.SIGTERM)
        child.stop_sent = True
        child.kill_at = kill_at if child.kill_at is None else min(child.kill_at, kill_at)

    def _begin_stop(self, code: int, now: float, *, at_once: bool = False) -> None:
        first = self._exit_code is None
        if first:
            self._exit_code = code
            self._notifier.stopping()
        self._rolls.clear()
        for name in self._policy.states():
            self._policy.stopping(name)
        grace = STOP_NOW_GRACE if at_once else self._settings.supervisor.drain_timeout + DRAIN_GRACE
        for child in self._all():
            self._stop(child, now + grace, at_once=at_once)
        abandon_at = now + grace + REAP_TIMEOUT
        self._abandon_at = min(abandon_at, self._abandon_at or abandon_at)
        self._set_status(f"stopping: {len(self._children)} actors left")

    def _kill_all(self) -> None:
        for child in self._all():
            if child.process.is_alive():
                logger.warning("%s (pid=%d) 강제 종료", child.spec.actor_id, child.process.pid)
                self._backend.kill(child.process)

    def _all(self) -> list[_Child]:
        return list(self._children.values())

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run Redis work without holding up the main loop (Redis may be slow or down)."""
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _requeue(self, actor_id: str) -> None:
        try:
            requeued, dead = await self._queue.store.requeue_worker(actor_id)
        except QueueConnectionException as exc:
            logger.warning(
                "%s 의 작업을 바로 되돌리지 못함 (임대 만료 후 재전달): %s", actor_id, exc
            )
            return
        if requeued or dead:
            logger.warning(
                "%s 가 남긴 작업 재전달: %d건 대기열로, %d건 DLQ로", actor_id, requeued, dead
            )

    async def _announce_restart(self, previous: str, current: str, kind: str) -> None:
        """Publish ``worker.restarted`` on the event stream (``supervisor events``).

        Every actor kind, not only workers (``kind`` says which): a reaper or
        governor that keeps restarting is as telling as a worker. It changes
        no state in Redis, so it is kept in the history (when that is on) by
        this call, not by a script.
        """
        event = {
            "event": "worker.restarted",
            "ts": time.time(),
            "worker_id": current,
            "previous_worker_id": previous,
            "kind": kind,
        }
        try:
            text, keys = json.dumps(event), self._queue.keys
            with translated_errors():
                await self._queue.connection.execute("PUBLISH", keys.events, text)
                if await self._queue.connection.execute("EXISTS", keys.history):
                    await self._queue.connection.execute_many(
                        ("XADD", keys.history, "*", "n", 1, "e", text),
                        ("INCRBY", keys.history_count, 1),
                    )
        except QueueConnectionException as exc:
            logger.debug("worker.restarted 이벤트 발행 실패: %s", exc)

    # -- reload and rolling replacement --------------------------------------

    async def _reload(self) -> None:
        self._notifier.reloading()
        logger.info("설정 파일 다시 읽는 중")
        try:
            loaded = await asyncio.to_thread(self._load_settings)
        except ConfigError as exc:
            logger.error("새 설정이 올바르지 않아 기존 설정을 유지합니다: %s", exc)
        else:
            self._apply_settings(loaded, asyncio.get_running_loop().time())
        self._notifier.ready()

    def _apply_settings(self, loaded: Settings, now: float) -> None:
        settings, waiting = keep_restart_only(self._settings, loaded)
        for key in waiting:
            logger.warning("%s 변경은 다음 재시작 때 적용됩니다", key)
        changed = [
            name for name in self._current if replaces(self._settings, settings, kind_of(name))
        ]
        self._settings = settings
        self._settings_json = settings.to_json()
        self._in_background(self._publish_limits())
        if changed:
            self._rolls = deque(changed)
            logger.info("바뀐 설정을 적용하려고 액터 %d개를 하나씩 교체합니다", len(self._rolls))
        if settings.worker.processes != self._workers:
            logger.info("워커 프로세스 수 변경: %d → %d", self._workers, settings.worker.processes)
            self._resize(settings.worker.processes, now)
        logger.info("설정 다시 읽기 완료")

    async def _publish_limits(self) -> None:
        try:
            await self._queue.publish_settings(self._settings)
        except QueueConnectionException as exc:
            logger.error("새 속도 제한을 Redis에 게시하지 못함: %s", exc)

    def _advance_roll(self, now: float) -> None:
        """Replace the next child once no replaced one is still draining."""
        if self._exit_code is not None or any(child.retiring for child in self._all()):
            return
        while self._rolls:
            name = self._rolls.popleft()
            child = self._current.pop(name, None)
            if child is None:
                continue  # in backoff: its next start uses the new settings anyway
            self._retire(child, now)
            self._spawn(name, now)
            return

    # -- health ---------------------------------------------------------------

    async def _health_loop(self) -> None:
        while not self._finished.is_set():
            try:
                await self._health_tick()
            except QueueError as exc:
                self._in_outage(exc)
            except Exception:
                # The tree must outlive any fault of a health check.
                logger.exception("상태 확인 중 예기치 않은 오류 (워치독 신호 보류)")
                self._reachability.failed()
            period = self._settings.heartbeat.interval
            if self._watchdog is not None:
                period = min(period, self._notifier.watchdog_interval() or period)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(period if self._ready else min(period, STARTUP_TICK)):
                    await self._finished.wait()

    def _in_outage(self, error: QueueError) -> None:
        """A health check could not reach Redis: keep the workers, keep systemd informed.

        The workers ride the outage out by themselves (their loops back off
        and reconnect), so nothing is restarted; ``_outage_watchdog`` keeps
        pinging systemd meanwhile.
        """
        now = asyncio.get_running_loop().time()
        if self._reachability.failed():
            self._outage_since = self._outage_logged = now
            logger.warning("Redis에 연결할 수 없음: 워커를 유지하고 복구를 기다립니다 (%s)", error)
        elif now - self._outage_logged >= OUTAGE_LOG_EVERY:
            self._outage_logged = now
            logger.warning(
                "Redis 연결 끊김 %.0f초째: 워커를 유지하고 복구를 기다립니다 (%s)",
                now - self._outage_since,
                error,
            )
        self._set_status(f"Redis 연결 끊김 {now - self._outage_since:.0f}초째, 워커 유지 중")

    async def _outage_watchdog(self, watchdog: ProgressWatchdog) -> None:
        """Ping the watchdog through a Redis outage, however the health check is held.

        A check against a blackholed Redis waits for its timeouts (tens of
        seconds); a failed one or one held longer than ``heartbeat.interval``
        both mean Redis is away, not that this loop is stuck.
        """
        period = self._notifier.watchdog_interval() or 1.0
        loop = asyncio.get_running_loop()
        while not self._finished.is_set():
            now = loop.time()
            held = self._tick_started is not None and (
                now - self._tick_started > self._settings.heartbeat.interval
            )
            if (self._reachability.failing or held) and watchdog.should_ping_in_outage(now):
                self._notifier.watchdog()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(period / 2):
                    await self._finished.wait()

    async def _health_tick(self) -> None:
        loop = asyncio.get_running_loop()
        started = self._tick_started = loop.time()
        try:
            await self._health_check(loop, started)
        finally:
            self._tick_started = None

    async def _health_check(self, loop: asyncio.AbstractEventLoop, started: float) -> None:
        records = {r["worker_id"]: r for r in await self._monitor.get_active_workers()}
        with translated_errors():
            redis_now = time_ms(await self._queue.connection.execute("TIME")) / 1000
        await self._epoch.check()
        workers = [c for c in self._current.values() if c.spec.kind == WORKER]
        heartbeat = self._settings.heartbeat
        self._reachability.saw_reconnects(self._queue.connection.reconnects)
        self._reachability.answered(loop.time() - started, loop.time(), heartbeat.interval)
        if self._reachability.may_judge(loop.time(), heartbeat.timeout):
            self._kill_stale(workers, records, redis_now)
        self._health_ticks += 1
        now = loop.time()
        if self._watchdog is not None:
            beats = [
                records[c.spec.actor_id]["last_heartbeat"]
                for c in workers
                if c.spec.actor_id in records
            ]
            # No workers configured: the tick itself (a Redis round trip) is the progress.
            progress = self._health_ticks if self._workers == 0 else round(sum(beats) * 1000)
            self._watchdog.observe(progress, now)
            if self._watchdog.should_ping(now):
                self._notifier.watchdog()
        if not self._ready and self._exit_code is None:
            self._check_ready(workers, records, now)
        if self._exit_code is None:
            pending = (await self._tasks.queue_stats())["pending"]
            alive = sum(1 for c in workers if c.process.is_alive())
            self._set_status(f"workers {alive}/{self._workers}, pending {pending}")

    def _kill_stale(
        self, workers: Iterable[_Child], records: dict[str, dict[str, Any]], redis_now: float
    ) -> None:
        """SIGKILL live workers whose heartbeat stopped (blocked loop, SIGSTOP); they restart."""
        timeout = self._settings.heartbeat.timeout
        for child in workers:
            record = records.get(child.spec.actor_id)
            if (
                record is None
                or child.stop_sent
                or record["status"] != "inactive"
                or redis_now - record["last_heartbeat"] <= timeout
                or not child.process.is_alive()
            ):
                continue
            logger.error(
                "%s (pid=%d) 하트비트가 %.1f초 동안 없어 강제 종료 후 재시작합니다",
                child.spec.actor_id,
                child.process.pid,
                redis_now - record["last_heartbeat"],
            )
            self._backend.kill(child.process)

    def _check_ready(
        self, workers: list[_Child], records: dict[str, dict[str, Any]], now: float
    ) -> None:
        missing = [c.spec.actor_id for c in workers if c.spec.actor_id not in records]
        missing += [c.spec.actor_id for c in self._current.values() if not c.process.is_alive()]
        missing += [name for name in SINGLETON_KINDS if name not in self._current]
        if len(workers) < self._workers:
            missing.append(f"{self._workers - len(workers)} worker(s) not running")
        if missing and now < self._ready_by:
            return
        if missing:
            logger.warning(
                "준비 시간 %.0f초 초과, 일부 미준비 상태로 READY 전송: %s",
                READY_TIMEOUT,
                ", ".join(missing),
            )
        else:
            logger.info("모든 액터 준비 완료 (워커 %d개)", self._workers)
        self._ready = True
        self._notifier.ready()

    def _set_status(self, text: str) -> None:
        if text != self._status:
            self._status = text
            self._notifier.status(text)
