"""Push-based waiting for task responses, many waits on one connection.

Every task's final response is published on its own channel (``done:<id>``)
by the script that finishes it. A wait subscribes to that channel first, and
only when Redis confirms the subscription does it read the stored response:
a result that landed before the wait began is found by that read, and one
that lands after it is pushed. When the connection drops, redis-py
resubscribes; each renewed confirmation triggers the same read, so a result
published during the outage is not missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from actors.exceptions import QueueConnectionException
from actors.keys import KeySpace

logger = logging.getLogger(__name__)

#: Reads the stored responses of tasks (None for one not finished yet).
ResponsesReader = Callable[[Sequence[str]], Awaitable[list[bytes | None]]]


class ResponseHub:
    """Fan-in of ``done:<id>`` channels for all the waits of one process."""

    def __init__(self, client: Redis, keys: KeySpace, read_responses: ResponsesReader) -> None:
        self._client = client
        self._keys = keys
        self._read_responses = read_responses
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiters: dict[str, list[asyncio.Future[bytes]]] = {}
        self._to_check: set[str] = set()
        self._checker: asyncio.Task[None] | None = None

    async def wait(self, request_id: str, timeout: float) -> bytes | None:
        """The task's response JSON, or None if none came within ``timeout``."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        waiters = self._waiters.setdefault(request_id, [])
        waiters.append(future)
        try:
            if len(waiters) == 1:
                await self._subscribe(self._keys.done(request_id))
            else:  # already subscribed: the response may have come already
                self._check_stored(request_id)
            try:
                async with asyncio.timeout(timeout):  # no extra task, unlike wait_for
                    return await future
            except TimeoutError:
                # Last look: covers a message lost with a connection that died
                # after its subscription was confirmed.
                (response,) = await self._read_responses([request_id])
                return response
        finally:
            waiters.remove(future)
            if not waiters:
                del self._waiters[request_id]
                await self._unsubscribe(self._keys.done(request_id))

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        if self._checker is not None:
            self._checker.cancel()
        if self._pubsub is not None:
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]
            self._pubsub = None

    async def _subscribe(self, channel: str) -> None:
        if self._pubsub is None:
            self._pubsub = self._client.pubsub()
        await self._pubsub.subscribe(channel)
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_loop(self._pubsub))

    async def _unsubscribe(self, channel: str) -> None:
        if self._pubsub is not None:
            with contextlib.suppress(redis_errors.ConnectionError, redis_errors.TimeoutError):
                await self._pubsub.unsubscribe(channel)

    def _deliver(self, request_id: str, response: bytes) -> None:
        for future in self._waiters.get(request_id, ()):
            if not future.done():
                future.set_result(response)

    def _check_stored(self, request_id: str) -> None:
        """Queue a read of the task's stored response; one task reads them in batches."""
        self._to_check.add(request_id)
        if self._checker is None or self._checker.done():
            self._checker = asyncio.create_task(self._check_loop())

    async def _check_loop(self) -> None:
        while self._to_check:
            batch = [rid for rid in self._to_check if rid in self._waiters]
            self._to_check.clear()
            try:
                responses = await self._read_responses(batch)
            except QueueConnectionException as exc:  # each wait's final read tries again
                logger.warning("작업 응답 %d건 조회 실패: %s", len(batch), exc)
                return
            for request_id, response in zip(batch, responses, strict=True):
                if response is not None:
                    self._deliver(request_id, response)

    async def _read_loop(self, pubsub: PubSub) -> None:
        prefix = self._keys.done_prefix.encode()
        failures = 0
        while True:
            try:
                message = await pubsub.get_message(timeout=1.0)
            except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
                failures += 1
                delay = min(5.0, 0.05 * 2**failures)
                if failures == 1:
                    logger.warning("응답 구독 연결 끊김, 재연결 시도: %s", exc)
                await asyncio.sleep(delay)
                continue
            if failures:
                logger.info("응답 구독 연결 복구")
                failures = 0
            if message is None:
                continue
            channel: bytes = message["channel"]
            if not channel.startswith(prefix):
                continue
            request_id = channel[len(prefix) :].decode()
            if message["type"] == "message":
                self._deliver(request_id, message["data"])
            elif message["type"] == "subscribe" and request_id in self._waiters:
                self._check_stored(request_id)
