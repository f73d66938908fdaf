"""The multiplexed connection that carries every Lua script call (actors/multiplexed.py)."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import hiredis
import pytest
import redis.asyncio

from actors import redis_errors
from actors.endpoint import RedisEndpoint
from actors.exceptions import ScriptError
from actors.models import ScrapingRequest, TaskStatus
from actors.multiplexed import MultiplexedConnection
from actors.queue import RedisQueue, TaskManager
from config.settings import Settings
from supervisor.redis_server import RedisServer


@pytest.fixture
async def connection(redis_url: str) -> AsyncIterator[MultiplexedConnection]:
    conn = MultiplexedConnection(RedisEndpoint.parse(redis_url), retries=2)
    yield conn
    await conn.close()


async def test_concurrent_calls_each_get_their_own_reply(
    connection: MultiplexedConnection, key_prefix: str
) -> None:
    replies = await asyncio.gather(*(connection.execute("ECHO", f"m{i}") for i in range(2000)))

    assert replies == [f"m{i}".encode() for i in range(2000)]
    assert await connection.execute("INCRBY", f"{key_prefix}:n", 5) == 5


async def test_a_cancelled_call_does_not_shift_the_replies_of_later_ones(
    connection: MultiplexedConnection, key_prefix: str
) -> None:
    slow = asyncio.ensure_future(connection.execute("BLPOP", f"{key_prefix}:empty", "0.2"))
    await asyncio.sleep(0.05)
    slow.cancel()
    follower = await connection.execute("ECHO", "after")

    assert follower == b"after"
    assert slow.cancelled()


async def test_error_replies_raise_redis_py_errors_and_the_connection_goes_on(
    connection: MultiplexedConnection, key_prefix: str
) -> None:
    await connection.execute("SET", f"{key_prefix}:s", "text")
    with pytest.raises(redis_errors.ResponseError, match="WRONGTYPE"):
        await connection.execute("LPUSH", f"{key_prefix}:s", "x")
    with pytest.raises(redis_errors.NoScriptError):
        await connection.execute("EVALSHA", "0" * 40, 0)

    assert await connection.execute("GET", f"{key_prefix}:s") == b"text"


async def test_a_killed_connection_is_reopened_and_the_call_retried(
    connection: MultiplexedConnection, redis_client: redis.asyncio.Redis
) -> None:
    await connection.execute("CLIENT", "SETNAME", "multiplexed-under-test")
    pending = asyncio.ensure_future(connection.execute("BLPOP", "never-pushed", "1"))
    await asyncio.sleep(0.1)
    clients = await redis_client.client_list()
    victim = next(c for c in clients if c["name"] == "multiplexed-under-test")
    await redis_client.client_kill_filter(_id=victim["id"])

    assert await pending is None  # retried on a new connection: BLPOP times out empty
    assert await connection.execute("ECHO", "alive") == b"alive"


async def test_a_call_with_no_reply_times_out_and_the_next_call_gets_a_fresh_connection(
    redis_url: str, redis_client: redis.asyncio.Redis
) -> None:
    conn = MultiplexedConnection(RedisEndpoint.parse(redis_url), retries=0, call_timeout=0.3)
    try:
        await conn.execute("PING")
        await redis_client.execute_command("CLIENT", "PAUSE", 600, "ALL")
        with pytest.raises(redis_errors.TimeoutError):
            await conn.execute("PING")
        await asyncio.sleep(0.5)  # the pause is over
        assert await conn.execute("ECHO", "fresh") == b"fresh"
    finally:
        await redis_client.execute_command("CLIENT", "UNPAUSE")
        await conn.close()


async def test_scripts_are_loaded_again_after_redis_forgot_them(
    settings: Settings, redis_client: redis.asyncio.Redis
) -> None:
    async with RedisQueue(settings) as queue:
        first = await queue.enqueue_task(ScrapingRequest(script_name="echo"))
        await redis_client.script_flush()
        second = await queue.enqueue_task(ScrapingRequest(script_name="echo"))
        manager = TaskManager(queue)

        assert await manager.get_task_status(first) == TaskStatus.PENDING
        assert await manager.get_task_status(second) == TaskStatus.PENDING


async def test_unreachable_redis_raises_a_connection_error_after_retries(
    tmp_path: Path,
) -> None:
    conn = MultiplexedConnection(RedisEndpoint.parse(f"unix://{tmp_path}/nobody.sock"), retries=1)
    with pytest.raises(redis_errors.ConnectionError, match="cannot connect"):
        await conn.execute("PING")
    await conn.close()


async def test_script_errors_from_redis_become_script_errors(settings: Settings) -> None:
    async with RedisQueue(settings) as queue:
        with pytest.raises(ScriptError, match="Redis refused"):
            await queue.store._run("enqueue", [], [])  # no keys: the script fails


@pytest.fixture(scope="module")
def secured_server() -> Iterator[RedisServer]:
    """A password-protected redis-server on a unix socket only."""
    with tempfile.TemporaryDirectory(prefix="mx-", dir="/tmp") as folder:
        server = RedisServer(
            Path(folder), unix_socket=Path(folder) / "r.sock", password="s3cret", appendonly=False
        )
        server.start()
        yield server
        server.stop()


async def test_unix_socket_password_and_database_from_the_url_are_used(
    secured_server: RedisServer,
) -> None:
    url = f"unix://:s3cret@{secured_server.unix_socket}?db=3"
    conn = MultiplexedConnection(RedisEndpoint.parse(url), retries=0)
    try:
        await conn.execute("SET", "mx:where", "db3")
        assert await conn.execute("CLIENT", "INFO") is not None
    finally:
        await conn.close()
    check = redis.asyncio.Redis(
        unix_socket_path=str(secured_server.unix_socket), password="s3cret", db=3
    )
    try:
        assert await check.get("mx:where") == b"db3"
    finally:
        await check.aclose()


async def test_a_wrong_password_is_an_authentication_error(secured_server: RedisServer) -> None:
    conn = MultiplexedConnection(
        RedisEndpoint.parse(f"unix://:wrong@{secured_server.unix_socket}"), retries=0
    )
    with pytest.raises(redis_errors.AuthenticationError):
        await conn.execute("PING")
    await conn.close()


def test_a_read_only_refusal_is_recognised_also_inside_a_script_error() -> None:
    # Redis 7 keeps the READONLY code for a script's write on a replica; 6.2 wraps it.
    for reply in (
        "READONLY You can't write against a read only replica.",
        "ERR Error running script (call to f_1): @user_script:1: @user_script: 1:"
        " -READONLY You can't write against a read only replica.",
    ):
        assert isinstance(
            redis_errors.from_reply(hiredis.ReplyError(reply)), redis_errors.ReadOnlyError
        )
    assert (
        type(redis_errors.from_reply(hiredis.ReplyError("ERR other"))) is redis_errors.ResponseError
    )
