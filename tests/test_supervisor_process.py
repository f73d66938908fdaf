"""``supervisor start`` as a real process tree: signals, orphans, systemd notify, embedded Redis."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio
from helpers import wait_for
from supervisor_harness import (
    DRAIN_TIMEOUT,
    START_TIMEOUT,
    Launcher,
    Supervisor,
    config_file,
    configured,
    pid_running,
    running,
    wait_for_workers,
    worker_pids,
    write_config,
)

from actors.endpoint import RedisEndpoint
from actors.models import ScrapingRequest, TaskStatus
from actors.multiplexed import MultiplexedConnection
from actors.queue import RedisQueue, TaskManager
from config.settings import Settings
from supervisor.redis_checks import check_eviction_policy, check_server_version, too_old
from supervisor.redis_server import RedisServer, free_port, is_ready
from supervisor.tree import SINGLETON_KINDS


async def test_sigkilled_supervisor_leaves_no_child_alive_after_two_seconds(
    settings: Settings, queue: RedisQueue, launch: Launcher, tmp_path: Path
) -> None:
    supervisor = launch(config_file(tmp_path, settings, processes=2))
    await wait_for_workers(queue, supervisor, 2)
    children = supervisor.tree()
    assert len(children) >= 2 + len(SINGLETON_KINDS)

    supervisor.process.kill()
    supervisor.process.wait()
    killed_at = time.monotonic()

    await wait_for(lambda: not any(running(c) for c in children), timeout=2.5, interval=0.05)
    assert time.monotonic() - killed_at <= 2.0


async def test_sigterm_lets_the_running_task_finish_and_exits_0_within_the_drain_timeout(
    settings: Settings, queue: RedisQueue, launch: Launcher, tmp_path: Path
) -> None:
    supervisor = launch(config_file(tmp_path, settings, processes=1))
    await wait_for_workers(queue, supervisor, 1)
    tasks = TaskManager(queue)
    request_id = await queue.enqueue_task(
        ScrapingRequest(script_name="sleep", parameters={"seconds": 1.0})
    )

    async def started() -> bool:
        return await tasks.get_task_status(request_id) is TaskStatus.RUNNING

    await wait_for(started, timeout=10, message=supervisor.output())
    children = supervisor.tree()
    supervisor.send(signal.SIGTERM)

    assert await supervisor.exit_code(DRAIN_TIMEOUT + 5) == 0, supervisor.output()
    assert await tasks.get_task_status(request_id) is TaskStatus.COMPLETED
    # The multiprocessing resource tracker ends when the supervisor's pipe closes.
    await wait_for(lambda: not any(running(c) for c in children), timeout=2)


async def test_second_sigterm_hands_the_running_task_back_at_once(
    settings: Settings, queue: RedisQueue, launch: Launcher, tmp_path: Path
) -> None:
    patient = configured(settings, supervisor={"drain_timeout": 60})
    supervisor = launch(write_config(tmp_path / "scrapeq.toml", patient, processes=1))
    await wait_for_workers(queue, supervisor, 1)
    tasks = TaskManager(queue)
    request_id = await queue.enqueue_task(
        ScrapingRequest(script_name="sleep", parameters={"seconds": 60})
    )

    async def started() -> bool:
        return await tasks.get_task_status(request_id) is TaskStatus.RUNNING

    await wait_for(started, timeout=10, message=supervisor.output())
    supervisor.send(signal.SIGTERM)
    await asyncio.sleep(0.5)
    supervisor.send(signal.SIGTERM)

    assert await supervisor.exit_code(5) == 0, supervisor.output()
    assert await tasks.get_task_status(request_id) is TaskStatus.PENDING


async def test_sighup_with_a_changed_process_count_resizes_the_pool(
    settings: Settings, queue: RedisQueue, launch: Launcher, tmp_path: Path
) -> None:
    config = config_file(tmp_path, settings, processes=1)
    supervisor = launch(config)
    first = await wait_for_workers(queue, supervisor, 1)

    config_file(tmp_path, settings, processes=3)
    supervisor.send(signal.SIGHUP)
    grown = await wait_for_workers(queue, supervisor, 3)

    assert first < grown  # the running worker was kept
    supervisor.send(signal.SIGTERM)
    assert await supervisor.exit_code(DRAIN_TIMEOUT + 5) == 0


async def test_sigttin_and_sigttou_add_and_remove_one_worker_process(
    settings: Settings, queue: RedisQueue, launch: Launcher, tmp_path: Path
) -> None:
    supervisor = launch(config_file(tmp_path, settings, processes=1))
    await wait_for_workers(queue, supervisor, 1)

    supervisor.send(signal.SIGTTIN)
    await wait_for_workers(queue, supervisor, 2)
    supervisor.send(signal.SIGTTOU)
    await wait_for_workers(queue, supervisor, 1)
    supervisor.send(signal.SIGTTOU)
    supervisor.send(signal.SIGTTOU)
    await wait_for_workers(queue, supervisor, 0)

    supervisor.send(signal.SIGTERM)
    assert await supervisor.exit_code(DRAIN_TIMEOUT + 5) == 0


async def test_sigstopped_worker_is_killed_and_replaced(
    settings: Settings, queue: RedisQueue, launch: Launcher, tmp_path: Path
) -> None:
    supervisor = launch(config_file(tmp_path, settings, processes=2))
    before = await wait_for_workers(queue, supervisor, 2)
    frozen = min(before)

    os.kill(frozen, signal.SIGSTOP)

    async def replaced() -> bool:
        pids = await worker_pids(queue, supervisor)
        return len(pids) == 2 and frozen not in pids

    await wait_for(replaced, timeout=START_TIMEOUT, interval=0.1, message=supervisor.output())
    assert not pid_running(frozen)
    supervisor.send(signal.SIGTERM)
    assert await supervisor.exit_code(DRAIN_TIMEOUT + 5) == 0


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's notify socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify.sock"))
        sock.settimeout(0.2)
        yield sock


async def next_message(sock: socket.socket) -> str | None:
    """One datagram, or None after the socket's own short timeout."""
    try:
        return (await asyncio.to_thread(sock.recv, 4096)).decode()
    except TimeoutError:
        return None


