"""The process tree's logic with a fake process backend and the session's real Redis.

The fake backend stands in for OS processes only: a fake worker registers and
heartbeats through the real `WorkerMonitor`, and leases are taken and handed
back by the real scripts, so the tree's Redis side runs for real.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from signal import Signals
from typing import Any, cast

import pytest
from helpers import admin, subscribed, wait_for
from redis.asyncio.client import PubSub
from supervisor_harness import configured, write_config

from actors.exit_codes import ChildExit
from actors.models import ScrapingRequest
from actors.queue import RedisQueue, TaskManager, WorkerMonitor
from actors.runtime import ActorSpec
from config.settings import Settings
from supervisor import tree as tree_module
from supervisor.notify import SystemdNotifier
from supervisor.process_backend import ChildProcess, ExitCallback
from supervisor.redis_checks import EpochGuard
from supervisor.redis_server import RedisServer
from supervisor.signals import Command, SignalCommands
from supervisor.tree import SINGLETON_KINDS, ProcessTree

FAKE_BEAT = 0.05


@dataclass(eq=False)
class FakeProcess:
    spec: ActorSpec
    pid: int
    on_exit: ExitCallback
    exitcode: int | None = None
    signals: list[signal.Signals] = field(default_factory=list)
    frozen: bool = False
    """A frozen fake worker stops heartbeating, as a SIGSTOPped or blocked one would."""

    def is_alive(self) -> bool:
        return self.exitcode is None


class FakeBackend:
    """Records spawns and signals; obeys SIGTERM/SIGUSR1 by exiting 0 unless `stubborn`."""

    def __init__(self, monitor: WorkerMonitor) -> None:
        self.monitor = monitor
        self.processes: list[FakeProcess] = []
        self.stubborn = False
        self._beats: set[asyncio.Task[None]] = set()

    def spawn(self, spec: ActorSpec, on_exit: ExitCallback) -> ChildProcess:
        process = FakeProcess(spec, 100_000 + len(self.processes), on_exit)
        self.processes.append(process)
        if spec.kind == "worker":
            task = asyncio.create_task(self._beat(process))
            self._beats.add(task)
            task.add_done_callback(self._beats.discard)
        return process

    def signal(self, child: ChildProcess, signum: signal.Signals) -> None:
        process = cast(FakeProcess, child)
        process.signals.append(signum)
        if signum in (signal.SIGTERM, signal.SIGUSR1) and not self.stubborn:
            self.exit(process, ChildExit.OK)

    def kill(self, child: ChildProcess) -> None:
        process = cast(FakeProcess, child)
        process.signals.append(signal.SIGKILL)
        self.exit(process, -signal.SIGKILL)

    def exit(self, process: FakeProcess, code: int) -> None:
        if process.is_alive():
            process.exitcode = code
            asyncio.get_running_loop().call_soon(process.on_exit, code)

    def alive(self, kind: str = "worker") -> list[FakeProcess]:
        return [p for p in self.processes if p.spec.kind == kind and p.is_alive()]

    def named(self, name: str) -> list[FakeProcess]:
        """Every incarnation of a child name (``worker-0``, ``heartbeat``), oldest first."""
        return [p for p in self.processes if f"-{name}-" in p.spec.actor_id]

    async def wait_for_incarnations(self, name: str, count: int) -> None:
        await wait_for(lambda: len(self.named(name)) == count, timeout=2)

    async def wait_for_signals(self, process: FakeProcess, signals: list[Signals]) -> None:
        await wait_for(lambda: process.signals == signals, timeout=2)

    async def close(self) -> None:
        for task in self._beats:
            task.cancel()
        await asyncio.gather(*self._beats, return_exceptions=True)

    async def _beat(self, process: FakeProcess) -> None:
        await self.monitor.register_worker(process.spec.actor_id, pid=process.pid)
        while process.is_alive():
            await asyncio.sleep(FAKE_BEAT)
            if not process.frozen:
                await self.monitor.update_heartbeat(process.spec.actor_id)


@pytest.fixture
async def backend(queue: RedisQueue) -> AsyncIterator[FakeBackend]:
    fake = FakeBackend(WorkerMonitor(queue))
    yield fake
    await fake.close()


@dataclass
class Supervise:
    """Starts trees on the fake backend; stops whatever is left at teardown."""

    queue: RedisQueue
    backend: FakeBackend
    running: list[tuple[ProcessTree, asyncio.Task[int]]] = field(default_factory=list)

    async def __call__(
        self,
        settings: Settings,
        *,
        config: Path | None = None,
        notifier: SystemdNotifier | None = None,
    ) -> tuple[ProcessTree, asyncio.Task[int]]:
        epoch = EpochGuard(self.queue.connection, self.queue.partitions)
        await epoch.establish()
        tree = ProcessTree(
            settings,
            self.queue,
            self.backend,
            epoch,
            load_settings=lambda: Settings.from_file(config) if config else settings,
            notifier=notifier or SystemdNotifier(environ={}),
        )
        task = asyncio.create_task(tree.run())
        self.running.append((tree, task))
        await wait_for(lambda: bool(self.backend.processes), timeout=2)
        return tree, task


@pytest.fixture
async def supervise(queue: RedisQueue, backend: FakeBackend) -> AsyncIterator[Supervise]:
    runner = Supervise(queue, backend)
    yield runner
    for tree, task in runner.running:
        if not task.done():
            backend.stubborn = False
            tree.command(Command.STOP_NOW)
            await asyncio.wait_for(task, 10)


@pytest.fixture
def fast(settings: Settings) -> Settings:
    """Test settings with fast restarts (backoff capped at 0.1 s)."""
    return configured(settings, supervisor={"restart_backoff_max": 0.1})


async def next_event(pubsub: PubSub, name: str, timeout: float = 2) -> dict[str, Any]:
    """The next event called ``name`` on a subscription to the event channel."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
        if message is not None and (event := json.loads(message["data"]))["event"] == name:
            return cast(dict[str, Any], event)
    raise AssertionError(f"no {name} event within {timeout} s")


