"""The heartbeat actor: notices lost workers on every host and takes their tasks back.

A worker's heartbeat runs on its event loop, so a process that died, was
stopped, or whose loop is blocked by a script all look the same here: the
heartbeat stops. Each such worker is marked inactive (``worker.lost`` is
published once, however many hosts watch) and its leases are requeued at once.
The supervisor that owns a lost but still running process kills and restarts it.
After an outage every heartbeat is overdue, since none could get through: no
worker is judged until Redis has been back long enough for each to beat again.
"""

from __future__ import annotations

import asyncio
import logging

from actors.backoff import Outage
from actors.base import Actor
from actors.exceptions import QueueError
from actors.reachability import RedisReachability

logger = logging.getLogger(__name__)


class HeartbeatMonitor(Actor):
    kind = "heartbeat"

    async def run(self) -> None:
        outage = Outage(f"{self.actor_id}: 워커 감시", logger)
        reachability = RedisReachability()
        while not self.stop_requested.is_set():
            try:
                await self._judge(reachability)
            except QueueError as exc:
                reachability.failed()
                await outage.failed(exc)
                continue
            outage.succeeded()
            await self.sleep_unless_stopping(self.settings.heartbeat.interval)

    async def _judge(self, reachability: RedisReachability) -> None:
        """Mark silent workers lost and take their leases back, unless Redis was just away."""
        store = self.queue.store
        heartbeat = self.settings.heartbeat
        loop = asyncio.get_running_loop()
        started = loop.time()
        await self.queue.ping()
        reachability.saw_reconnects(self.queue.connection.reconnects)
        reachability.answered(loop.time() - started, loop.time(), heartbeat.interval)
        if not reachability.may_judge(loop.time(), heartbeat.timeout):
            return
        for worker_id in await store.mark_lost(heartbeat.timeout):
            requeued = dead = 0
            for partition in self.queue.stores:
                taken_back, failed = await partition.requeue_worker(worker_id)
                requeued, dead = requeued + taken_back, dead + failed
            logger.warning(
                "워커 %s 응답 없음 (%.0f초): 작업 %d건 재전달, %d건 실패 처리",
                worker_id,
                heartbeat.timeout,
                requeued,
                dead,
            )
