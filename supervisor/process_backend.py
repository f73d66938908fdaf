"""Every OS effect of the process tree behind one small interface.

The tree (``supervisor/tree.py``) only spawns, signals and kills through a
`ProcessBackend`, and learns about exits through the callback it passes to
`spawn`; tests swap in a fake backend and drive exits by hand. The real one,
`SpawnBackend`, starts each actor with the ``spawn`` start method (a fresh
interpreter: no inherited event loop, Redis client or lock) and watches the
process sentinel with the running event loop, so an exit is seen at once
without polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from typing import Protocol

from actors.runtime import ActorSpec, actor_main

logger = logging.getLogger(__name__)

ExitCallback = Callable[[int], None]
"""Called once, on the event loop, with the exit status (negative: killed by that signal)."""


class ChildProcess(Protocol):
    """What the tree may ask of a started child."""

    @property
    def pid(self) -> int: ...

    @property
    def exitcode(self) -> int | None: ...

    def is_alive(self) -> bool: ...


class ProcessBackend(Protocol):
    def spawn(self, spec: ActorSpec, on_exit: ExitCallback) -> ChildProcess:
        """Start an actor process; `on_exit` runs on the event loop once it has been reaped.

        Raises ``OSError`` when the process cannot be started.
        """
        ...

    def signal(self, child: ChildProcess, signum: signal.Signals) -> None:
        """Send `signum`; a child that is already gone is not an error."""
        ...

    def kill(self, child: ChildProcess) -> None:
        """SIGKILL; a child that is already gone is not an error."""
        ...


class _SpawnedChild:
    """A started `multiprocessing` process, usable after it has been reaped and closed."""

    def __init__(self, process: BaseProcess) -> None:
        self._process: BaseProcess | None = process
        self._pid = process.pid or 0
        self._exitcode: int | None = None

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def exitcode(self) -> int | None:
        return self._exitcode

    def is_alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def reap(self) -> int:
        """Join the exited process, free its sentinel, return its exit status."""
        process = self._process
        if process is None:
            return self._exitcode or 0
        process.join()  # the sentinel is readable: the process has exited or is exiting
        self._exitcode = process.exitcode if process.exitcode is not None else 0
        process.close()
        self._process = None
        return self._exitcode


class SpawnBackend:
    """Real actor processes: ``multiprocessing`` with the ``spawn`` start method.

    Must be used from the thread that runs the event loop (the main thread):
    each actor arms ``PR_SET_PDEATHSIG``, which fires when the *thread* that
    forked it exits.
    """

    def __init__(self) -> None:
        self._context = multiprocessing.get_context("spawn")

    def spawn(self, spec: ActorSpec, on_exit: ExitCallback) -> ChildProcess:
        loop = asyncio.get_running_loop()
        process = self._context.Process(
            target=actor_main, args=(spec,), name=spec.actor_id, daemon=False
        )
        process.start()
        child = _SpawnedChild(process)
        sentinel = process.sentinel

        def exited() -> None:
            loop.remove_reader(sentinel)
            on_exit(child.reap())

        loop.add_reader(sentinel, exited)
        logger.debug("액터 프로세스 시작: %s (pid=%d)", spec.actor_id, child.pid)
        return child

    def signal(self, child: ChildProcess, signum: signal.Signals) -> None:
        # is_alive() reaps an exited child; one that is still unreaped after it
        # keeps its pid (a zombie at worst), so the signal cannot hit a stranger.
        if child.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signum)

    def kill(self, child: ChildProcess) -> None:
        self.signal(child, signal.SIGKILL)