async def drained(tree: ProcessTree, task: asyncio.Task[int]) -> int:
    tree.command(Command.DRAIN)
    return await asyncio.wait_for(task, 10)


async def test_starts_the_configured_workers_and_one_of_each_singleton(
    fast: Settings, supervise: Supervise, backend: FakeBackend
) -> None:
    settings = configured(fast, worker={"processes": 3})
    tree, task = await supervise(settings)

    assert len(backend.alive("worker")) == 3
    for kind in SINGLETON_KINDS:
        assert len(backend.alive(kind)) == 1
    ids = [p.spec.actor_id for p in backend.processes]
    assert len(set(ids)) == len(ids)
    assert all(Settings.from_json(p.spec.settings_json) == settings for p in backend.processes)

    assert await drained(tree, task) == 0
    assert all(signal.SIGTERM in p.signals and not p.is_alive() for p in backend.processes)


async def test_crashed_worker_restarts_after_backoff_and_its_tasks_are_requeued_at_once(
    fast: Settings, supervise: Supervise, backend: FakeBackend, queue: RedisQueue
) -> None:
    tree, task = await supervise(fast)
    crashed = backend.named("worker-0")[0]
    events = admin(queue).pubsub()
    await events.subscribe(queue.keys.events)
    await events.get_message(timeout=1)  # the subscription is confirmed
    request_id = await queue.enqueue_task(ScrapingRequest(script_name="echo"))
    claim = await queue.store.claim(crashed.spec.actor_id, 1)
    assert [lease.request_id for lease in claim.leases] == [request_id]
    loop = asyncio.get_running_loop()

    crashed_at = loop.time()
    backend.exit(crashed, ChildExit.CRASH)
    await backend.wait_for_incarnations("worker-0", 2)
    restarted_after = loop.time() - crashed_at

    stats = await TaskManager(queue).queue_stats()
    assert (stats["pending"], stats["running"]) == (1, 0)
    assert 0.09 <= restarted_after < 1.0
    restarted = backend.named("worker-0")[1].spec.actor_id
    assert restarted != crashed.spec.actor_id
    event = await next_event(events, "worker.restarted")
    await events.aclose()  # type: ignore[no-untyped-call]
    assert (event["worker_id"], event["previous_worker_id"]) == (restarted, crashed.spec.actor_id)
    assert await drained(tree, task) == 0


