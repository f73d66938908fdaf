"""A running scrapeq for fault tests: actor processes started directly, or ``supervisor start``.

Mode ``actors`` starts each actor the way the supervisor does (``spawn`` +
``actor_main``) as a child of the test, with nobody to restart one that dies:
the test sees exactly what the queue protocol recovers by itself. Mode
``supervisor`` runs one or more ``supervisor start`` processes (several act
as several hosts sharing one Redis), with their restarts, drains and checks.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import uuid
import weakref
from collections.abc import Iterable
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Literal, Self, cast

import psutil
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from supervisor_harness import write_config

from actors.keys import KeySpace
from actors.runtime import ActorSpec, actor_main
from config.settings import Settings

ClusterMode = Literal["actors", "supervisor"]

TESTS_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = TESTS_DIR.parent
LEDGER_SCRIPTS = "faults.ledger_scripts"
SPAWN = multiprocessing.get_context("spawn")
#: ``python -m supervisor.cli`` would only import the module: call its entry point.
SUPERVISOR_START = (sys.executable, "-c", "from supervisor.cli import main; main()", "start")
#: Each actor is a fresh interpreter; a 2-core CI machine needs a while for several.
READY_TIMEOUT = 30.0
#: How long ``stop`` waits after SIGTERM before SIGKILL.
STOP_GRACE = 10.0
#: How long SIGKILLed processes may take to disappear.
KILL_WAIT = 5.0


def cluster_settings(
    settings: Settings, *, workers: int, concurrency: int | None, redis_url: str | None
) -> Settings:
    """``settings`` with the ledger scripts loaded, ``workers`` processes and no embedded Redis."""
    data = settings.model_dump()
    if redis_url is not None:
        data["redis"]["url"] = redis_url
    data["worker"]["processes"] = workers
    data["worker"]["scripts"] = tuple(dict.fromkeys((*settings.worker.scripts, LEDGER_SCRIPTS)))
    if concurrency is not None:
        data["worker"]["concurrency"] = concurrency
    data["redis"]["embedded"] = "never"  # the test owns Redis; never a grandchild redis-server
    return Settings.model_validate(data)


class Cluster:
    """Worker, heartbeat and reaper processes (plus a governor) on the test's Redis.

    Usage::

        with Cluster(settings, tmp_path, workers=2) as cluster:   # started and ready
            pid = cluster.worker_pids()[0]
            cluster.kill_worker(pid)                 # SIGKILL; or signal.SIGSTOP ...
            cluster.add_worker()                     # actors mode: a replacement
        # stopped: SIGTERM, SIGKILL after the grace, nothing left running

    Workers import ``faults.ledger_scripts`` (added to ``[worker] scripts``);
    ``cluster.settings`` are the effective settings. ``redis_url`` replaces the
    URL the cluster's processes use (e.g. a ``Proxy``'s); the cluster itself
    keeps reading ``settings.redis.url`` (readiness, worker pids), so it still
    sees Redis while the proxy blackholes. Start it from the main thread: an
    actor gets its parent-death signal when the thread that started it exits.
    In ``supervisor`` mode each supervisor's stderr is in ``workdir``
    (``logs()``); ``supervisors`` > 1 needs ``metrics_port = 0``.
    """

    def __init__(
        self,
        settings: Settings,
        workdir: Path,
        *,
        workers: int = 2,
        mode: ClusterMode = "actors",
        supervisors: int = 1,
        governor: bool = False,
        concurrency: int | None = None,
        redis_url: str | None = None,
    ) -> None:
        if mode == "actors" and supervisors != 1:
            raise ValueError("supervisors applies to mode 'supervisor' only")
        self.settings = cluster_settings(
            settings, workers=workers, concurrency=concurrency, redis_url=redis_url
        )
        self.workdir = workdir
        self.workers = workers
        self.mode = mode
        self.supervisors = supervisors
        self.governor = governor
        self.keys = KeySpace(settings.redis.key_prefix)
        self._admin = redis.Redis.from_url(
            settings.redis.url,
            socket_timeout=2,
            socket_connect_timeout=2,
            retry=Retry(NoBackoff(), 0),
        )
        self._tag = uuid.uuid4().hex[:6]  # actor ids stay unique across clusters on one prefix
        self._actors: dict[str, BaseProcess] = {}
        self._worker_ids: list[str] = []
        self._popens: list[subprocess.Popen[bytes]] = []
        self._logs: list[Path] = []
        self._known: dict[int, psutil.Process] = {}
        self._finalizer = weakref.finalize(self, _kill_all, self._known)

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> Self:
        """Start every process (returns at once; see ``ready``)."""
        if self.mode == "actors":
            for _ in range(self.workers):
                self.add_worker()
            singletons = ("heartbeat", "reaper", *(("governor",) if self.governor else ()))
            for kind in singletons:
                self._spawn(kind, f"{self._tag}-{kind}")
        else:
            for index in range(self.supervisors):
                self._launch_supervisor(index)
        return self

    def ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait until every worker process has registered in Redis."""
        expected = self.workers * self.supervisors
        deadline = time.monotonic() + timeout
        while len(self._registered_pids()) < expected:
            self._check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{expected} worker(s) not registered within {timeout} s\n{self.logs()}"
                )
            time.sleep(0.05)

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM (after SIGCONT), SIGKILL whatever is left after ``grace``; reap all."""
        self._remember_descendants()
        for process in self._alive():
            _signal(process, signal.SIGCONT)  # a SIGSTOPped process cannot act on SIGTERM
        for pid in self._top_pids(running_only=True):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)  # unreaped children: the pid is still theirs
        deadline = time.monotonic() + grace
        self._reap_top(deadline)
        self._remember_descendants()
        _kill_all(self._known)
        self._reap_top(time.monotonic() + KILL_WAIT)
        psutil.wait_procs(self._alive(), timeout=KILL_WAIT)
        self._admin.close()
        leftovers = self._alive()
        if leftovers:
            raise AssertionError(f"cluster processes still alive after stop: {leftovers}")

    def __enter__(self) -> Self:
        self.start()
        try:
            self.ready()
        except BaseException:
            self.stop(grace=0)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- processes -----------------------------------------------------------------

    def add_worker(self) -> int:
        """Start one more worker process (mode ``actors``); returns its pid."""
        if self.mode != "actors":
            raise ValueError("add_worker needs mode 'actors': the supervisor starts its own")
        actor_id = f"{self._tag}-worker-{len(self._worker_ids) + 1}"
        self._worker_ids.append(actor_id)
        return self._spawn("worker", actor_id)

    def worker_pids(self) -> list[int]:
        """The pids of this cluster's live worker processes."""
        if self.mode == "actors":
            workers = (self._actors[actor_id] for actor_id in self._worker_ids)
            return [process.pid for process in workers if process.pid and process.is_alive()]
        descendants = self._remember_descendants()
        return sorted(pid for pid in self._registered_pids() if pid in descendants)

    def kill_worker(self, pid: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to one of this cluster's workers (refuses any other pid)."""
        if pid not in self.worker_pids():
            raise ValueError(f"pid {pid} is not a live worker of this cluster")
        os.kill(pid, sig)

    def supervisor_pids(self) -> list[int]:
        return [popen.pid for popen in self._popens if popen.poll() is None]

    def logs(self) -> str:
        """The supervisors' stderr (mode ``supervisor``; actors log to the test's stderr)."""
        return "\n".join(
            f"--- {log.name}\n{log.read_text(encoding='utf-8', errors='replace')[-4000:]}"
            for log in self._logs
            if log.exists()
        )

    # -- internals -----------------------------------------------------------------

    def _spawn(self, kind: str, actor_id: str) -> int:
        spec = ActorSpec(kind, actor_id, self.settings.to_json(), os.getpid())
        process = SPAWN.Process(target=actor_main, args=(spec,), name=actor_id)
        process.start()
        assert process.pid is not None
        self._actors[actor_id] = process
        self._remember([process.pid])
        return process.pid

    def _launch_supervisor(self, index: int) -> None:
        data = self.settings.model_dump()
        data["supervisor"]["state_dir"] = self.workdir / f"state-{index}"
        config = write_config(
            self.workdir / f"supervisor-{index}.toml", Settings.model_validate(data)
        )
        log = self.workdir / f"supervisor-{index}.log"
        path = [str(TESTS_DIR), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]
        with log.open("wb") as stderr:
            popen = subprocess.Popen(
                [*SUPERVISOR_START, "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                cwd=self.workdir,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)},
            )
        self._popens.append(popen)
        self._logs.append(log)
        self._remember([popen.pid])

    def _registered_pids(self) -> set[int]:
        """Pids of workers registered in Redis that belong to this cluster."""
        ids = cast(list[bytes], self._admin.zrange(self.keys.workers, 0, -1))
        pipe = self._admin.pipeline(transaction=False)
        for worker_id in ids:
            pipe.hget(self.keys.worker(worker_id.decode()), "pid")
        pids = {int(pid) for pid in pipe.execute() if pid is not None}
        if self.mode == "actors":
            return pids & set(self.worker_pids())
        return pids & self._remember_descendants()

    def _check_alive(self) -> None:
        """Fail fast when a process died while the cluster was starting."""
        for actor_id, process in self._actors.items():
            if process.exitcode is not None:
                raise AssertionError(f"actor {actor_id} exited with {process.exitcode}")
        for popen in self._popens:
            if popen.poll() is not None:
                raise AssertionError(f"supervisor exited with {popen.returncode}\n{self.logs()}")

    def _top_pids(self, *, running_only: bool = False) -> list[int]:
        """The direct children's pids (with ``running_only``: those not exited and reaped)."""
        pids = [
            process.pid
            for process in self._actors.values()
            if process.pid and not (running_only and process.exitcode is not None)
        ]
        return pids + [
            popen.pid for popen in self._popens if not (running_only and popen.poll() is not None)
        ]

    def _remember(self, pids: Iterable[int]) -> None:
        for pid in pids:
            if pid not in self._known:
                with contextlib.suppress(psutil.NoSuchProcess):
                    self._known[pid] = psutil.Process(pid)

    def _remember_descendants(self) -> set[int]:
        """Record every live descendant of the cluster's processes; returns their pids."""
        found: set[int] = set()
        for pid in self._top_pids():
            top = self._known.get(pid)
            if top is None or not _running(top):  # also skips a pid reused by a stranger
                continue
            with contextlib.suppress(psutil.NoSuchProcess):
                found.update(child.pid for child in top.children(recursive=True))
        self._remember(found)
        return found

    def _alive(self) -> list[psutil.Process]:
        return [process for process in self._known.values() if _running(process)]

    def _reap_top(self, deadline: float) -> None:
        """Reap the direct children with their own APIs (psutil would steal their exit codes)."""
        for process in self._actors.values():
            if process.exitcode is None:
                process.join(max(0.0, deadline - time.monotonic()))
        for popen in self._popens:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(max(0.0, deadline - time.monotonic()))


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _signal(process: psutil.Process, sig: int) -> None:
    """Signal ``process`` if it is still the same process (psutil checks the pid was not reused)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        process.send_signal(sig)


def _kill_all(known: dict[int, psutil.Process]) -> None:
    """SIGKILL every process the cluster ever started or saw under it (also the finalizer)."""
    for process in known.values():
        if _running(process):
            _signal(process, signal.SIGKILL)
