"""When a process may judge workers by their heartbeats: Redis reachability over time.

Shared by everything that judges heartbeats: the supervisor (kills a stuck
worker), the heartbeat actor (marks a silent worker lost, taking its leases
back) and the reaper (forgets a worker silent for minutes). Each holds its
judgement after an outage it saw itself, however long the outage was.
"""

from __future__ import annotations

import logging
import math

from actors.backoff import BACKOFF_CAP

logger = logging.getLogger(__name__)


class RedisReachability:
    """The outcome of the health checks' reads, as the heartbeat judgement needs it.

    After an outage (a network cut, a paused Redis) every heartbeat looks
    overdue, since none could get through, and each worker's heartbeat loop
    may still be in its backoff sleep: workers are judged only once Redis has
    been reachable for ``heartbeat.timeout`` plus the backoff cap. A check
    whose reads took longer than ``heartbeat.interval`` counts as an outage
    too: a blackhole answers late, not never.
    """

    def __init__(self) -> None:
        self.failing = False  # the last check failed
        self._back_at = -math.inf  # loop time Redis came back after an outage
        self._reconnects = 0

    def saw_reconnects(self, reconnects: int) -> None:
        """Note the connection's reconnect count: a new reconnect was an outage.

        A call that rode out a short outage by retrying never failed, but the
        beats of that time could not get through either.
        """
        if reconnects != self._reconnects:
            self._reconnects = reconnects
            self.failing = True

    def failed(self) -> bool:
        """Record a failed check; True if it is the first of an outage."""
        first = not self.failing
        self.failing = True
        return first

    def answered(self, took: float, now: float, interval: float) -> None:
        """Record a check whose reads took ``took`` seconds, done at loop time ``now``."""
        if self.failing or took > interval:
            if self.failing:
                logger.info("Redis 상태 확인 회복")
            self.failing = False
            self._back_at = now

    def may_judge(self, now: float, timeout: float) -> bool:
        """Whether overdue heartbeats mean stuck workers (not an outage just over)."""
        return now - self._back_at >= timeout + BACKOFF_CAP