async def test_a_restarted_singleton_actor_is_announced_with_its_kind(
    fast: Settings, supervise: Supervise, backend: FakeBackend, queue: RedisQueue
) -> None:
    tree, task = await supervise(fast)
    crashed = backend.named("reaper")[0]
    async with subscribed(queue, queue.keys.events) as events:
        backend.exit(crashed, ChildExit.CRASH)
        await backend.wait_for_incarnations("reaper", 2)
        event = await next_event(events, "worker.restarted")

    assert event["kind"] == "reaper"
    assert event["previous_worker_id"] == crashed.spec.actor_id
    assert await drained(tree, task) == 0


async def test_gives_up_after_max_restarts_exits_1_and_stops_every_child(
    fast: Settings, supervise: Supervise, backend: FakeBackend
) -> None:
    settings = configured(fast, supervisor={"max_restarts": 2})
    _, task = await supervise(settings)

    for incarnations in (2, 3):
        backend.exit(backend.named("worker-1")[-1], ChildExit.CRASH)
        await backend.wait_for_incarnations("worker-1", incarnations)
    backend.exit(backend.named("worker-1")[-1], ChildExit.CRASH)

    assert await asyncio.wait_for(task, 10) == tree_module.EXIT_GAVE_UP
    assert not any(p.is_alive() for p in backend.processes)
    assert len(backend.named("worker-1")) == 3


async def test_child_exiting_with_config_error_stops_everything_with_exit_2(
    fast: Settings, supervise: Supervise, backend: FakeBackend
) -> None:
    _, task = await supervise(fast)

    backend.exit(backend.alive("reaper")[0], ChildExit.CONFIG_ERROR)

    assert await asyncio.wait_for(task, 10) == 2
    assert not any(p.is_alive() for p in backend.processes)
    assert len(backend.named("reaper")) == 1


async def test_recycled_worker_restarts_at_once_without_backoff(
    settings: Settings, supervise: Supervise, backend: FakeBackend
) -> None:
    slow = configured(settings, supervisor={"restart_backoff_max": 30})
    tree, task = await supervise(slow)
    loop = asyncio.get_running_loop()

    recycled_at = loop.time()
    backend.exit(backend.named("worker-0")[0], ChildExit.RECYCLE)
    await backend.wait_for_incarnations("worker-0", 2)

    assert loop.time() - recycled_at < 0.3
    assert await drained(tree, task) == 0


async def test_grow_and_shrink_change_the_pool_by_one_and_never_below_zero(
    fast: Settings, supervise: Supervise, backend: FakeBackend
) -> None:
    tree, task = await supervise(configured(fast, worker={"processes": 1}))

    tree.command(Command.GROW)
    tree.command(Command.GROW)
    await wait_for(lambda: len(backend.alive()) == 3, timeout=2)
    assert sorted(p.spec.actor_id.split("-")[-2] for p in backend.alive()) == ["0", "1", "2"]

    highest = backend.named("worker-2")[0]
    tree.command(Command.SHRINK)
    await wait_for(lambda: not highest.is_alive(), timeout=2)
    assert highest.signals == [signal.SIGTERM]
    for _ in range(3):
        tree.command(Command.SHRINK)
    await wait_for(lambda: not backend.alive(), timeout=2)
    await asyncio.sleep(0.2)  # a drained worker must not come back

    assert tree.worker_count == 0
    assert not backend.alive()
    assert len(backend.processes) == 3 + len(SINGLETON_KINDS)
    assert await drained(tree, task) == 0


async def test_reload_with_changed_process_count_resizes_the_pool(
    fast: Settings, supervise: Supervise, backend: FakeBackend, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "scrapeq.toml", fast, processes=2)
    tree, task = await supervise(Settings.from_file(config), config=config)

    write_config(config, fast, processes=4)
    tree.command(Command.RELOAD)
    await wait_for(lambda: len(backend.alive()) == 4, timeout=2)
    write_config(config, fast, processes=1)
    tree.command(Command.RELOAD)
    await wait_for(lambda: len(backend.alive()) == 1, timeout=2)

    # Only the count changed: the remaining worker was not replaced.
    assert backend.alive()[0] is backend.named("worker-0")[0]
    assert await drained(tree, task) == 0