async def collect_until(sock: socket.socket, wanted: str, timeout: float) -> list[str]:
    messages: list[str] = []
    deadline = time.monotonic() + timeout
    while wanted not in messages:
        assert time.monotonic() < deadline, f"no {wanted} within {timeout} s: {messages}"
        message = await next_message(sock)
        if message is not None:
            messages.append(message)
    return messages


async def test_notify_socket_receives_ready_watchdog_and_stopping(
    settings: Settings, launch: Launcher, manager: socket.socket, tmp_path: Path
) -> None:
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "2000000"}
    supervisor = launch(config_file(tmp_path, settings, processes=2), env=env)

    messages = await collect_until(manager, "READY=1", START_TIMEOUT)
    messages += await collect_until(manager, "WATCHDOG=1", 5)
    supervisor.send(signal.SIGTERM)
    messages += await collect_until(manager, "STOPPING=1", 5)

    assert await supervisor.exit_code(DRAIN_TIMEOUT + 5) == 0
    assert any(m.startswith("STATUS=workers 2/2") for m in messages), messages
    assert messages.index("READY=1") < messages.index("STOPPING=1")


async def test_embedded_redis_is_started_when_none_listens_and_keeps_data_across_restarts(
    settings: Settings, launch: Launcher, manager: socket.socket, tmp_path: Path
) -> None:
    port = free_port()
    config = config_file(
        tmp_path,
        settings,
        processes=0,
        redis={"url": f"redis://127.0.0.1:{port}/0", "embedded": "auto"},
    )
    address = ("127.0.0.1", port)
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock")}

    first = launch(config, env)
    await collect_until(manager, "READY=1", START_TIMEOUT)
    client = redis.asyncio.Redis(port=port)
    try:
        await client.set("written-before-restart", "kept")
    finally:
        await client.aclose()
    first.send(signal.SIGTERM)
    assert await first.exit_code(DRAIN_TIMEOUT + 5) == 0, first.output()
    assert not is_ready(address)

    second = launch(config, env)
    await collect_until(manager, "READY=1", START_TIMEOUT)
    client = redis.asyncio.Redis(port=port)
    try:
        assert await client.get("written-before-restart") == b"kept"
    finally:
        await client.aclose()
    second.send(signal.SIGTERM)
    assert await second.exit_code(DRAIN_TIMEOUT + 5) == 0, second.output()
    assert (tmp_path / "state" / "redis").is_dir()


async def test_refuses_to_start_on_a_redis_that_may_evict_keys(
    settings: Settings, launch: Launcher, tmp_path: Path
) -> None:
    server = RedisServer(tmp_path / "evicting", extra={"maxmemory-policy": "allkeys-lru"})
    server.start()
    try:
        supervisor = launch(config_file(tmp_path, settings, processes=1, redis={"url": server.url}))
        assert await supervisor.exit_code(START_TIMEOUT) == 2
    finally:
        server.stop()
    assert "maxmemory-policy" in supervisor.output()
    assert "allkeys-lru" in supervisor.output()


async def completes_an_echo_then_drains(queue: RedisQueue, supervisor: Supervisor) -> None:
    """The supervisor's workers complete a task; SIGTERM then drains it to exit 0."""
    request_id = await queue.enqueue_task(ScrapingRequest(script_name="echo"))
    response = await queue.wait_for_response(request_id, 20)
    assert response.status is TaskStatus.COMPLETED
    supervisor.send(signal.SIGTERM)
    assert await supervisor.exit_code(DRAIN_TIMEOUT + 5) == 0, supervisor.output()


