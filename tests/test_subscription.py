"""The pub/sub connection behind waits and wake-ups (actors/subscription.py)."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio
from faults.proxy import Proxy
from helpers import wait_for

from actors import subscription as subscription_module
from actors.endpoint import RedisEndpoint
from actors.subscription import Message, Subscription
from supervisor.redis_server import RedisServer


class Inbox:
    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.outages = 0

    def on_message(self, message: Message) -> None:
        self.messages.append(message)

    def on_outage(self) -> None:
        self.outages += 1

    def of(self, kind: str, channel: str) -> list[Message]:
        return [m for m in self.messages if m["type"] == kind and m["channel"] == channel.encode()]


async def test_messages_and_confirmations_reach_the_callback(
    redis_url: str, redis_client: redis.asyncio.Redis, key_prefix: str
) -> None:
    inbox = Inbox()
    sub = Subscription(RedisEndpoint.parse(redis_url), "test", inbox.on_message)
    channel = f"{key_prefix}:ch"
    try:
        await sub.subscribe(channel)
        await wait_for(lambda: inbox.of("subscribe", channel), timeout=3)
        await redis_client.publish(channel, "hello")
        await wait_for(lambda: inbox.of("message", channel), timeout=3)
        await sub.unsubscribe(channel)
        await wait_for(lambda: inbox.of("unsubscribe", channel), timeout=3)
        await redis_client.publish(channel, "unheard")
        await asyncio.sleep(0.1)
    finally:
        await sub.close()

    assert [m["data"] for m in inbox.of("message", channel)] == [b"hello"]


async def test_a_killed_connection_is_resubscribed_and_confirmed_again(
    redis_url: str, redis_client: redis.asyncio.Redis, key_prefix: str
) -> None:
    inbox = Inbox()
    sub = Subscription(RedisEndpoint.parse(redis_url), "test", inbox.on_message, inbox.on_outage)
    channel = f"{key_prefix}:ch"
    try:
        await sub.subscribe(channel)
        await wait_for(lambda: inbox.of("subscribe", channel), timeout=3)
        await redis_client.client_kill_filter(_type="pubsub")
        await wait_for(lambda: len(inbox.of("subscribe", channel)) == 2, timeout=5)
        await redis_client.publish(channel, "after")
        await wait_for(lambda: inbox.of("message", channel), timeout=3)
    finally:
        await sub.close()

    assert inbox.outages == 1


async def test_many_subscribes_while_redis_is_down_open_one_connection_when_it_returns(
    redis_server: RedisServer, redis_url: str, key_prefix: str
) -> None:
    inbox = Inbox()
    sub = Subscription(RedisEndpoint.parse(redis_url), "test", inbox.on_message)
    channels = [f"{key_prefix}:c{i}" for i in range(200)]
    redis_server.kill()
    try:
        await asyncio.gather(*(sub.subscribe(c) for c in channels))
        await asyncio.sleep(0.3)
        redis_server.start()
        await wait_for(lambda: all(inbox.of("subscribe", c) for c in channels), timeout=10)
        async with redis.asyncio.Redis.from_url(redis_url) as client:
            clients = await client.client_list(_type="pubsub")
    finally:
        await sub.close()

    assert len(clients) == 1


async def test_a_silent_half_open_connection_is_pinged_and_replaced(
    redis_url: str, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(subscription_module, "KEEPALIVE", 0.3)
    monkeypatch.setattr(subscription_module, "PING_TIMEOUT", 0.3)
    inbox = Inbox()
    channel = f"{key_prefix}:ch"
    with Proxy.for_url(redis_url) as proxy:
        sub = Subscription(
            RedisEndpoint.parse(proxy.url), "test", inbox.on_message, inbox.on_outage
        )
        try:
            await sub.subscribe(channel)
            await wait_for(lambda: inbox.of("subscribe", channel), timeout=3)
            proxy.set_mode("blackhole")
            await wait_for(lambda: inbox.outages >= 1, timeout=3)
            proxy.set_mode("pass")
            await wait_for(lambda: len(inbox.of("subscribe", channel)) >= 2, timeout=5)
        finally:
            await sub.close()
