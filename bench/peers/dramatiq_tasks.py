"""The benchmark's tasks for Dramatiq (RedisBroker + Results middleware with RedisBackend).

Dramatiq does not store results by default; like every other system here it
is configured to (``store_results=True``). The worker CLI loads
``bench.peers.dramatiq_tasks:broker``; the harness builds its own broker for
each private server with :func:`build`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends.redis import RedisBackend

URL_ENV = "BENCH_REDIS_URL"
#: Never reachable: a worker started without the harness's URL fails loudly.
UNSET_URL = "redis://127.0.0.1:1/0"


def noop(i: int) -> int:
    return i


def sleep(seconds: float) -> float:
    time.sleep(seconds)  # Dramatiq runs actors in threads
    return seconds


@dataclass(frozen=True)
class DramatiqApp:
    broker: RedisBroker
    backend: RedisBackend
    noop: dramatiq.Actor[[int], int]
    sleep: dramatiq.Actor[[float], float]


def build(url: str) -> DramatiqApp:
    broker = RedisBroker(url=url)  # type: ignore[no-untyped-call]
    backend = RedisBackend(url=url)  # type: ignore[no-untyped-call]
    broker.add_middleware(Results(backend=backend))  # type: ignore[no-untyped-call]
    return DramatiqApp(
        broker,
        backend,
        dramatiq.actor(broker=broker, actor_name="noop", store_results=True)(noop),
        dramatiq.actor(broker=broker, actor_name="sleep", store_results=True)(sleep),
    )


broker = build(os.environ.get(URL_ENV, UNSET_URL)).broker