async def test_a_redis_unreachable_at_start_is_waited_for_and_work_begins_when_it_answers(
    settings: Settings, launch: Launcher, tmp_path: Path
) -> None:
    server = RedisServer(tmp_path / "late", appendonly=False)
    late = configured(settings, redis={"url": server.url})
    supervisor = launch(config_file(tmp_path, late, processes=1))
    await wait_for(
        lambda: "기다리는 중" in supervisor.output(), timeout=10, message=supervisor.output()
    )
    await asyncio.sleep(3)  # several tries, none fatal
    assert supervisor.process.poll() is None, supervisor.output()

    server.start()
    try:
        async with RedisQueue(late) as queue:
            await wait_for_workers(queue, supervisor, 1)
            await completes_an_echo_then_drains(queue, supervisor)
    finally:
        server.stop()


async def test_sigterm_while_waiting_for_redis_at_start_exits_0(
    settings: Settings, launch: Launcher, tmp_path: Path
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    supervisor = launch(config_file(tmp_path, settings, processes=1, redis={"url": url}))
    await wait_for(lambda: "기다리는 중" in supervisor.output(), timeout=10)

    supervisor.send(signal.SIGTERM)

    assert await supervisor.exit_code(5) == 0, supervisor.output()


async def test_eviction_check_is_skipped_when_the_user_may_not_read_the_config(
    redis_server: RedisServer,
    redis_client: redis.asyncio.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    user = f"noconfig-{uuid.uuid4().hex[:8]}"
    await redis_client.acl_setuser(
        user, enabled=True, passwords=["+secret"], commands=["+@all", "-config"], keys=["*"]
    )
    endpoint = RedisEndpoint(
        host=redis_server.host, port=redis_server.port, username=user, password="secret"
    )
    connection = MultiplexedConnection(endpoint, retries=0)
    try:
        await check_eviction_policy(connection)
    finally:
        await connection.close()
        await redis_client.acl_deluser(user)

    assert "maxmemory-policy를 확인할 수 없어" in caplog.text


@pytest.mark.parametrize(
    ("version", "old"),
    [("6.0.16", True), ("5.0.7", True), ("6.2.0", False), ("7.0.15", False), ("8.0", False)],
)
def test_a_server_older_than_6_2_is_too_old(version: str, old: bool) -> None:
    assert too_old(version) is old


async def test_server_version_is_read_from_hello(queue: RedisQueue) -> None:
    version = await check_server_version(queue.connection)

    assert not too_old(version)


async def test_supervisor_starts_and_works_when_an_acl_refuses_info_config_and_hello(
    settings: Settings,
    redis_client: redis.asyncio.Redis,
    queue: RedisQueue,
    launch: Launcher,
    tmp_path: Path,
) -> None:
    user, password = f"noinfo-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    await redis_client.execute_command(
        "ACL", "SETUSER", user, "on", f">{password}", "~*", "&*", "+@all",
        "-info", "-config", "-hello",
    )  # fmt: skip
    url = settings.redis.url.replace("redis://", f"redis://{user}:{password}@", 1)
    try:
        supervisor = launch(config_file(tmp_path, settings, processes=1, redis={"url": url}))
        await wait_for_workers(queue, supervisor, 1)
        await completes_an_echo_then_drains(queue, supervisor)
    finally:
        await redis_client.execute_command("ACL", "DELUSER", user)
    output = supervisor.output()
    assert "Traceback" not in output
    assert "run_id" in output  # the warning that restarts go unnoticed by run_id


async def test_auto_waits_for_a_configured_redis_that_is_down_and_never_replaces_it(
    settings: Settings, launch: Launcher, tmp_path: Path
) -> None:
    server = RedisServer(tmp_path / "configured", appendonly=True)
    server.start()
    auto = configured(settings, redis={"url": server.url, "embedded": "auto"})
    config = config_file(tmp_path, auto, processes=1)
    try:
        first = launch(config)
        async with RedisQueue(auto) as queue:
            await wait_for_workers(queue, first, 1)
        first.send(signal.SIGTERM)
        assert await first.exit_code(DRAIN_TIMEOUT + 5) == 0, first.output()
        async with RedisQueue(auto) as queue:
            kept = await queue.enqueue_task(ScrapingRequest(script_name="echo"))
        server.stop()

        second = launch(config)
        await wait_for(
            lambda: "기다리는 중" in second.output(), timeout=10, message=second.output()
        )
        assert not is_ready(server.address), "auto started a Redis of its own in its place"
        assert "내장 Redis를 시작합니다" not in second.output()

        server.start()  # the configured Redis comes back, with its data
        async with RedisQueue(auto) as queue:
            response = await queue.wait_for_response(kept, 30)
        assert response.status is TaskStatus.COMPLETED
        second.send(signal.SIGTERM)
        assert await second.exit_code(DRAIN_TIMEOUT + 5) == 0, second.output()
    finally:
        server.stop()
