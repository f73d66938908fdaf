"""One pub/sub connection, kept open by a background task that survives reconnects.

The task connects, subscribes every channel asked for so far and hands each
message, including each subscription confirmation, to a callback. When the
connection breaks it backs off (with jitter, logging little), reconnects and
subscribes again: a confirmation that arrives again after a reconnect is how
users learn that messages published during the outage may have been missed.

``subscribe`` and ``unsubscribe`` only write to the connection (or, while it
is down, remember the channels), so thousands of concurrent waits cost no
round trip each and cannot race each other into reconnecting. A connection
silent for ``KEEPALIVE`` seconds is pinged; no answer within ``PING_TIMEOUT``
counts as broken (a half-open peer never says so itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import hiredis

from actors import redis_errors
from actors.backoff import Outage
from actors.endpoint import RedisEndpoint
from actors.multiplexed import RespProtocol, open_protocol

logger = logging.getLogger(__name__)

Message = dict[str, Any]
"""``type`` (str: message, subscribe, unsubscribe), ``channel`` and ``data`` (bytes or int)."""

#: Seconds without any traffic before the connection is pinged.
KEEPALIVE = 30.0
#: Seconds a ping (or a new connection) may take before the connection counts as broken.
PING_TIMEOUT = 15.0
CONNECT_TIMEOUT = 5.0
_KINDS = frozenset({b"message", b"subscribe", b"unsubscribe"})


class Subscription:
    def __init__(
        self,
        endpoint: RedisEndpoint,
        what: str,
        on_message: Callable[[Message], None],
        on_outage: Callable[[], None] | None = None,
    ) -> None:
        self._endpoint = endpoint
        self._outage = Outage(what, logger)
        self._on_message = on_message
        self._on_outage = on_outage
        self._channels: set[str] = set()
        self._protocol: RespProtocol | None = None
        self._runner: asyncio.Task[None] | None = None
        self._closing = False

    async def subscribe(self, *channels: str) -> None:
        new = [channel for channel in channels if channel not in self._channels]
        self._channels.update(new)
        if self._runner is None:
            self._runner = asyncio.create_task(self._run())
        elif new:
            self._write("SUBSCRIBE", *new)

    async def unsubscribe(self, *channels: str) -> None:
        gone = [channel for channel in channels if channel in self._channels]
        self._channels.difference_update(gone)
        if gone:
            self._write("UNSUBSCRIBE", *gone)

    async def close(self) -> None:
        self._closing = True
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        if self._protocol is not None:
            self._protocol.abort(redis_errors.ConnectionError("subscription closed"))
            self._protocol = None

    def _write(self, *command: Any) -> None:
        """Send now if connected; otherwise the next connection subscribes from the set."""
        if self._protocol is None:
            return
        with contextlib.suppress(redis_errors.ConnectionError):
            self._protocol.write(hiredis.pack_command(command))

    async def _run(self) -> None:
        while not self._closing:
            try:
                protocol = await open_protocol(self._endpoint, CONNECT_TIMEOUT)
            except (redis_errors.ConnectionError, redis_errors.TimeoutError) as exc:
                await self._broken(exc)
                continue
            protocol.push = self._on_reply
            self._protocol = protocol
            if self._channels:
                self._write("SUBSCRIBE", *self._channels)
            error = await self._watch(protocol)
            self._protocol = None
            await self._broken(error)

    async def _watch(self, protocol: RespProtocol) -> BaseException:
        """Wait until the connection breaks, pinging it when it has been quiet."""
        loop = asyncio.get_running_loop()
        protocol.last_received = loop.time()
        while True:
            quiet = loop.time() - protocol.last_received
            if quiet >= KEEPALIVE + PING_TIMEOUT:
                error = redis_errors.TimeoutError(f"no answer to a ping in {PING_TIMEOUT:g} s")
                protocol.abort(error)
                return error
            if quiet >= KEEPALIVE:
                with contextlib.suppress(redis_errors.ConnectionError):
                    protocol.write(hiredis.pack_command(("PING",)))
                wait = KEEPALIVE + PING_TIMEOUT - quiet
            else:
                wait = KEEPALIVE - quiet
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await asyncio.shield(protocol.closed)
            if protocol.broken is not None:
                return protocol.broken

    async def _broken(self, error: BaseException) -> None:
        if self._closing:
            return
        if self._on_outage is not None:
            self._on_outage()
        await self._outage.failed(error)

    def _on_reply(self, reply: Any) -> None:
        if isinstance(reply, hiredis.ReplyError):  # e.g. NOPERM: an ACL without the channel
            logger.error("구독 요청이 거부됨: %s", reply)
            return
        if not isinstance(reply, list) or len(reply) != 3 or reply[0] not in _KINDS:
            return  # a pong, or a reply to nothing we need
        if reply[0] == b"subscribe":
            self._outage.succeeded()
        try:
            self._on_message({"type": reply[0].decode(), "channel": reply[1], "data": reply[2]})
        except Exception:  # a consumer's bug must not break the connection
            logger.exception("구독 메시지 처리 중 오류")
