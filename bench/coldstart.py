"""Cold start: launch → first task done, a CLI read, and RSS per actor kind.

Against a private redis-server, ``supervisor start`` (2 worker processes, no
metrics, a fresh key prefix per launch) is launched as a subprocess while this
process, already connected, enqueues one ``echo`` task and waits for its
response. READY=1 arrives on a ``NOTIFY_SOCKET`` of our own, as under systemd.
On the last launch the tree idles a moment and is measured: RSS and USS of every
process, its kind taken from the supervisor's own log line ``<actor id> 시작
(pid=N)`` (spawned actors all share one command line), the workers checked
against the pids ``supervisor status --json`` reports. Then ``supervisor
status --json`` and ``supervisor --help`` are timed.

Everything runs twice: with the environment as it is (``PYTHONDONTWRITEBYTECODE``
set: our own source is compiled at every start) and with a bytecode cache
(the variable removed, ``PYTHONPYCACHEPREFIX`` a temporary folder so the
checkout stays clean, after one warm-up launch), as under systemd.

    python3 -m uv run python -m bench.coldstart [--runs N] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from actors.exceptions import TaskTimeoutException
from actors.models import ScrapingRequest
from actors.queue import RedisQueue
from actors.runtime import ACTOR_KINDS
from bench.common import ROOT, log_tail, private_redis, summarize
from config.settings import Settings

#: How long a launch may take to run the first task and to send READY=1.
LAUNCH_TIMEOUT = 60.0
MIB = 1024 * 1024
#: Targets: seconds for the timings, MiB of RSS per process for the kinds.
TARGETS: dict[str, float] = {
    "first task": 1.0,
    "status --json": 0.3,
    "worker": 60,
    "heartbeat": 30,
    "reaper": 30,
    "governor": 30,
}
_STARTED = re.compile(rf"-({'|'.join(ACTOR_KINDS)})(?:-\d+)?-\d+ 시작 \(pid=(\d+)\)")


@dataclass(frozen=True, slots=True)
class Memory:
    rss: int
    uss: int | None  # None where memory_full_info is not permitted


@dataclass
class Column:
    """The measurements of one environment."""

    first_task: list[float] = field(default_factory=list)
    ready: list[float] = field(default_factory=list)
    status: list[float] = field(default_factory=list)
    help: list[float] = field(default_factory=list)
    memory: dict[str, list[Memory]] = field(default_factory=dict)


def supervisor_command() -> str:
    """The ``supervisor`` console script of this interpreter's environment."""
    beside = Path(sys.executable).with_name("supervisor")
    found = str(beside) if beside.exists() else shutil.which("supervisor")
    if found is None:
        raise RuntimeError("no `supervisor` command: run under `python3 -m uv run`")
    return found


