"""What rate limits and politeness that are configured but never hit cost at dispatch.

Run ``python -m bench.ratelimit_overhead`` (``--tasks``, ``--repeats``,
``--claimers``). It starts a private redis-server without persistence and
measures four set-ups in turn, A B C D A B C D ..., each on an emptied server:

- ``none``: nothing published to Redis (no limits hash at all);
- ``breaker``: an empty ``[rate_limits]`` and politeness off: only the
  ``[circuit_breaker]`` settings;
- ``limited``: ``"domain:x.test" = 1e6`` and politeness off, so every task
  passes through its key's gate and the GCRA check, and never waits;
- ``polite``: politeness on as by default (cap 8, adaptive, slow start),
  tasks spread over 100 domains with no limit, so the claimers' 128 leases
  rarely meet a cap: every task takes and gives back a slot, and each
  domain's window starts at one.

Each run enqueues ``--tasks`` echo tasks on ``http://x.test/`` (``enqueue_many``),
then ``--claimers`` coroutines claim (64 at a time) and complete them at the
store level, as a worker does, until none is left. It prints the medians of
enqueue and dispatch (claim + complete) throughput, Redis CPU per dispatched
task, and each set-up's ratio to ``none``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from actors.models import ScrapingRequest
from actors.queue import RedisQueue, TaskManager
from actors.store import Completion
from bench.common import private_redis
from config.settings import Settings
from supervisor.redis_checks import info_field

#: Rate limits per set-up; None publishes nothing at all.
SETUPS: dict[str, dict[str, float] | None] = {
    "none": None,
    "breaker": {},
    "limited": {"domain:x.test": 1e6},
    "polite": {},
}
#: Politeness per set-up (the others run with it off).
POLITE = {"max_in_flight_per_domain": 8, "adaptive": True}
OFF = {"max_in_flight_per_domain": 0, "adaptive": False}
#: Domains the ``polite`` set-up spreads its tasks over.
DOMAINS = 100
#: Tasks one claim call leases (the worker's CLAIM_BATCH).
CLAIM_BATCH = 64


@dataclass(frozen=True, slots=True)
class Sample:
    enqueue_per_s: float
    dispatch_per_s: float
    cpu_us_per_task: float  # Redis CPU (user + sys) per claimed and completed task


async def redis_cpu(queue: RedisQueue) -> float:
    info = await queue.connection.execute("INFO", "cpu")
    return float(info_field(info, "used_cpu_user")) + float(info_field(info, "used_cpu_sys"))


async def claim_until_empty(queue: RedisQueue, worker: str) -> int:
    done = 0
    while True:
        leases = (await queue.store.claim(worker, CLAIM_BATCH)).leases
        if not leases:
            return done
        results = [Completion(lease.request_id, lease.attempt, "null", 0.0) for lease in leases]
        await queue.store.complete(worker, results)
        done += len(leases)


async def measure(
    url: str, setup: str, tasks: int, claimers: int, watch: Callable[[bool], None] | None = None
) -> Sample:
    """One run of ``setup``; ``watch(True)`` is called as dispatch starts, ``watch(False)`` as
    it ends (bench/instructions.py counts Redis's instructions in between)."""
    limits = SETUPS[setup]
    settings = Settings.model_validate(
        {
            "redis": {"url": url, "embedded": "never", "key_prefix": "bench"},
            "backpressure": {
                "high_watermark": tasks + 1,
                "low_watermark": tasks,
                "throttle_at": tasks + 1,
            },
            "rate_limits": limits or {},
            "politeness": POLITE if setup == "polite" else OFF,
        }
    )
    hosts = [f"d{n % DOMAINS}.test" if setup == "polite" else "x.test" for n in range(tasks)]
    requests = [
        ScrapingRequest(script_name="echo", parameters={"url": f"http://{host}/{n}"})
        for n, host in enumerate(hosts)
    ]
    async with RedisQueue(settings) as queue:
        await queue.connection.execute("FLUSHALL")
        if limits is not None:
            await queue.store.set_limits(settings)
        started = time.perf_counter()
        await queue.enqueue_many(requests)
        enqueue_s = time.perf_counter() - started

        cpu = await redis_cpu(queue)
        if watch:
            watch(True)
        started = time.perf_counter()
        counts = await asyncio.gather(
            *(claim_until_empty(queue, f"bench-{n}") for n in range(claimers))
        )
        dispatch_s = time.perf_counter() - started
        if watch:
            watch(False)
        cpu = await redis_cpu(queue) - cpu

        completed = (await TaskManager(queue).queue_stats())["completed"]
    if sum(counts) != tasks or completed != tasks:
        raise RuntimeError(f"{setup}: dispatched {sum(counts)}, completed {completed} of {tasks}")
    return Sample(tasks / enqueue_s, tasks / dispatch_s, cpu / tasks * 1e6)


async def run(url: str, tasks: int, repeats: int, claimers: int) -> dict[str, list[Sample]]:
    samples: dict[str, list[Sample]] = {setup: [] for setup in SETUPS}
    for repeat in range(repeats):
        for setup in SETUPS:  # alternating: drift hits every set-up alike
            sample = await measure(url, setup, tasks, claimers)
            samples[setup].append(sample)
            print(
                f"repeat {repeat + 1} {setup:>8}: enqueue {sample.enqueue_per_s:,.0f}/s, "
                f"dispatch {sample.dispatch_per_s:,.0f}/s, "
                f"Redis {sample.cpu_us_per_task:.1f} µs/task",
                flush=True,
            )
    return samples


def print_table(samples: dict[str, list[Sample]]) -> None:
    def median(setup: str, field: str) -> float:
        return float(statistics.median(getattr(sample, field) for sample in samples[setup]))

    print(
        f"\n{'set-up':>8} | {'enqueue/s':>10} | {'× none':>6} | {'dispatch/s':>10} | "
        f"{'× none':>6} | {'Redis µs/task':>13} | {'× none':>6}"
    )
    print("-" * 80)
    for setup in SETUPS:
        enqueue, dispatch = median(setup, "enqueue_per_s"), median(setup, "dispatch_per_s")
        cpu = median(setup, "cpu_us_per_task")
        print(
            f"{setup:>8} | {enqueue:>10,.0f} | {enqueue / median('none', 'enqueue_per_s'):>6.2f} | "
            f"{dispatch:>10,.0f} | {dispatch / median('none', 'dispatch_per_s'):>6.2f} | "
            f"{cpu:>13.1f} | {cpu / median('none', 'cpu_us_per_task'):>6.2f}"
        )
    overhead = median("none", "dispatch_per_s") / median("limited", "dispatch_per_s")
    polite = median("none", "dispatch_per_s") / median("polite", "dispatch_per_s")
    print(
        f"(medians of {len(samples['none'])} runs each; limits never hit take "
        f"{overhead:.2f}×, politeness never reached {polite:.2f}× the dispatch time per "
        "task of none)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tasks", type=int, default=20_000, help="tasks per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per set-up")
    parser.add_argument("--claimers", type=int, default=2, help="concurrent claim loops")
    args = parser.parse_args()
    with private_redis() as url:
        samples = asyncio.run(run(url, args.tasks, args.repeats, args.claimers))
    print_table(samples)


if __name__ == "__main__":
    main()