async def test_reload_of_a_broken_config_file_keeps_the_running_settings(
    fast: Settings,
    supervise: Supervise,
    backend: FakeBackend,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = write_config(tmp_path / "scrapeq.toml", fast, processes=2)
    running = Settings.from_file(config)
    tree, task = await supervise(running, config=config)

    config.write_text(config.read_text() + "\n[worker]\nprocesses = 'many'\n")
    tree.command(Command.RELOAD)
    tree.command(Command.GROW)  # a spawn after the reload shows which settings are in force
    await wait_for(lambda: len(backend.alive()) == 3, timeout=2)

    assert Settings.from_json(backend.alive()[-1].spec.settings_json) == running
    assert backend.named("worker-0")[0].is_alive()
    assert "기존 설정을 유지합니다" in caplog.text
    assert await drained(tree, task) == 0


async def test_reload_with_changed_concurrency_replaces_children_one_at_a_time(
    fast: Settings, supervise: Supervise, backend: FakeBackend, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "scrapeq.toml", fast, processes=2, concurrency=5)
    tree, task = await supervise(Settings.from_file(config), config=config)
    first = list(backend.processes)
    backend.stubborn = True  # each old child drains until the test lets it go

    write_config(config, fast, processes=2, concurrency=7)
    tree.command(Command.RELOAD)
    await backend.wait_for_incarnations("worker-0", 2)
    await asyncio.sleep(0.1)
    assert len(backend.named("worker-1")) == 1  # not yet: worker-0's old process still drains

    for old in first:  # workers first, then the singletons
        await backend.wait_for_signals(old, [signal.SIGTERM])
        backend.exit(old, ChildExit.OK)
    await wait_for(lambda: len(backend.processes) == 2 * len(first), timeout=2)
    backend.stubborn = False

    replacements = backend.processes[len(first) :]
    assert all(p.is_alive() for p in replacements)
    assert all(
        Settings.from_json(p.spec.settings_json).worker.concurrency == 7 for p in replacements
    )
    assert await drained(tree, task) == 0


async def test_worker_whose_heartbeat_stops_while_alive_is_killed_and_restarted(
    fast: Settings, supervise: Supervise, backend: FakeBackend
) -> None:
    tree, task = await supervise(fast)
    frozen = backend.named("worker-1")[0]
    await asyncio.sleep(3 * FAKE_BEAT)  # registered and beating

    frozen.frozen = True
    await wait_for(lambda: not frozen.is_alive(), timeout=fast.heartbeat.timeout + 2)

    assert frozen.signals == [signal.SIGKILL]
    await backend.wait_for_incarnations("worker-1", 2)
    assert backend.named("worker-0")[0].is_alive()
    assert await drained(tree, task) == 0


async def test_workers_are_not_killed_for_heartbeats_a_redis_outage_held_back(
    fast: Settings, supervise: Supervise, backend: FakeBackend, redis_server: RedisServer
) -> None:
    tree, task = await supervise(fast)
    await asyncio.sleep(3 * FAKE_BEAT)  # registered and beating
    workers = backend.named("worker-0") + backend.named("worker-1")

    for process in workers:
        process.frozen = True  # their heartbeat loops fail, then back off
    redis_server.pause()  # every call, the supervisor's health check included, is held
    try:
        await asyncio.sleep(2 * fast.heartbeat.timeout)
    finally:
        redis_server.resume()
    # Redis is back; the workers' loops are still in their backoff sleep for a while.
    await asyncio.sleep(fast.heartbeat.timeout + 0.5)
    for process in workers:
        process.frozen = False
    await asyncio.sleep(0.5)

    assert [p.signals for p in workers] == [[], []]
    assert await drained(tree, task) == 0


async def test_drain_kills_children_that_outlive_the_drain_timeout_and_requeues_their_tasks(
    settings: Settings,
    supervise: Supervise,
    backend: FakeBackend,
    queue: RedisQueue,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tree_module, "DRAIN_GRACE", 0.2)
    tree, task = await supervise(configured(settings, supervisor={"drain_timeout": 0.1}))
    worker = backend.named("worker-0")[0]
    await queue.enqueue_task(ScrapingRequest(script_name="echo"))
    assert (await queue.store.claim(worker.spec.actor_id, 1)).leases
    backend.stubborn = True

    assert await drained(tree, task) == 0

    assert worker.signals == [signal.SIGTERM, signal.SIGKILL]
    assert (await TaskManager(queue).queue_stats())["pending"] == 1


async def test_stop_now_hands_worker_tasks_back_with_sigusr1(
    fast: Settings, supervise: Supervise, backend: FakeBackend
) -> None:
    tree, task = await supervise(fast)

    tree.command(Command.STOP_NOW)

    assert await asyncio.wait_for(task, 10) == 0
    workers = [p for p in backend.processes if p.spec.kind == "worker"]
    singletons = [p for p in backend.processes if p.spec.kind != "worker"]
    assert all(p.signals == [signal.SIGUSR1] for p in workers)
    assert all(p.signals == [signal.SIGTERM] for p in singletons)


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's notify socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify.sock"))
        sock.setblocking(False)
        yield sock


def received(sock: socket.socket) -> list[str]:
    messages: list[str] = []
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except BlockingIOError:
            return messages


async def test_notify_ready_after_workers_register_watchdog_only_while_they_beat(
    fast: Settings,
    supervise: Supervise,
    backend: FakeBackend,
    manager: socket.socket,
    tmp_path: Path,
) -> None:
    environ = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "400000"}
    patient = configured(fast, heartbeat={"timeout": 3.0})  # frozen workers are not killed yet
    with SystemdNotifier(environ) as notifier:
        tree, task = await supervise(patient, notifier=notifier)
        messages: list[str] = []

        async def seen(message: str) -> bool:
            messages.extend(received(manager))
            return message in messages

        await wait_for(lambda: seen("READY=1"), timeout=3)
        await wait_for(lambda: seen("WATCHDOG=1"), timeout=3)
        assert any(m.startswith("STATUS=workers 2/2, pending 0") for m in messages)

        for process in backend.alive():
            process.frozen = True
        await asyncio.sleep(0.6)  # a ping earned before the freeze may still go out
        received(manager)
        await asyncio.sleep(0.8)  # four ping periods, well inside the 3 s heartbeat timeout
        assert "WATCHDOG=1" not in received(manager)

        assert await drained(tree, task) == 0
        assert "STOPPING=1" in received(manager)


