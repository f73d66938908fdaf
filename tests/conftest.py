"""Fixtures shared by every test: one real redis-server per session, a key prefix per test."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio
from helpers import close_raw_clients
from supervisor_harness import Launcher

from actors.queue import RedisQueue, TaskManager
from config.settings import Settings
from supervisor.redis_server import RedisServer

_LEAKY_ENV = (
    "REDIS_URL",
    "REDIS_HOST",
    "REDIS_PORT",
    "REDIS_DB",
    "REDIS_PASSWORD",
    "SUPERVISOR_CONFIG",
    "TASK_QUEUE_TIMEOUT",
    "WORKER_HEARTBEAT_INTERVAL",
    "CLEANUP_INTERVAL",
)


#: How long before its timeout a still-running async test prints its tasks' stacks.
STUCK_NOTICE = 10.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if isinstance(item, pytest.Function) and asyncio.iscoroutinefunction(item.obj):
            item.fixturenames.append("_stuck_tasks_report")
            item.fixturenames.append("_raw_clients_closed")


@pytest.fixture
async def _stuck_tasks_report(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Print where every asyncio task waits if the test is about to time out.

    pytest-timeout's dump shows threads, and in an event loop that is only
    the frame running at that moment; the awaited-on chain of each task is
    what tells why a test hangs.
    """
    marker = request.node.get_closest_marker("timeout")
    timeout = (
        float(marker.args[0])
        if marker and marker.args
        else float(request.config.getini("timeout") or 0)
    )
    handle = None
    if timeout > 2 * STUCK_NOTICE:
        loop = asyncio.get_running_loop()
        handle = loop.call_later(timeout - STUCK_NOTICE, _print_tasks, request.node.nodeid)
    yield
    if handle is not None:
        handle.cancel()


@pytest.fixture
async def _raw_clients_closed() -> AsyncIterator[None]:
    """Close the raw redis-py clients (helpers.admin) a test opened, on its own loop."""
    yield
    await close_raw_clients()


def _print_tasks(test: str) -> None:
    tasks = asyncio.all_tasks()
    print(f"\n{test}: still running; {len(tasks)} asyncio tasks:", file=sys.stderr)
    for task in tasks:
        print(f"  {task.get_name()}:", file=sys.stderr)
        for where in _await_chain(task.get_coro()):
            print(f"    {where}", file=sys.stderr)


def _await_chain(awaitable: object) -> Iterator[str]:
    """Each frame of a suspended coroutine down to what it waits on (a future)."""
    while awaitable is not None:
        frame = getattr(awaitable, "cr_frame", None) or getattr(awaitable, "gi_frame", None)
        if frame is None:
            yield f"awaits {awaitable!r}"[:300]
            return
        yield f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"
        awaitable = getattr(awaitable, "cr_await", None) or getattr(awaitable, "gi_yieldfrom", None)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the developer's or CI's Redis/config env vars out of every test."""
    scrapeq_vars = [name for name in os.environ if name.startswith("SCRAPEQ_")]
    for name in (*_LEAKY_ENV, *scrapeq_vars):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server on a free loopback port, append-only, for the whole session.

    Tests may kill or pause it; request ``redis_url`` rather than this fixture's ``url``
    so a later test gets it back running.
    """
    server = RedisServer(tmp_path_factory.mktemp("redis"), appendonly=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session server's URL, after undoing whatever an earlier test did to it."""
    if redis_server.is_running():
        redis_server.resume()
    else:
        redis_server.start()
    return redis_server.url


@pytest.fixture
def key_prefix() -> str:
    """A prefix no other test uses, so tests share one server without FLUSHALL."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def settings(redis_url: str, key_prefix: str, tmp_path: Path) -> Settings:
    """Settings for a test: its own prefix and state dir, fast heartbeats and retries."""
    return Settings.model_validate(
        {
            "redis": {"url": redis_url, "embedded": "never", "key_prefix": key_prefix},
            "tasks": {"retry_backoff": 0.05, "retry_backoff_max": 0.2, "cleanup_interval": 1},
            "heartbeat": {"interval": 0.2, "timeout": 1.0},
            "supervisor": {"state_dir": tmp_path / "state", "metrics_port": 0},
        }
    )


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def queue(settings: Settings) -> AsyncIterator[RedisQueue]:
    """A connected RedisQueue on the test's key prefix."""
    async with RedisQueue(settings) as connected:
        yield connected


@pytest.fixture
def partitioned(settings: Settings) -> Settings:
    """The test's settings with ``[redis] partitions = 3`` (on the one test server)."""
    return Settings.model_validate(
        settings.model_dump() | {"redis": settings.redis.model_dump() | {"partitions": 3}}
    )


@pytest.fixture
async def pqueue(partitioned: Settings) -> AsyncIterator[RedisQueue]:
    """A connected 3-partition RedisQueue, its settings published as ``supervisor start`` does."""
    async with RedisQueue(partitioned, adopt_layout=True) as connected:
        await connected.publish_settings(partitioned)
        yield connected


@pytest.fixture
def manager(queue: RedisQueue) -> TaskManager:
    return TaskManager(queue)


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launcher]:
    """Starts ``supervisor start`` processes; kills whatever is left of them afterwards."""
    launcher = Launcher(tmp_path)
    yield launcher
    launcher.kill_all()


@pytest.fixture
async def restore_signals() -> AsyncIterator[None]:
    """Actor.main installs process signal handlers; give pytest its own back."""
    watched = (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGTERM)
    saved = {signum: signal.getsignal(signum) for signum in watched}
    yield
    asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)
    for signum, handler in saved.items():
        signal.signal(signum, handler)
