"""Test helpers: wait for an outcome instead of sleeping a guessed time; record events;
run a loop in the background."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

from redis.asyncio.client import PubSub

from actors.queue import RedisQueue


async def wait_for(
    predicate: Callable[[], Awaitable[bool] | bool],
    timeout: float = 10,
    interval: float = 0.02,
    message: str = "",
) -> None:
    """Poll ``predicate`` (sync or async) until it is true; AssertionError after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() >= deadline:
            raise AssertionError(message or f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def looping(step: Callable[[], Awaitable[object]], interval: float) -> AsyncIterator[None]:
    """Run ``step`` again and again, ``interval`` s apart, while the block runs.

    The loop ends on a flag as well as by cancellation: on Python 3.11
    redis-py's internal ``asyncio.wait_for`` loses a cancellation that lands
    as a command completes, and a loop only cancellation could end then ran
    on forever while the test waited for it (seen under load). An error in
    ``step`` is raised from the block's exit.
    """
    stop = asyncio.Event()

    async def loop() -> None:
        while not stop.is_set():
            await step()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await stop.wait()

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        stop.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def subscribed(queue: RedisQueue, channel: str) -> AsyncIterator[PubSub]:
    """A subscription to ``channel`` that Redis has confirmed.

    redis-py's ``subscribe`` only sends the command; a message published
    through another connection before Redis has processed it is not
    delivered. From the confirmation on, nothing is missed.
    """
    pubsub = queue.client.pubsub()
    try:
        await pubsub.subscribe(channel)
        confirmation = await pubsub.get_message(timeout=5)
        assert confirmation is not None, f"no confirmation of the subscription to {channel}"
        yield pubsub
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]


async def next_message(pubsub: PubSub, timeout: float = 5) -> dict[str, Any]:
    """The next published message; AssertionError if none comes within ``timeout``."""
    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)
    assert message is not None, f"no message within {timeout} s"
    return cast(dict[str, Any], message)


@contextlib.asynccontextmanager
async def event_log(queue: RedisQueue) -> AsyncIterator[list[dict[str, Any]]]:
    """Every event published while the block runs, appended as it arrives."""
    seen: list[dict[str, Any]] = []
    async with subscribed(queue, queue.keys.events) as pubsub:

        async def pump() -> None:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
            if message is not None:
                seen.append(json.loads(message["data"]))

        async with looping(pump, 0):
            yield seen


def count(events: list[dict[str, Any]], name: str, **fields: Any) -> int:
    return sum(
        1
        for event in events
        if event["event"] == name and all(event.get(k) == v for k, v in fields.items())
    )
