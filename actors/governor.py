"""The backpressure governor: one active across all hosts, it sets the admission state.

Every ``INTERVAL`` it measures the pending depth (pending + gated tasks) and
the drain rate (tasks started per second), decides the state and publishes it
in Redis, where the enqueue script reads it atomically:

- ``open`` below ``throttle_at``;
- ``throttled`` from ``throttle_at`` to ``high_watermark``: enqueues are
  admitted at a rate that falls linearly from twice the drain rate at
  ``throttle_at`` to ``MIN_RATE`` at ``high_watermark``;
- ``closed`` from ``high_watermark`` until the depth falls below
  ``low_watermark`` (hysteresis: no flapping at the edge).

The enqueue script itself also refuses any enqueue that would take the depth
past ``high_watermark``, so the cap holds between the governor's passes and
while no governor runs.
"""

from __future__ import annotations

import logging
import time

from actors.backoff import Outage
from actors.base import Actor
from actors.connection import translated_errors
from actors.exceptions import QueueError
from actors.queue import count_of
from config.settings import BackpressureSettings

logger = logging.getLogger(__name__)

#: Seconds between the governor's passes: its reaction lag.
INTERVAL = 0.2
#: The singleton lease; a standby governor takes over within this.
LOCK_LEASE = 2.0
#: The admitted rate never falls below this while throttled (tasks/s).
MIN_RATE = 1.0
#: Weight of the newest drain-rate sample in the moving average.
DRAIN_SMOOTHING = 0.3


def decide_state(previous: str, depth: int, limits: BackpressureSettings) -> str:
    """The admission state for ``depth``, with hysteresis on closing."""
    if depth >= limits.high_watermark:
        return "closed"
    if previous == "closed" and depth >= limits.low_watermark:
        return "closed"
    if depth >= limits.throttle_at and limits.throttle_at < limits.high_watermark:
        return "throttled"
    return "open"


def admitted_rate(depth: int, drain: float, limits: BackpressureSettings) -> float:
    """Enqueues per second admitted while throttled: smooth in the depth."""
    span = limits.high_watermark - limits.throttle_at
    if span <= 0:
        return MIN_RATE
    room = max(0.0, (limits.high_watermark - depth) / span)
    return max(MIN_RATE, 2.0 * drain * room)


class Governor(Actor):
    kind = "governor"

    async def run(self) -> None:
        store, keys = self.queue.store, self.queue.keys
        limits = self.settings.backpressure
        outage = Outage(f"{self.actor_id}: 배압 조절", logger)
        state, drain = "", 0.0
        last_started: int | None = None
        last_at = time.monotonic()
        while not self.stop_requested.is_set():
            try:
                if await store.hold_lock(keys.governor_lock, self.actor_id, LOCK_LEASE):
                    depth, started = await self._measure()
                    now = time.monotonic()
                    if last_started is not None and now > last_at:
                        sample = max(0, started - last_started) / (now - last_at)
                        drain += DRAIN_SMOOTHING * (sample - drain)
                    last_started, last_at = started, now
                    new_state = decide_state(state, depth, limits)
                    rate = admitted_rate(depth, drain, limits) if new_state == "throttled" else 0
                    # Every partition's enqueue script reads the state in its own slot.
                    # Each admits its share of the throttled rate (the sum is the rate).
                    stores = self.queue.stores
                    for partition in reversed(stores):
                        previous = await partition.publish_backpressure(
                            new_state, depth, rate / len(stores), drain
                        )
                    if previous != new_state:
                        logger.warning(
                            "배압 상태 변경: %s -> %s (대기 %d건, 허용 %.1f건/초)",
                            previous or "없음",
                            new_state,
                            depth,
                            rate,
                        )
                    state = new_state
            except QueueError as exc:
                await outage.failed(exc)
                continue
            outage.succeeded()
            await self.sleep_unless_stopping(INTERVAL)

    async def _measure(self) -> tuple[int, int]:
        """The pending depth (pending + gated) and the tasks started ever, of all partitions."""
        commands: list[tuple[str, ...]] = []
        for keys in self.queue.partitions:
            commands += [("ZCARD", keys.pending), ("HMGET", keys.stats, "gated", "started")]
        with translated_errors():
            replies = await self.queue.connection.execute_many(*commands)
        depth = started = 0
        for pending, (gated, started_raw) in zip(replies[::2], replies[1::2], strict=True):
            depth += pending + count_of(gated)
            started += count_of(started_raw)
        return depth, started
