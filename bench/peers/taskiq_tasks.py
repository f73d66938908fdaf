"""The benchmark's tasks for taskiq (RedisStreamBroker + RedisAsyncResultBackend).

The worker CLI loads ``bench.peers.taskiq_tasks:broker``; the harness builds
its own broker for each private server with :func:`build`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from taskiq import AsyncBroker
from taskiq.decor import AsyncTaskiqDecoratedTask
from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

URL_ENV = "BENCH_REDIS_URL"
#: Never reachable: a worker started without the harness's URL fails loudly.
UNSET_URL = "redis://127.0.0.1:1/0"
QUEUE_NAME = "bench"


async def noop(i: int) -> int:
    return i


async def sleep(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


@dataclass(frozen=True)
class TaskiqApp:
    broker: AsyncBroker
    noop: AsyncTaskiqDecoratedTask[[int], Coroutine[Any, Any, int]]
    sleep: AsyncTaskiqDecoratedTask[[float], Coroutine[Any, Any, float]]


def build(url: str) -> TaskiqApp:
    broker = RedisStreamBroker(url, queue_name=QUEUE_NAME).with_result_backend(
        RedisAsyncResultBackend(url)
    )
    return TaskiqApp(
        broker,
        broker.register_task(noop, task_name="bench.noop"),
        broker.register_task(sleep, task_name="bench.sleep"),
    )


broker = build(os.environ.get(URL_ENV, UNSET_URL)).broker
