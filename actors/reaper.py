"""The reaper actor: requeues expired leases, promotes due retries, applies retention.

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

logger = logging.getLogger(__name__)

#: Seconds between reaper passes.
REAP_INTERVAL = 0.5
#: The singleton lease outlives a few missed passes.
LOCK_LEASE = 5.0


class Reaper(Actor):
    kind = "reaper"

    async def run(self) -> None:
        store = self.queue.store
        lock = self.queue.keys.reaper_lock
        outage = Outage(f"{self.actor_id}: 리퍼", logger)
        next_cleanup = 0.0
        leader = False
        try:
            while not self.stop_requested.is_set():
                try:
                    held = await store.hold_lock(lock, self.actor_id, LOCK_LEASE)
                    if held != leader:
                        leader = held
                        logger.info("%s: 리퍼 %s", self.actor_id, "활성" if held else "대기")
                    if held:
                        next_cleanup = await self._reap(next_cleanup)
                except QueueError as exc:
                    await outage.failed(exc)
                    continue
                outage.succeeded()
                await self.sleep_unless_stopping(REAP_INTERVAL)
        finally:
            if leader:
                with contextlib.suppress(QueueError):  # else it just expires
                    await store.release_lock(lock, self.actor_id)

    async def _reap(self, next_cleanup: float) -> float:
        store = self.queue.store
        requeued, dead = await store.requeue_expired()
        if requeued or dead:
            logger.warning("임대 만료 작업 %d건 재전달, %d건 실패 처리", requeued, dead)
        await store.promote_due()
        now = time.monotonic()
        if now < next_cleanup:
            return next_cleanup
        removed, forgotten = await store.cleanup()
        if removed or forgotten:
            logger.info("보존 기간 정리: 데드레터 %d건, 워커 %d개 삭제", removed, forgotten)
        return now + self.settings.tasks.cleanup_interval
