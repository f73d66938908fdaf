"""The worker actor: claims tasks in batches, runs their scripts, reports outcomes.

Up to ``worker.concurrency`` tasks run at once. Claims and completions are
batched: while one claim or one completion call is in flight, the next batch
gathers, so under load a Redis round trip serves many tasks and when idle a
single task still goes out at once. Leases are renewed with each heartbeat;
a lease found lost (taken over after a stall, or cancelled) stops its task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass

import psutil

from actors.backoff import Outage
from actors.base import Actor
from actors.exceptions import (
    InvalidTaskException,
    QueueError,
    RateLimited,
)
from actors.exit_codes import ChildExit
from actors.models import ResultTooLarge, stored_result
from actors.queue import WorkerMonitor
from actors.ratelimits import domain_key
from actors.scripts import find_script, set_attempt
from actors.store import Completion, FailOutcome, Lease, bounded_error
from actors.telemetry import TelemetryBatch
from actors.wakeup import Wakeup
from config.settings import Settings

logger = logging.getLogger(__name__)

#: Most tasks one claim call leases.
CLAIM_BATCH = 64
#: An idle worker claims at least this often, in case a wake message was lost.
IDLE_WAIT = 1.0
#: How long a draining worker tries to hand back the tasks still running.
HANDBACK_TIMEOUT = 5.0
#: How long a stopping worker keeps trying to report completed tasks.
FINAL_FLUSH_TIMEOUT = 10.0
#: How often a worker adds its latency and outcome counts up in Redis.
METRICS_INTERVAL = 1.0
#: At exit, how long the last counts may take to reach Redis before they are dropped.
FINAL_METRICS_TIMEOUT = 2.0


@dataclass(slots=True)
class RunningTask:
    attempt: int
    task: asyncio.Task[None]
    partition: int  # of the queue (its lease is renewed and handed back there)


def by_partition(leases: Mapping[str, RunningTask]) -> dict[int, list[tuple[str, int]]]:
    """(request id, attempt) of running tasks, grouped by their partition."""
    grouped: dict[int, list[tuple[str, int]]] = {}
    for request_id, running in leases.items():
        grouped.setdefault(running.partition, []).append((request_id, running.attempt))
    return grouped


#: Seconds the processes a script left behind get between SIGTERM and SIGKILL.
DESCENDANT_GRACE = 2.0


#: The most a worker takes after ``drain_timeout`` (hand-back, final flush,
#: ending its scripts' processes): the supervisor's SIGKILL waits longer.
AFTER_DRAIN = HANDBACK_TIMEOUT + FINAL_FLUSH_TIMEOUT + FINAL_METRICS_TIMEOUT + 2 * DESCENDANT_GRACE


def end_descendants(grace: float) -> int:
    """End every process this worker's scripts started and left running; returns how many.

    A recycled or stopped worker must not leave a browser or a helper behind
    (``adopt_orphans`` makes even a daemonized one our descendant): SIGTERM,
    then SIGKILL after ``grace`` seconds.
    """
    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=grace)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(alive, timeout=grace)
    if children:
        logger.warning("스크립트가 남긴 프로세스 %d개를 종료함", len(children))
    return len(children)


class Worker(Actor):
    kind = "worker"

    def __init__(self, actor_id: str, settings: Settings, parent_pid: int) -> None:
        super().__init__(actor_id, settings, parent_pid)
        worker = settings.worker
        self.concurrency = worker.concurrency
        self.monitor = WorkerMonitor(self.queue)
        self.running: dict[str, RunningTask] = {}
        self.completed: list[Completion] = []
        self.flush_wanted = asyncio.Event()
        self.slot_free = asyncio.Event()
        self.closing = False
        self.tasks_processed = 0
        self.telemetry = TelemetryBatch()
        # Jitter keeps the processes of a pool from recycling all at once.
        self.recycle_after = (
            int(worker.max_tasks_per_child * random.uniform(1.0, 1.1))
            if worker.max_tasks_per_child
            else 0
        )
        self.max_rss = worker.max_memory_mb * 1024 * 1024
        self.process = psutil.Process()
        self.wakeup: Wakeup | None = None

    def request_stop(self, *, abort: bool = False) -> None:
        super().request_stop(abort=abort)
        self.slot_free.set()
        if self.wakeup is not None:
            self.wakeup.poke()

    def recycle(self, reason: str) -> None:
        if self.exit_code != ChildExit.RECYCLE:
            logger.info("%s: 워커 재시작 예정 (%s)", self.actor_id, reason)
            self.exit_code = ChildExit.RECYCLE
            self.request_stop()

    async def on_start(self) -> None:
        self.wakeup = Wakeup(self.settings, [keys.wake for keys in self.queue.partitions])
        await self.wakeup.start()
        await self.monitor.register_worker(self.actor_id, **self._vitals())
        logger.info("%s: 워커 시작 (동시 실행 %d)", self.actor_id, self.concurrency)

    async def on_stop(self) -> None:
        if self.wakeup is not None:
            await self.wakeup.close()

    async def run(self) -> None:
        heartbeat = asyncio.create_task(self._heartbeat_loop())
        flusher = asyncio.create_task(self._flush_loop())
        recorder = asyncio.create_task(self._record_loop())
        try:
            await self._claim_loop()
            await self._finish_running()
        finally:
            heartbeat.cancel()
            recorder.cancel()
            self.closing = True
            self.flush_wanted.set()
            try:
                async with asyncio.timeout(FINAL_FLUSH_TIMEOUT):
                    await flusher
            except TimeoutError:
                logger.error(
                    "%s: 완료 %d건을 보고하지 못함 (임대 만료 후 재실행됨)",
                    self.actor_id,
                    len(self.completed),
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FINAL_METRICS_TIMEOUT):
                    await self._record_metrics()
        logger.info("%s: 워커 종료 (처리 %d건)", self.actor_id, self.tasks_processed)

    # -- claiming -------------------------------------------------------------

    async def _claim_loop(self) -> None:
        """Claim from the partitions that may have work, in turn, while slots are free.

        A partition that gave fewer tasks than asked is drained: it is asked
        again once its wake channel speaks (or a retry falls due, or
        ``IDLE_WAIT`` passes). Taking the partitions in turn, one claim each,
        lets none starve however deep another is.
        """
        assert self.wakeup is not None
        wakeup, stores = self.wakeup, self.queue.stores
        everywhere = set(range(len(stores)))
        ready = set(everywhere)  # partitions that may hold claimable tasks
        turn = 0  # the partition whose turn it is, if ready
        due = -1  # ms until the first retry of a drained partition falls due; -1: none
        outage = Outage(f"{self.actor_id}: 작업 가져오기", logger)
        while not self.stop_requested.is_set():
            free = self.concurrency - len(self.running)
            if free <= 0:
                self.slot_free.clear()
                await self.slot_free.wait()
                continue
            ready |= wakeup.take_woken()
            if not ready:
                # Every partition is drained: new work announces itself on a wake channel.
                await wakeup.wait(IDLE_WAIT if due < 0 else min(IDLE_WAIT, due / 1000))
                ready, due = wakeup.take_woken() or set(everywhere), -1
                continue
            partition = min(ready, key=lambda index: (index - turn) % len(stores))
            wanted = min(free, CLAIM_BATCH)
            try:
                claim = await stores[partition].claim(self.actor_id, wanted)
            except QueueError as exc:
                await outage.failed(exc)
                continue
            outage.succeeded()
            turn = partition + 1
            for lease in claim.leases:
                self._start(lease)
            if len(claim.leases) < wanted:
                ready.discard(partition)
                if claim.wait_ms >= 0:
                    due = claim.wait_ms if due < 0 else min(due, claim.wait_ms)

    def _start(self, lease: Lease) -> None:
        stale = self.running.get(lease.request_id)
        if stale is not None:
            # This worker stalled, lost the lease and claimed the task again:
            # the old run's results would be refused anyway.
            stale.task.cancel()
        task = asyncio.create_task(self._execute(lease))
        self.running[lease.request_id] = RunningTask(lease.attempt, task, lease.partition)
        task.add_done_callback(lambda done: self._finished(lease.request_id, done))

    def _finished(self, request_id: str, task: asyncio.Task[None]) -> None:
        running = self.running.get(request_id)
        if running is not None and running.task is task:
            del self.running[request_id]
        self.slot_free.set()
        if task.cancelled():
            return  # lease lost or handed back: not a processed task
        self.tasks_processed += 1
        if self.recycle_after and self.tasks_processed >= self.recycle_after:
            self.recycle(f"max_tasks_per_child={self.settings.worker.max_tasks_per_child}")

    # -- running one task -----------------------------------------------------

    async def _execute(self, lease: Lease) -> None:
        request = await self.queue.decode_lease(self.actor_id, lease)
        if request is None:
            return
        script = find_script(request.script_name, request.script_version)
        if script is None:
            version = f" version {request.script_version}" if request.script_version else ""
            await self._fail(
                lease, request.script_name, f"unknown script {request.script_name!r}{version}", True
            )
            return
        set_attempt(lease.attempt)
        self.telemetry.started(script.name, lease.queued)
        started = time.perf_counter()
        deadline = asyncio.timeout(request.timeout)
        try:
            try:
                async with deadline:
                    result = await script.call(dict(request.parameters))
            finally:
                elapsed = time.perf_counter() - started
                self.telemetry.ended(script.name, elapsed)
        except TimeoutError as exc:
            if not deadline.expired():
                await self._fail(lease, script.name, f"TimeoutError: {exc}", False)
                return
            if not script.is_async:
                self.recycle(f"sync script {script.name!r} overran its timeout in a thread")
            await self._fail(lease, script.name, f"timed out after {request.timeout:g}s", False)
            return
        except RateLimited as exc:
            # Back to the queue without burning an attempt; the site's key
            # pauses on every host and slows down (or, with no site, the task
            # waits). A Retry-After past the documented maximum is clamped.
            domain = domain_key(request)
            pause = min(max(0.0, exc.retry_after), self.settings.politeness.max_retry_after)
            await self._report(
                "속도 제한 반환",
                self.queue.stores[lease.partition].release(
                    self.actor_id,
                    [(lease.request_id, lease.attempt)],
                    reason=exc.reason,
                    delay=0 if domain else pause,
                    pause_key=domain or "",
                    pause=pause,
                ),
            )
            return
        except Exception as exc:
            await self._fail(lease, script.name, f"{type(exc).__name__}: {exc}", False)
            return
        try:
            data_json = stored_result(result, self.settings.tasks.max_result_bytes)
        except ResultTooLarge as exc:
            await self._fail(lease, script.name, str(exc), True)
            return
        except InvalidTaskException as exc:
            await self._fail(
                lease, script.name, f"script returned a value that is not JSON: {exc}", True
            )
            return
        self.completed.append(
            Completion(lease.request_id, lease.attempt, data_json, elapsed, lease.partition)
        )
        self.telemetry.outcome(script.name, "completed")
        self.flush_wanted.set()

    async def _fail(self, lease: Lease, script: str, error: str, permanent: bool) -> None:
        error = bounded_error(error)  # a scraped page in an exception must not flood the log
        logger.warning(
            "%s: 작업 %s 실패 (시도 %d): %s", self.actor_id, lease.request_id, lease.attempt, error
        )
        try:
            outcome, _ = await self.queue.stores[lease.partition].fail(
                self.actor_id, lease.request_id, lease.attempt, error, permanent=permanent
            )
        except QueueError as exc:
            logger.error("%s: 실패 보고 실패, 임대 만료 후 재전달됨: %s", self.actor_id, exc)
            return
        if outcome is not FailOutcome.REFUSED:
            self.telemetry.outcome(
                script, "retried" if outcome is FailOutcome.RETRYING else "failed"
            )

    async def _report(self, what: str, call: Awaitable[object]) -> None:
        """Await a one-off report; if Redis is gone the lease expires and the task reruns."""
        try:
            await call
        except QueueError as exc:
            logger.error("%s: %s 실패, 임대 만료 후 재전달됨: %s", self.actor_id, what, exc)

    # -- completions, heartbeats, shutdown ------------------------------------

    async def _flush_loop(self) -> None:
        outage = Outage(f"{self.actor_id}: 완료 보고", logger)
        while True:
            await self.flush_wanted.wait()
            self.flush_wanted.clear()
            while self.completed:
                batch, self.completed = self.completed, []
                try:
                    await self._complete(batch)
                except QueueError as exc:
                    await outage.failed(exc)
                    continue
                outage.succeeded()
            if self.closing:
                return

    async def _complete(self, batch: list[Completion]) -> None:
        """Report a batch, one call per partition; what was not reported goes back
        to ``completed`` (and the error is raised)."""
        stores = self.queue.stores
        grouped: dict[int, list[Completion]] = {}
        for completion in batch:
            grouped.setdefault(completion.partition, []).append(completion)
        for partition, completions in list(grouped.items()):
            try:
                accepted = await stores[partition].complete(self.actor_id, completions)
            except QueueError:
                self.completed[:0] = [c for group in grouped.values() for c in group]
                raise
            del grouped[partition]
            for completion, ok in zip(completions, accepted, strict=True):
                if not ok:
                    logger.warning(
                        "%s: 작업 %s 시도 %d 의 임대를 잃어 완료 보고가 거부됨",
                        self.actor_id,
                        completion.request_id,
                        completion.attempt,
                    )

    async def _record_loop(self) -> None:
        while True:
            await asyncio.sleep(METRICS_INTERVAL)
            # Shielded: cancelled at exit half-way, the counts it took would be lost.
            await asyncio.shield(self._record_metrics())

    async def _record_metrics(self) -> None:
        """Add this worker's latency and outcome counts up in Redis (kept for later if away)."""
        if not self.telemetry:
            return
        batch = self.telemetry.take()
        try:
            await self.queue.store.record_metrics(*batch.fields())
        except QueueError as exc:
            self.telemetry.merge(batch)
            logger.debug("%s: 지연 시간 집계 기록 실패, 다음에 다시: %s", self.actor_id, exc)

    async def _heartbeat_loop(self) -> None:
        outage = Outage(f"{self.actor_id}: 하트비트", logger)
        interval = self.settings.heartbeat.interval
        while True:
            await asyncio.sleep(interval)
            try:
                await self.monitor.update_heartbeat(self.actor_id, **self._vitals())
                lost = []
                for partition, leases in by_partition(self.running).items():
                    lost += await self.queue.stores[partition].renew(self.actor_id, leases)
            except QueueError as exc:
                await outage.failed(exc)
                continue
            outage.succeeded()
            for request_id in lost:
                running = self.running.get(request_id)
                if running is not None:
                    logger.warning(
                        "%s: 작업 %s 의 임대를 잃음 (취소 또는 재전달), 실행 중단",
                        self.actor_id,
                        request_id,
                    )
                    running.task.cancel()
            if self.max_rss and self.process.memory_info().rss > self.max_rss:
                self.recycle(f"max_memory_mb={self.settings.worker.max_memory_mb}")

    def _vitals(self) -> dict[str, str | int | float]:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "tasks_processed": self.tasks_processed,
            "running": len(self.running),
            "concurrency": self.concurrency,
            "rss_bytes": self.process.memory_info().rss,
            "cpu_percent": self.process.cpu_percent(),
        }

    async def _finish_running(self) -> None:
        """Drain: let running tasks finish (up to drain_timeout), hand back the rest."""
        if self.running and not self.aborting.is_set():
            logger.info("%s: 실행 중인 작업 %d건 완료 대기", self.actor_id, len(self.running))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.supervisor.drain_timeout
        while self.running and not self.aborting.is_set():
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self.slot_free.clear()  # set again by each finished task and by an abort
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self.slot_free.wait()
        leftover = by_partition(self.running)
        for running in list(self.running.values()):
            running.task.cancel()
        await asyncio.gather(*(r.task for r in list(self.running.values())), return_exceptions=True)
        if leftover:
            released = 0
            try:
                async with asyncio.timeout(HANDBACK_TIMEOUT):
                    for partition, leases in leftover.items():
                        released += await self.queue.stores[partition].release(
                            self.actor_id, leases, reason="drain"
                        )
            except (QueueError, TimeoutError) as exc:
                logger.error("%s: 작업 반환 실패, 임대 만료 후 재전달됨: %s", self.actor_id, exc)
            logger.info("%s: 미완료 작업 %d건 반환", self.actor_id, released)
