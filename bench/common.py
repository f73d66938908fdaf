"""What every benchmark adapter and workload shares.

An :class:`Adapter` drives one queue system (scrapeq or a peer) through the
same small surface: start its workers for a workload, enqueue a task, wait for
a result, count finished tasks with the system's own status mechanism. Redis
traffic is measured per phase with ``CONFIG RESETSTAT`` and ``INFO``: the
commands the harness itself sent (its completion polls, the ``INFO`` call) are
tallied by the adapter and subtracted, so the figures are the system's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, TypeVar

import psutil
from redis.asyncio import Redis

from supervisor.redis_server import RedisServer

TaskKind = Literal["noop", "sleep"]
#: The worker layouts an adapter is asked for (see each adapter's table).
WorkerLayout = Literal["w1", "w3", "w4", "memory"]
#: The I/O-bound task sleeps this long.
SLEEP_SECONDS = 0.01
#: Commands the measuring client itself sends; never counted as the system's.
_PROBE_COMMANDS = frozenset({"info", "config|resetstat", "ping", "client|setinfo", "hello"})
_LOG_TAIL_BYTES = 1500
#: The repository root: worker commands run there, so ``bench.peers.*`` imports.
ROOT = Path(__file__).resolve().parent.parent

H = TypeVar("H")


class UnsupportedError(Exception):
    """The system has no API for this (reported as n/a, not as a failure)."""


@dataclass(frozen=True, slots=True)
class Summary:
    median: float
    low: float
    high: float
    count: int


def summarize(values: Sequence[float]) -> Summary:
    return Summary(statistics.median(values), min(values), max(values), len(values))


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of ``values`` (``fraction`` in 0..1)."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[rank]


@dataclass
class Tally:
    """Redis commands and requests (socket reads) the harness itself caused."""

    calls: Counter[str] = field(default_factory=Counter)
    reads: int = 0

    def add(self, command: str, calls: int = 1, reads: int = 1) -> None:
        self.calls[command] += calls
        self.reads += reads

    def snapshot(self) -> Tally:
        return Tally(Counter(self.calls), self.reads)

    def since(self, earlier: Tally) -> Tally:
        return Tally(self.calls - earlier.calls, self.reads - earlier.reads)


@dataclass(frozen=True, slots=True)
class Traffic:
    """Redis work of one measured phase.

    ``commands`` counts every command Redis executed, including those run
    inside Lua scripts (``INFO commandstats`` counts both); ``requests`` counts
    the reads Redis made from client sockets (``total_reads_processed``): one
    per request or pipeline, so it is the number of client round trips.
    """

    commands: Counter[str]
    requests: int
    cpu_seconds: float  # redis-server's own CPU time (user + sys), harness polls included

    def per_task(self, tasks: int) -> tuple[float, float, float]:
        """(commands, round trips, Redis CPU microseconds) per task."""
        commands = sum(self.commands.values()) / tasks
        return commands, self.requests / tasks, self.cpu_seconds * 1e6 / tasks

    def top(self, tasks: int, count: int = 8) -> str:
        return ", ".join(
            f"{name.upper()} {calls / tasks:.2f}"
            for name, calls in self.commands.most_common(count)
        )


class RedisProbe:
    """The harness's own connection to the private server: stats and sampling."""

    def __init__(self, url: str) -> None:
        self.client = Redis.from_url(url)
        self._cpu_at_reset = 0.0

    async def reset(self) -> None:
        await self.client.ping()  # connect first: the handshake is not the system's
        await self.client.config_resetstat()
        self._cpu_at_reset = await self._cpu()

    async def _cpu(self) -> float:
        info: dict[str, Any] = await self.client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    async def traffic(self, harness: Tally) -> Traffic:
        cpu = await self._cpu() - self._cpu_at_reset
        stats: dict[str, Any] = await self.client.info("stats")  # one section: Redis 6.2 too
        info: dict[str, Any] = await self.client.info("commandstats")
        commands: Counter[str] = Counter()
        for key, value in info.items():
            if key.startswith("cmdstat_"):
                name = key.removeprefix("cmdstat_")
                if name not in _PROBE_COMMANDS:
                    commands[name] = int(value["calls"]) - harness.calls.get(name, 0)
        reads = int(stats["total_reads_processed"]) - 3 - harness.reads  # -3: INFO cpu, stats
        return Traffic(+commands, max(0, reads), cpu)

    async def flushall(self) -> None:
        await self.client.flushall()

    async def connected_clients(self) -> int:
        info: dict[str, Any] = await self.client.info("clients")
        return int(info["connected_clients"])

    async def close(self) -> None:
        await self.client.aclose()


