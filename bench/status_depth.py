"""How status lookups and claim+complete scale with queue depth; Redis memory per task.

Run ``python -m bench.status_depth`` (``--sizes`` and ``--samples`` to change
the defaults). It starts a private redis-server without persistence in a
temporary directory and fills it, size by size, with small pending tasks
through ``enqueue_many``. For each depth it prints the median latency of
``get_task_status`` and of one claim + complete, each also as a ratio to the
smallest depth, and the Redis memory (``used_memory`` delta) per pending task,
split into the stored request JSON (the task's payload) and the rest.
The contract promises O(1) status lookups, so their ratio should stay near 1;
claim pops from a sorted set, so its cost may grow as log(depth).

One million tasks take about a minute to enqueue on two cores; pass smaller
``--sizes`` for a quick look.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from actors.models import ScrapingRequest
from actors.queue import RedisQueue, TaskManager
from actors.store import Completion
from bench.common import private_redis
from config.settings import Settings
from supervisor.redis_checks import info_field

DEFAULT_SIZES = (100, 1_000, 100_000, 1_000_000)
#: Requests built and enqueued per enqueue_many call while filling.
FILL_BATCH = 10_000


@dataclass(frozen=True, slots=True)
class Row:
    size: int
    status_us: float
    claim_complete_us: float
    bytes_per_task: float
    request_bytes: float  # the stored request JSON (the payload) per task


def small_task(number: int) -> ScrapingRequest:
    return ScrapingRequest(request_id=f"b{number}", script_name="echo", parameters={"n": number})


async def used_memory(queue: RedisQueue) -> int:
    return int(info_field(await queue.connection.execute("INFO", "memory"), "used_memory"))


async def median_us(operation: Callable[[], Awaitable[object]], samples: int) -> float:
    timings = []
    for _ in range(samples):
        started = time.perf_counter()
        await operation()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings) * 1e6


async def measure(queue: RedisQueue, size: int, samples: int) -> Row:
    """Fill an empty queue with ``size`` pending tasks and time the two operations."""
    await queue.connection.execute("FLUSHALL")
    baseline = await used_memory(queue)
    request_bytes = 0
    for start in range(0, size, FILL_BATCH):
        batch = [small_task(n) for n in range(start, min(size, start + FILL_BATCH))]
        request_bytes += sum(len(task.stored_json()) for task in batch)
        await queue.enqueue_many(batch)
    per_task = (await used_memory(queue) - baseline) / size

    manager = TaskManager(queue)
    rng = random.Random(size)
    status_us = await median_us(lambda: manager.get_task_status(f"b{rng.randrange(size)}"), samples)

    refill = iter(range(size, size + samples))

    async def claim_and_complete() -> None:
        (lease,) = (await queue.store.claim("bench", 1)).leases
        await queue.store.complete("bench", [Completion(lease.request_id, lease.attempt, "1", 0.0)])

    claim_timings = []
    for _ in range(samples):
        started = time.perf_counter()
        await claim_and_complete()
        claim_timings.append(time.perf_counter() - started)
        await queue.enqueue_task(small_task(next(refill)))  # keep the depth, untimed
    claim_us = statistics.median(claim_timings) * 1e6
    return Row(size, status_us, claim_us, per_task, request_bytes / size)


def print_table(rows: list[Row]) -> None:
    base = rows[0]
    print(
        f"{'pending':>10} | {'status µs':>9} | {'× base':>6} | "
        f"{'claim+complete µs':>17} | {'× base':>6} | {'bytes/task':>10} | "
        f"{'request B':>9} | {'overhead B':>10}"
    )
    print("-" * 102)
    for row in rows:
        print(
            f"{row.size:>10,} | {row.status_us:>9.1f} | {row.status_us / base.status_us:>6.2f} | "
            f"{row.claim_complete_us:>17.1f} | "
            f"{row.claim_complete_us / base.claim_complete_us:>6.2f} | "
            f"{row.bytes_per_task:>10.0f} | "
            f"{row.request_bytes:>9.0f} | {row.bytes_per_task - row.request_bytes:>10.0f}"
        )
    print(f"(× base: ratio to the {base.size:,}-task queue; medians of timed calls;")
    print(" request B: the stored request JSON, the payload; overhead B: the rest of a task)")


async def run(url: str, sizes: list[int], samples: int) -> list[Row]:
    cap = max(sizes) + samples + 1  # backpressure must not refuse the fill
    settings = Settings.model_validate(
        {
            "redis": {"url": url, "embedded": "never", "key_prefix": "bench"},
            "backpressure": {"high_watermark": cap, "low_watermark": cap - 1, "throttle_at": cap},
        }
    )
    rows = []
    async with RedisQueue(settings) as queue:
        for size in sizes:
            started = time.monotonic()
            rows.append(await measure(queue, size, samples))
            print(f"{size:,} tasks measured in {time.monotonic() - started:.1f} s", flush=True)
    return rows


def parse_sizes(text: str) -> list[int]:
    sizes = [int(part) for part in text.split(",") if part.strip()]
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("--sizes: a comma-separated list of positive ints")
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--sizes",
        type=parse_sizes,
        default=list(DEFAULT_SIZES),
        help="queue depths to measure (default: 100,1000,100000,1000000)",
    )
    parser.add_argument("--samples", type=int, default=2000, help="timed calls per depth")
    args = parser.parse_args()
    with private_redis() as url:
        rows = asyncio.run(run(url, args.sizes, args.samples))
    print_table(rows)


if __name__ == "__main__":
    main()