def write_config(url: str, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "scrapeq.toml"
    path.write_text(
        f'[redis]\nurl = "{url}"\nembedded = "never"\n'
        f'key_prefix = "coldstart-{uuid.uuid4().hex[:8]}"\n'
        "[worker]\nprocesses = 2\n"
        f'[supervisor]\nmetrics_port = 0\ndrain_timeout = 5\nstate_dir = "{folder / "state"}"\n'
    )
    return path


def timed(command: Sequence[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, env=env, cwd=ROOT, capture_output=True, check=True)
    return time.perf_counter() - started


async def connected(settings: Settings) -> RedisQueue:
    """A queue with its command connection and its response subscription open."""
    queue = RedisQueue(settings)
    await queue.connect()
    with contextlib.suppress(TaskTimeoutException):
        await queue.wait_for_response("coldstart-warm-up", timeout=0.05)
    return queue


async def first_task(
    queue: RedisQueue, notify: socket.socket, started: float
) -> tuple[float, float]:
    """(launch → first task done, launch → READY=1) in seconds."""

    async def done() -> float:
        request = ScrapingRequest(script_name="echo", parameters={"url": "https://example.com"})
        await queue.wait_for_response(await queue.enqueue_task(request), timeout=LAUNCH_TIMEOUT)
        return time.perf_counter() - started

    async def ready() -> float:
        loop = asyncio.get_running_loop()
        while b"READY=1" not in (await loop.sock_recv(notify, 4096)).split(b"\n"):
            pass
        return time.perf_counter() - started

    async with asyncio.timeout(LAUNCH_TIMEOUT):
        task_done, ready_at = await asyncio.gather(done(), ready())
    return task_done, ready_at


def memory_by_kind(pid: int, log: Path, worker_pids: set[int]) -> dict[str, list[Memory]]:
    """RSS/USS of the supervisor and each of its descendants, grouped by kind."""
    kinds = {int(found[2]): found[1] for found in _STARTED.finditer(log.read_text("utf-8"))}
    root = psutil.Process(pid)
    grouped: dict[str, list[Memory]] = {}
    for process in [root, *root.children(recursive=True)]:
        kind = "supervisor" if process.pid == pid else kinds.get(process.pid)
        if kind is None:  # not an actor: multiprocessing's resource tracker
            command = " ".join(process.cmdline())
            kind = "resource tracker" if "resource_tracker" in command else process.name()
        try:
            full = process.memory_full_info()
            memory = Memory(full.rss, full.uss)
        except psutil.AccessDenied:
            memory = Memory(process.memory_info().rss, None)
        grouped.setdefault(kind, []).append(memory)
    labelled = {p for p, kind in kinds.items() if kind == "worker"}
    if labelled != worker_pids:
        raise RuntimeError(f"worker pids: log {sorted(labelled)}, Redis {sorted(worker_pids)}")
    return grouped


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (a drain), then SIGKILL the whole group if it lingers."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    if process.returncode != 0:
        raise RuntimeError(f"supervisor exited with {process.returncode}")


def launch(
    url: str, folder: Path, env: dict[str, str], column: Column, *, reads: int = 0, idle: float = 0
) -> None:
    """One launch; with ``reads`` > 0, after ``idle`` seconds, also memory and the CLI reads."""
    config = write_config(url, folder)
    log = folder / "supervisor.log"
    notify_path = folder / "notify"
    notify_path.unlink(missing_ok=True)
    with (
        asyncio.Runner() as runner,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify,
        log.open("wb") as log_file,
    ):
        notify.bind(str(notify_path))
        notify.setblocking(False)
        queue = runner.run(connected(Settings.from_file(config)))
        started = time.perf_counter()
        process = subprocess.Popen(
            [supervisor_command(), "start", "--config", str(config)],
            env={**env, "NOTIFY_SOCKET": str(notify_path)},
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            task_done, ready = runner.run(first_task(queue, notify, started))
            column.first_task.append(task_done)
            column.ready.append(ready)
            if reads > 0:
                time.sleep(idle)
                cli = [supervisor_command(), "--config", str(config)]
                state = subprocess.run(
                    [*cli, "status", "--json"], env=env, capture_output=True, check=True
                )
                workers = {w["pid"] for w in json.loads(state.stdout)["workers"]}
                column.memory = memory_by_kind(process.pid, log, workers)
                for _ in range(reads):
                    column.status.append(timed([*cli, "status", "--json"], env))
                    column.help.append(timed([*cli, "--help"], env))
        except BaseException as exc:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            exc.add_note(f"supervisor log:\n{log_tail(log)}")
            raise
        finally:
            runner.run(queue.close())
        stop(process)


def measure(url: str, folder: Path, env: dict[str, str], runs: int, idle: float) -> Column:
    column = Column()
    for run in range(runs):
        print(f"  launch {run + 1}/{runs}", file=sys.stderr, flush=True)
        last = run == runs - 1
        launch(url, folder, env, column, reads=runs if last else 0, idle=idle)
    return column


def seconds(values: list[float]) -> str:
    s = summarize(values)
    return f"{s.median:.2f}" + (f" ({s.low:.2f}–{s.high:.2f})" if s.count > 1 else "")


def mib(memories: list[Memory], pick: Callable[[list[int]], int] = max) -> str:
    """The largest (or the total) RSS in MiB, USS in brackets."""
    rss = pick([m.rss for m in memories]) / MIB
    uss = [m.uss for m in memories if m.uss is not None]
    return f"{rss:.1f}" + (f" (USS {pick(uss) / MIB:.1f})" if len(uss) == len(memories) else "")


def table(as_is: Column, cached: Column, runs: int) -> str:
    def row(name: str, target_key: str | None, cells: Callable[[Column], tuple[str, float]]) -> str:
        (shown_a, value_a), (shown_c, value_c) = cells(as_is), cells(cached)
        target = TARGETS.get(target_key or "")
        if target is None:
            return f"| {name} | {shown_a} | {shown_c} | – | – |"
        met = " / ".join("yes" if value <= target else "no" for value in (value_a, value_c))
        return f"| {name} | {shown_a} | {shown_c} | ≤ {target:g} | {met} |"

    def timing(pick: Callable[[Column], list[float]]) -> Callable[[Column], tuple[str, float]]:
        return lambda c: (seconds(pick(c)), summarize(pick(c)).median)

    def memory(kind: str) -> Callable[[Column], tuple[str, float]]:
        return lambda c: (mib(c.memory[kind]), max(m.rss for m in c.memory[kind]) / MIB)

    def total(c: Column) -> tuple[str, float]:
        everyone = [m for ms in c.memory.values() for m in ms]
        return f"{mib(everyone, sum)}, {len(everyone)} processes", 0.0

    rows = [
        "| measurement | as-is | with bytecode cache | target | met? (as-is / cached) |",
        "|---|---|---|---|---|",
        row(
            f"launch → first task done, s (median of {runs})",
            "first task",
            timing(lambda c: c.first_task),
        ),
        row("launch → READY=1, s", None, timing(lambda c: c.ready)),
        row("`supervisor status --json`, s", "status --json", timing(lambda c: c.status)),
        row("`supervisor --help`, s (floor)", None, timing(lambda c: c.help)),
    ]
    kinds = ["supervisor", *ACTOR_KINDS, *sorted(set(as_is.memory) - {"supervisor", *ACTOR_KINDS})]
    for kind in kinds:
        if kind in as_is.memory and kind in cached.memory:
            count = len(as_is.memory[kind])
            label = f"RSS {kind}, MiB" + (f" (largest of {count})" if count > 1 else "")
            rows.append(row(label, kind, memory(kind)))
    rows.append(row("RSS tree total, MiB", None, total))
    return "\n".join(rows)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.coldstart", description=__doc__)
    parser.add_argument("--runs", type=int, help="launches and CLI runs per column (default 5)")
    parser.add_argument("--quick", action="store_true", help="one launch per column, short idle")
    args = parser.parse_args(argv)
    if args.runs is None:
        args.runs = 1 if args.quick else 5
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    args.idle = 1.0 if args.quick else 3.0
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    as_is_env = dict(os.environ)
    with private_redis() as url, tempfile.TemporaryDirectory(prefix="scrapeq-coldstart-") as tmp:
        folder = Path(tmp)
        cached_env = {k: v for k, v in as_is_env.items() if k != "PYTHONDONTWRITEBYTECODE"}
        cached_env["PYTHONPYCACHEPREFIX"] = str(folder / "pycache")
        print("as-is", file=sys.stderr, flush=True)
        as_is = measure(url, folder / "as-is", as_is_env, args.runs, args.idle)
        print("with bytecode cache: warm-up", file=sys.stderr, flush=True)
        launch(url, folder / "cached", cached_env, Column(), reads=1, idle=0.1)
        cached = measure(url, folder / "cached", cached_env, args.runs, args.idle)
    flag = as_is_env.get("PYTHONDONTWRITEBYTECODE", "unset")
    print(f"as-is: PYTHONDONTWRITEBYTECODE={flag}; with bytecode cache: unset, after one warm-up")
    print()
    print(table(as_is, cached, args.runs))


if __name__ == "__main__":
    main()