def tree_rss(pids: Sequence[int]) -> tuple[int, int]:
    """(sum of RSS bytes, process count) over ``pids`` and all their descendants."""
    total = count = 0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            members = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for member in members:
            try:
                total += member.memory_info().rss
                count += 1
            except psutil.NoSuchProcess:
                continue
    return total, count


def log_tail(path: Path) -> str:
    try:
        with path.open("rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - _LOG_TAIL_BYTES))
            return log.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


class KeyCounter:
    """Counts finished tasks by the presence of their result keys, oldest first.

    One ``EXISTS k1 .. kn`` per chunk: a full chunk is remembered as done, so a
    poll costs one command plus one per newly completed chunk.
    """

    def __init__(self, url: str, tally: Tally, chunk: int = 500) -> None:
        self.client = Redis.from_url(url)
        self.tally = tally
        self.chunk = chunk
        self._done = 0

    async def count(self, keys: Sequence[str]) -> int:
        while self._done < len(keys):
            chunk = keys[self._done : self._done + self.chunk]
            present = int(await self.client.exists(*chunk))
            self.tally.add("exists")
            if present < len(chunk):
                return self._done + present
            self._done += len(chunk)
        return self._done

    async def close(self) -> None:
        await self.client.aclose()


class WorkerGroup(ABC):
    """The worker processes of one system, started for one measurement."""

    description: str

    @abstractmethod
    def pids(self) -> list[int]:
        """The top-level worker processes (their children are found from them)."""

    @abstractmethod
    def check_alive(self) -> None:
        """Raise ``RuntimeError`` (with the log tail) if a worker process has exited."""

    @abstractmethod
    def stop(self) -> None:
        """Stop every process of the group; idempotent, never raises."""

    def rss(self) -> tuple[int, int]:
        return tree_rss(self.pids())


@dataclass(frozen=True, slots=True)
class Drained:
    """How a prefilled queue emptied: when its first task completed and when the last did."""

    started: float  # perf_counter() when the workers were started
    first_at: float  # when the first completion was seen (0: never before the last)
    first_done: int  # how many were done at that poll
    finished: float  # when every task was seen done
    polls: int  # done-count polls made (harness traffic to subtract)

    def spawn_tps(self, tasks: int) -> float:
        return tasks / (self.finished - self.started)

    def steady_tps(self, tasks: int) -> float:
        """Tasks/s from the first completion on (start-up excluded); from spawn if undefined."""
        after_first = tasks - self.first_done
        if self.finished > self.first_at and after_first > 0:
            return after_first / (self.finished - self.first_at)
        return self.spawn_tps(tasks)


async def drain(
    done_count: Callable[[], Awaitable[int]],
    tasks: int,
    started: float,
    workers: WorkerGroup,
    poll: float,
    *,
    at_first: Callable[[], None] | None = None,
) -> Drained:
    """Poll ``done_count`` until ``tasks`` are done; ``at_first`` runs at the first completion.

    Raises ``TimeoutError`` after ``max(60, tasks / 100)`` seconds, and
    ``RuntimeError`` (``check_alive``) if a worker process exits.
    """
    deadline = started + max(60.0, tasks / 100)
    first_at, first_done, polls = 0.0, 0, 0
    while True:
        done = await done_count()
        polls += 1
        now = time.perf_counter()
        if done and not first_at:
            first_at, first_done = now, done
            if at_first:
                at_first()
        if done >= tasks:
            return Drained(started, first_at, first_done, now, polls)
        if now > deadline:
            raise TimeoutError(f"only {done} of {tasks} tasks done after {now - started:.0f} s")
        workers.check_alive()
        await asyncio.sleep(poll)


def _parent_death_signal() -> Callable[[], None] | None:
    """A preexec hook: SIGTERM the worker command when the harness dies."""
    if sys.platform != "linux":
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG


class CommandWorkers(WorkerGroup):
    """Worker commands (a peer's CLI), each in its own process group."""

    def __init__(self, commands: Sequence[Sequence[str]], env: dict[str, str], log: Path) -> None:
        self.commands = [list(command) for command in commands]
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        self.env = {**os.environ, "PYTHONPATH": path, **env}
        self.log = log
        self.description = " + ".join(" ".join(command) for command in self.commands)
        self._processes: list[subprocess.Popen[bytes]] = []

    def start(self) -> CommandWorkers:
        with self.log.open("ab") as log:
            for command in self.commands:
                self._processes.append(
                    subprocess.Popen(
                        command,
                        env=self.env,
                        cwd=ROOT,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                        preexec_fn=_parent_death_signal(),  # noqa: PLW1509 (no threads yet)
                    )
                )
        return self

    def pids(self) -> list[int]:
        return [process.pid for process in self._processes]

    def check_alive(self) -> None:
        for process in self._processes:
            if process.poll() is not None:
                raise RuntimeError(
                    f"worker exited with code {process.returncode}: {log_tail(self.log)}"
                )

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            for process in self._processes:
                if process.poll() is None:
                    try:
                        os.killpg(process.pid, sig)
                    except ProcessLookupError:
                        continue
            for process in self._processes:
                try:
                    process.wait(wait)
                except subprocess.TimeoutExpired:
                    continue
        for process in self._processes:  # leftovers of a group whose leader exited
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)


