"""Launch real ``supervisor start`` processes from tests, and never leave one behind."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from helpers import wait_for

from actors.queue import RedisQueue, WorkerMonitor
from config.settings import Settings


def configured(settings: Settings, **sections: dict[str, Any]) -> Settings:
    """``settings`` with some keys of some sections replaced."""
    data = settings.model_dump()
    for section, values in sections.items():
        data[section].update(values)
    return Settings.model_validate(data)


def write_config(path: Path, settings: Settings, **worker: Any) -> Path:
    """Write ``settings`` (with ``worker`` keys replaced) as a TOML config file."""
    data = settings.model_dump(mode="json")
    data["worker"].update(worker)
    lines: list[str] = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        # A JSON scalar, string or list of strings is also a TOML value.
        # Keys are quoted: rate-limit keys such as "domain:a.test" need it.
        lines += [f"{json.dumps(key)} = {json.dumps(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


SUPERVISOR = Path(sys.executable).with_name("supervisor")
START_TIMEOUT = 30.0
"""Generous: each actor is a fresh interpreter, and CI machines may have two cores."""
DRAIN_TIMEOUT = 3.0


@dataclass
class Supervisor:
    """One running ``supervisor start``; its stderr goes to ``log``."""

    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def send(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    async def exit_code(self, timeout: float) -> int:
        return await asyncio.to_thread(self.process.wait, timeout)

    def tree(self) -> list[psutil.Process]:
        return psutil.Process(self.pid).children(recursive=True)

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


@dataclass
class Launcher:
    tmp_path: Path
    started: list[Supervisor] = field(default_factory=list)

    def __call__(self, config: Path, env: dict[str, str] | None = None) -> Supervisor:
        log = self.tmp_path / f"supervisor-{len(self.started)}.log"
        with log.open("wb") as stderr:
            process = subprocess.Popen(
                [str(SUPERVISOR), "start", "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env={**os.environ, **(env or {})},
            )
        supervisor = Supervisor(process, log)
        self.started.append(supervisor)
        return supervisor

    def kill_all(self) -> None:
        for supervisor in self.started:
            if supervisor.process.poll() is not None:
                continue
            leftovers = supervisor.tree()
            supervisor.process.kill()
            supervisor.process.wait()
            for child in leftovers:
                child.kill()
            psutil.wait_procs(leftovers, timeout=5)


def running(process: psutil.Process) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for whoever adopted it)."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def pid_running(pid: int) -> bool:
    try:
        return running(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return False


def config_file(
    tmp_path: Path, settings: Settings, processes: int, **sections: dict[str, Any]
) -> Path:
    settings = configured(settings, supervisor={"drain_timeout": DRAIN_TIMEOUT}, **sections)
    return write_config(tmp_path / "scrapeq.toml", settings, processes=processes)


async def worker_pids(queue: RedisQueue, supervisor: Supervisor) -> set[int]:
    """Pids of the supervisor's live children that are registered, active workers."""
    children = {child.pid for child in psutil.Process(supervisor.pid).children() if running(child)}
    workers = await WorkerMonitor(queue).get_active_workers()
    return {w["pid"] for w in workers if w["status"] == "active" and w.get("pid") in children}


async def wait_for_workers(
    queue: RedisQueue, supervisor: Supervisor, count: int, timeout: float = START_TIMEOUT
) -> set[int]:
    async def settled() -> bool:
        assert supervisor.process.poll() is None, supervisor.output()
        return len(await worker_pids(queue, supervisor)) == count

    await wait_for(settled, timeout=timeout, interval=0.1, message=f"{count} workers")
    return await worker_pids(queue, supervisor)
