"""The benchmark's tasks for SAQ, loaded by its worker CLI (``saq bench.peers.saq_tasks.settings``).

The harness passes the Redis URL and the worker concurrency in the environment.
"""

from __future__ import annotations

import asyncio
import os

from saq.queue.redis import RedisQueue
from saq.types import Context, SettingsDict

URL_ENV = "BENCH_REDIS_URL"
CONCURRENCY_ENV = "BENCH_CONCURRENCY"
#: Never reachable: a worker started without the harness's URL fails loudly.
UNSET_URL = "redis://127.0.0.1:1/0"
QUEUE_NAME = "bench"


async def noop(ctx: Context, *, i: int) -> int:
    return i


async def sleep(ctx: Context, *, seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


def make_queue(url: str) -> RedisQueue:
    return RedisQueue.from_url(url, name=QUEUE_NAME)


settings: SettingsDict[Context] = {
    "queue": make_queue(os.environ.get(URL_ENV, UNSET_URL)),
    "functions": [noop, sleep],
    "concurrency": int(os.environ.get(CONCURRENCY_ENV, "10")),
}