async def test_watchdog_keeps_pinging_through_a_redis_outage_and_status_says_so(
    fast: Settings,
    supervise: Supervise,
    manager: socket.socket,
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    environ = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "400000"}
    with SystemdNotifier(environ) as notifier:
        tree, task = await supervise(fast, notifier=notifier)
        messages: list[str] = []

        async def seen(message: str) -> bool:
            messages.extend(received(manager))
            return any(m.startswith(message) for m in messages)

        await wait_for(lambda: seen("READY=1"), timeout=3)
        redis_server.stop()
        try:
            await asyncio.sleep(0.5)
            received(manager)
            await asyncio.sleep(1.2)  # six ping periods without a heartbeat able to advance
            during = received(manager)
            assert during.count("WATCHDOG=1") >= 3, during
            assert any(m.startswith("STATUS=Redis 연결 끊김") for m in during), during
            assert task.done() is False
        finally:
            redis_server.start()
        assert await drained(tree, task) == 0


async def test_missing_epoch_key_is_reported_loudly_and_recreated(
    fast: Settings,
    supervise: Supervise,
    queue: RedisQueue,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tree, task = await supervise(fast)
    epoch_key = queue.keys.base + "epoch"
    assert await admin(queue).exists(epoch_key)

    async def recreated() -> bool:
        return bool(await admin(queue).exists(epoch_key))

    with caplog.at_level(logging.ERROR):
        await admin(queue).delete(epoch_key)
        await wait_for(recreated, timeout=3)

    assert "Redis 데이터 유실 감지" in caplog.text
    assert await drained(tree, task) == 0


async def test_signals_are_held_until_forwarded_and_a_second_stop_signal_stops_at_once() -> None:
    commands: list[Command] = []
    with SignalCommands() as signals:
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGTERM)
        await wait_for(lambda: signals.stop_requested, timeout=2)
        signals.forward_to(commands.append)
        for signum in (signal.SIGTTIN, signal.SIGTTOU, signal.SIGINT):
            os.kill(os.getpid(), signum)
        await wait_for(lambda: len(commands) == 5, timeout=2)

    assert commands == [
        Command.RELOAD,
        Command.DRAIN,
        Command.GROW,
        Command.SHRINK,
        Command.STOP_NOW,
    ]
