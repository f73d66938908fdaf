"""Backoff with jitter and bounded logging for loops that meet an unreachable Redis.

A network fault must never become a tight error loop or a flood of log
lines: each loop waits longer after each failure (with jitter, so hosts do not
reconnect in lockstep) and logs the first failure, then at most one line per
``log_every`` seconds, then one line when it recovers.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

#: The longest wait between two tries of a loop. After an outage, a loop may
#: still be asleep this long before its next call gets through: whoever judges
#: other processes by their heartbeats grants this much beyond heartbeat.timeout.
BACKOFF_CAP = 5.0


def jittered(attempt: int, base: float, cap: float) -> float:
    """The wait before try ``attempt + 1``: doubling per failure, capped, jittered.

    The one backoff rule of every retry loop (a call on a broken connection,
    an actor loop, a subscription): half to all of ``min(cap, base * 2**attempt)``.
    """
    ceiling: float = min(cap, base * 2.0 ** min(attempt, 30))
    return ceiling * random.uniform(0.5, 1.0)


class Outage:
    """Tracks one loop's run of failures."""

    def __init__(
        self,
        what: str,
        logger: logging.Logger,
        *,
        base: float = 0.1,
        cap: float = BACKOFF_CAP,
        log_every: float = 30.0,
    ) -> None:
        self.what = what
        self.logger = logger
        self.base = base
        self.cap = cap
        self.log_every = log_every
        self.failures = 0
        self._last_log = 0.0

    def delay(self) -> float:
        """The wait before the next try (:func:`jittered`)."""
        return jittered(self.failures, self.base, self.cap)

    async def failed(self, error: BaseException) -> None:
        """Record a failure, log it if due, and wait before the next try."""
        self.failures += 1
        now = time.monotonic()
        if self.failures == 1 or now - self._last_log >= self.log_every:
            self._last_log = now
            self.logger.warning(
                "%s 실패 (연속 %d회), 재시도 예정: %s", self.what, self.failures, error
            )
        await asyncio.sleep(self.delay())

    def succeeded(self) -> None:
        if self.failures:
            self.logger.info("%s 복구됨 (실패 %d회 후)", self.what, self.failures)
            self.failures = 0
