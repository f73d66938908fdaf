"""Test helpers: wait for an outcome instead of sleeping a guessed time; record events;
run a loop in the background."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import redis.asyncio
import redis.exceptions
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from actors.listeners import ListenerAnnouncement
from actors.queue import RedisQueue

_RAW_CLIENTS: dict[tuple[str, int], redis.asyncio.Redis] = {}


def admin(queue: RedisQueue) -> redis.asyncio.Redis:
    """A plain redis-py client on ``queue``'s server, for a test that reads or damages raw keys.

    scrapeq itself opens every connection through actors/connection.py; this
    one stands in for an operator poking at Redis, so it is deliberately
    another client. One per URL and event loop, closed after each test (conftest).
    """
    key = (queue.settings.redis.url, id(asyncio.get_running_loop()))  # a client serves one loop
    client = _RAW_CLIENTS.get(key)
    if client is None:
        # Fault tests kill and restart Redis under it: reconnect and retry, as an operator would.
        client = _RAW_CLIENTS[key] = redis.asyncio.Redis.from_url(
            key[0],
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 5),
            retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
        )
    return client


async def close_raw_clients() -> None:
    while _RAW_CLIENTS:
        _, client = _RAW_CLIENTS.popitem()
        await client.aclose()


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
    pubsub = admin(queue).pubsub()
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
    """Every event published while the block runs, appended as it arrives.

    On a Redis Cluster the listener announces itself (actors/listeners.py).
    """
    seen: list[dict[str, Any]] = []
    async with (
        subscribed(queue, queue.keys.events) as pubsub,
        ListenerAnnouncement(queue),
    ):

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
