"""The heartbeat actor: notices lost workers on every host and takes their tasks back.

A worker's heartbeat runs on its event loop, so a process that died, was
stopped, or whose loop is blocked by a script all look the same here: the
heartbeat stops. Each such worker is marked inactive (``worker.lost`` is
published once, however many hosts watch) and its leases are requeued at once.
The supervisor that owns a lost but still running process kills and restarts it.
"""

from __future__ import annotations

import logging

from actors.backoff import Outage
from actors.base import Actor
from actors.exceptions import QueueError

logger = logging.getLogger(__name__)


class HeartbeatMonitor(Actor):
    kind = "heartbeat"

    async def run(self) -> None:
        store = self.queue.store
        timeout = self.settings.heartbeat.timeout
        outage = Outage(f"{self.actor_id}: 워커 감시", logger)
        while not self.stop_requested.is_set():
            try:
                for worker_id in await store.mark_lost(timeout):
                    requeued, dead = await store.requeue_worker(worker_id)
                    logger.warning(
                        "워커 %s 응답 없음 (%.0f초): 작업 %d건 재전달, %d건 실패 처리",
                        worker_id,
                        timeout,
                        requeued,
                        dead,
                    )
            except QueueError as exc:
                await outage.failed(exc)
                continue
            outage.succeeded()
            await self.sleep_unless_stopping(self.settings.heartbeat.interval)
