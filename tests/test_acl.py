"""Least-privilege ACL users, exactly as deploy/redis.conf writes them, on a real server.

A worker host (``supervisor start``) runs as ``scrapeq-worker``, a Gateway as
``scrapeq-gateway``: the whole workflow works, anything outside the rules is
refused, and a user missing one right is refused at start naming it.
"""

from __future__ import annotations

import signal
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
from supervisor_harness import DRAIN_TIMEOUT, START_TIMEOUT, Launcher, config_file, wait_for_workers

from actors.exceptions import QueueConnectionException
from actors.models import ScrapingRequest, TaskStatus
from actors.queue import RedisQueue, TaskManager
from actors.rights import PRODUCER, WORKER_HOST, acl_rule
from config.settings import Settings

DEPLOY_CONF = Path(__file__).resolve().parents[1] / "deploy" / "redis.conf"

AclUser = Callable[..., Coroutine[Any, Any, str]]


def deployed_rule(user: str) -> list[str]:
    """The commented ``user`` line of deploy/redis.conf, as ACL SETUSER tokens after the name."""
    for line in DEPLOY_CONF.read_text().splitlines():
        if line.startswith(f"# user {user} "):
            return line.removeprefix(f"# user {user} ").split()
    raise AssertionError(f"deploy/redis.conf has no line for {user}")


@pytest.mark.parametrize(
    ("user", "commands"), [("scrapeq-worker", WORKER_HOST), ("scrapeq-gateway", PRODUCER)]
)
def test_the_deployed_rules_grant_exactly_what_each_role_needs(
    user: str, commands: tuple[str, ...]
) -> None:
    tokens = [token for token in deployed_rule(user) if not token.startswith(">")]
    assert " ".join(["user", user, *tokens]) == acl_rule(user, commands, "scraping")


@pytest.fixture
async def acl_user(redis_client: redis.asyncio.Redis, settings: Settings) -> AsyncIterator[AclUser]:
    """Creates users from deploy/redis.conf's rules on the test's key prefix; deletes them after."""
    created: list[str] = []

    async def create(role: str, drop: str = "") -> str:
        name, password = f"{role}-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
        prefix = settings.redis.key_prefix
        tokens = [
            token.replace("scraping:", f"{prefix}:")
            for token in deployed_rule(role)
            if not token.startswith(">") and token != f"+{drop}"
        ]
        await redis_client.execute_command("ACL", "SETUSER", name, "reset", *tokens, f">{password}")
        created.append(name)
        return settings.redis.url.replace("redis://", f"redis://{name}:{password}@", 1)

    yield create
    for name in created:
        await redis_client.execute_command("ACL", "DELUSER", name)


def as_user(settings: Settings, url: str) -> Settings:
    data = settings.model_dump()
    data["redis"]["url"] = url
    return Settings.model_validate(data)


async def test_the_whole_workflow_runs_as_the_worker_and_gateway_users(
    settings: Settings, acl_user: AclUser, queue: RedisQueue, launch: Launcher, tmp_path: Path
) -> None:
    worker_url = await acl_user("scrapeq-worker")
    gateway_url = await acl_user("scrapeq-gateway")
    supervisor = launch(config_file(tmp_path, settings, processes=1, redis={"url": worker_url}))
    await wait_for_workers(queue, supervisor, 1)

    async with RedisQueue(as_user(settings, gateway_url)) as gateway:
        done = await gateway.enqueue_task(ScrapingRequest(script_name="echo", parameters={"a": 1}))
        failing = await gateway.enqueue_task(
            ScrapingRequest(script_name="fail", parameters={}, max_retries=0)
        )
        cancelled = await gateway.enqueue_task(
            ScrapingRequest(script_name="sleep", parameters={"seconds": 30})
        )
        assert (await gateway.wait_for_response(done, 20)).data == {"a": 1}
        assert (await gateway.wait_for_response(failing, 20)).status is TaskStatus.FAILED
        assert await gateway.cancel_task(cancelled)
        assert await TaskManager(gateway).get_task_status(cancelled) is TaskStatus.CANCELLED

    async with RedisQueue(as_user(settings, worker_url)) as operator:
        manager = TaskManager(operator)
        assert [d["request_id"] for d in await manager.list_dead_letters()] == [failing]
        assert await manager.requeue_dead_letter(failing)
        assert (await manager.queue_stats())["completed"] >= 1

    supervisor.send(signal.SIGTERM)
    assert await supervisor.exit_code(DRAIN_TIMEOUT + 5) == 0, supervisor.output()
    assert "Traceback" not in supervisor.output()


@pytest.mark.parametrize("role", ["scrapeq-worker", "scrapeq-gateway"])
async def test_anything_outside_the_rules_is_refused(
    settings: Settings, acl_user: AclUser, role: str
) -> None:
    url = await acl_user(role)
    prefix = settings.redis.key_prefix
    async with redis.asyncio.Redis.from_url(url) as client:
        for command in (
            ("FLUSHALL",),
            ("KEYS", "*"),
            ("CONFIG", "SET", "maxmemory", "1"),
            ("EVAL", "return 1", "0"),
            ("GET", "someone-else:key"),
            ("PUBLISH", "someone-else:channel", "x"),
            ("ACL", "LIST"),
            ("DEBUG", "SLEEP", "0"),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                await client.execute_command(*command)
        if role == "scrapeq-gateway":  # a producer cannot take or delete work
            for command in (("DEL", f"{prefix}:x"), ("ZPOPMIN", f"{prefix}:x"), ("SCAN", 0)):
                with pytest.raises(redis.exceptions.NoPermissionError):
                    await client.execute_command(*command)


async def test_a_worker_user_missing_a_right_is_refused_at_start_naming_it(
    settings: Settings, acl_user: AclUser, launch: Launcher, tmp_path: Path
) -> None:
    url = await acl_user("scrapeq-worker", drop="zpopmin")
    supervisor = launch(config_file(tmp_path, settings, processes=1, redis={"url": url}))

    assert await supervisor.exit_code(START_TIMEOUT) == 2, supervisor.output()
    assert "ZPOPMIN" in supervisor.output()


async def test_a_gateway_user_missing_a_right_is_refused_at_connect_naming_it(
    settings: Settings, acl_user: AclUser
) -> None:
    url = await acl_user("scrapeq-gateway", drop="hset")

    with pytest.raises(QueueConnectionException, match="HSET"):
        await RedisQueue(as_user(settings, url)).connect()
