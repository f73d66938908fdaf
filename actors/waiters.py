"""Push-based waiting for task responses, many waits on one connection.

Every task's final response is published on its own channel (``done:<id>``)
by the script that finishes it. A wait subscribes to that channel first, and
only when Redis confirms the subscription does it read the stored response:
a result that landed before the wait began is found by that read, and one
that lands after it is pushed. When the connection drops, the subscription
resubscribes; each renewed confirmation triggers the same read, so a result
published during the outage is not missed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from actors.connection import open_subscription
from actors.exceptions import QueueError
from actors.keys import KeySpace
from actors.subscription import Message
from config.settings import Settings

logger = logging.getLogger(__name__)

#: Reads the stored responses of tasks (None for one not finished yet).
ResponsesReader = Callable[[Sequence[str]], Awaitable[list[bytes | None]]]


class ResponseHub:
    """Fan-in of ``done:<id>`` channels for all the waits of one process."""

    def __init__(self, settings: Settings, keys: KeySpace, read_responses: ResponsesReader) -> None:
        self._keys = keys
        self._prefix = keys.done_prefix.encode()
        self._read_responses = read_responses
        self._subscription = open_subscription(settings, "응답 구독", self._on_message)
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
                await self._subscription.subscribe(self._keys.done(request_id))
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
                await self._subscription.unsubscribe(self._keys.done(request_id))

    async def close(self) -> None:
        if self._checker is not None:
            self._checker.cancel()
        await self._subscription.close()

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
            except QueueError as exc:  # each wait's final read tries again
                logger.warning("작업 응답 %d건 조회 실패: %s", len(batch), exc)
                return
            for request_id, response in zip(batch, responses, strict=True):
                if response is not None:
                    self._deliver(request_id, response)

    def _on_message(self, message: Message) -> None:
        channel: bytes = message["channel"]
        if not channel.startswith(self._prefix):
            return
        request_id = channel[len(self._prefix) :].decode()
        if message["type"] == "message":
            self._deliver(request_id, message["data"])
        elif message["type"] == "subscribe" and request_id in self._waiters:
            self._check_stored(request_id)
