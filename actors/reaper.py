"""The reaper actor: requeues expired leases, promotes due retries, applies retention,
sweeps the task records for any that sit in no queue set, and keeps the
per-domain politeness state bounded (decay, forgetting) and its in-flight
counts exact (a recount with each retention cleanup).

Only one reaper acts at a time across all hosts: it holds a renewable lease
(``lock.lua``); the others stand by and take over within one lease period if
it dies. Each step is one atomic script, so even two reapers acting at once
could not requeue a task twice.
"""

from __future__ import annotations

import contextlib
import logging
import time

from actors.backoff import Outage
from actors.base import Actor
from actors.exceptions import QueueError
from actors.reachability import RedisReachability
from actors.store import TaskStore
from config.settings import Settings

logger = logging.getLogger(__name__)

#: Seconds between reaper passes.
REAP_INTERVAL = 0.5
#: The singleton lease outlives a few missed passes.
LOCK_LEASE = 5.0
#: Keys each pass's sweep step asks SCAN to look at: a million tasks are swept
#: in ~40 minutes at ~0.1 ms of Redis time per pass.
SWEEP_COUNT = 200


class Reaper(Actor):
    kind = "reaper"

    def __init__(self, actor_id: str, settings: Settings, parent_pid: int) -> None:
        super().__init__(actor_id, settings, parent_pid)
        partitions = settings.redis.partitions
        # Per partition: where the sweep goes on (a SCAN cursor; 0: from the start)
        # and where the walk over per-domain state goes on.
        self._sweep_cursors = [0] * partitions
        self._domain_cursors = ["0 0 0"] * partitions
        self._reachability = RedisReachability()

    async def run(self) -> None:
        store = self.queue.store
        lock = self.queue.keys.reaper_lock
        outage = Outage(f"{self.actor_id}: 리퍼", logger)
        next_cleanup = 0.0
        leader = False
        try:
            while not self.stop_requested.is_set():
                started = time.monotonic()
                try:
                    held = await store.hold_lock(lock, self.actor_id, LOCK_LEASE)
                    now = time.monotonic()
                    self._reachability.saw_reconnects(self.queue.connection.reconnects)
                    self._reachability.answered(now - started, now, REAP_INTERVAL)
                    if held != leader:
                        leader = held
                        logger.info("%s: 리퍼 %s", self.actor_id, "활성" if held else "대기")
                    if held:
                        next_cleanup = await self._reap(next_cleanup)
                except QueueError as exc:
                    self._reachability.failed()
                    await outage.failed(exc)
                    continue
                outage.succeeded()
                await self.sleep_unless_stopping(REAP_INTERVAL)
        finally:
            if leader:
                with contextlib.suppress(QueueError):  # else it just expires
                    await store.release_lock(lock, self.actor_id)

    async def _reap(self, next_cleanup: float) -> float:
        """One pass over every partition; returns when the next cleanup is due."""
        now = time.monotonic()
        # Right after an outage every live worker looks silent (its beats and
        # lease renewals could not get through): leases are not taken back
        # and workers not forgotten until each has had time to beat again.
        judging = self._reachability.may_judge(now, self.settings.heartbeat.timeout)
        cleaning = judging and now >= next_cleanup
        for store in self.queue.stores:
            await self._reap_partition(store, judging=judging, cleaning=cleaning)
        return now + self.settings.tasks.cleanup_interval if cleaning else next_cleanup

    async def _reap_partition(self, store: TaskStore, *, judging: bool, cleaning: bool) -> None:
        if judging:
            requeued, dead = await store.requeue_expired()
            if requeued or dead:
                logger.warning("임대 만료 작업 %d건 재전달, %d건 실패 처리", requeued, dead)
        await store.promote_due()
        await self._sweep(store)
        await self._prune_domains(store)
        await store.keep_history(self.settings.events, share=len(self.queue.stores))
        if not cleaning:
            return
        removed, forgotten = await store.cleanup()
        if removed or forgotten:
            logger.info("보존 기간 정리: 데드레터 %d건, 워커 %d개 삭제", removed, forgotten)
        fixed = await store.recount_slots()
        if fixed:
            logger.warning("도메인 %d개의 실행 중 작업 수가 실제와 달라 바로잡음", fixed)

    async def _prune_domains(self, store: TaskStore) -> None:
        """One step of the walk over per-domain state: idle rates decay, old domains go."""
        politeness, index = self.settings.politeness, store.partition
        self._domain_cursors[index], forgotten = await store.prune_domains(
            self._domain_cursors[index],
            SWEEP_COUNT,
            politeness.idle_decay,
            politeness.forget_after,
        )
        if forgotten:
            logger.info(
                "%.0f초 동안 조용했던 도메인 %d개의 상태 삭제", politeness.forget_after, forgotten
            )

    async def _sweep(self, store: TaskStore) -> None:
        """One step of the endless sweep for task records in no queue set (repair.lua).

        No script of this version leaves such a record, but an older one that
        failed half-way, a key deleted by hand or a partial restore can; a
        task there would never run. Repairs are counted in the stats hash
        (``scrapeq_tasks_repaired_total``).
        """
        index = store.partition
        self._sweep_cursors[index], ids = await store.scan_tasks(
            self._sweep_cursors[index], SWEEP_COUNT
        )
        if ids:
            repaired = await store.repair(ids)
            if repaired:
                logger.warning(
                    "어느 대기열에도 없던 작업 %d건 복구: %s",
                    len(repaired),
                    ", ".join(repaired[:10]),
                )