class Adapter(ABC, Generic[H]):
    """One queue system as the workloads see it; ``H`` is its task handle."""

    name: ClassVar[str]
    #: The bulk-enqueue API used for W2 bulk, or None if the system has none.
    bulk_api: ClassVar[str | None] = None
    #: Whether ``enqueue`` awaits its I/O (an asyncio client), so that
    #: concurrent enqueues overlap; a blocking client would run them one by one.
    async_producer: ClassVar[bool] = False

    def __init__(self, url: str, workdir: Path) -> None:
        self.url = url
        self.workdir = workdir
        self.harness = Tally()

    @abstractmethod
    async def connect(self, layout: WorkerLayout) -> None:
        """Open the producer side (``layout`` tells W3 set-ups such as huey's notify)."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    def start_workers(self, layout: WorkerLayout, processes: int | None = None) -> WorkerGroup:
        """Start the worker processes of this layout (see the adapter's table);
        ``processes`` replaces the layout's process count (the scaling curve)."""

    @abstractmethod
    async def enqueue(self, kind: TaskKind, index: int) -> H: ...

    async def enqueue_bulk(self, kind: TaskKind, count: int) -> list[H]:
        raise UnsupportedError(f"{self.name} has no bulk enqueue API")

    async def prefill(self, kind: TaskKind, count: int) -> list[H]:
        """Enqueue ``count`` tasks the fastest way the system offers (not timed)."""
        try:
            return await self.enqueue_bulk(kind, count)
        except UnsupportedError:
            return [await self.enqueue(kind, index) for index in range(count)]

    @abstractmethod
    async def done_count(self, handles: Sequence[H]) -> int:
        """How many of ``handles`` finished, by the system's own status mechanism.

        Every Redis command this sends is recorded in ``self.harness``.
        """

    @abstractmethod
    async def wait(self, handle: H, timeout: float) -> bool:
        """Wait for the task's result; False if none came within ``timeout``."""

    @abstractmethod
    async def result(self, handle: H) -> object:
        """The stored result of a finished task, read back through the system's API."""

    def expected(self, kind: TaskKind, index: int) -> object:
        return index if kind == "noop" else SLEEP_SECONDS

    async def verify(self, kind: TaskKind, handles: Sequence[H], sample: int = 100) -> None:
        """Read back a spread of results and compare them with what the tasks return."""
        step = max(1, len(handles) // sample)
        for index in range(0, len(handles), step):
            got = await self.result(handles[index])
            want = self.expected(kind, index)
            if got != want:
                raise RuntimeError(f"{self.name}: task {index} returned {got!r}, expected {want!r}")


@contextlib.contextmanager
def private_redis() -> Iterator[str]:
    """The URL of a redis-server of its own (no persistence, a temporary folder), stopped after."""
    with tempfile.TemporaryDirectory(prefix="scrapeq-bench-") as folder:
        server = RedisServer(Path(folder), appendonly=False)
        server.start()
        try:
            yield server.url
        finally:
            server.stop()
