"""Process-level safety for actor processes: they never outlive the supervisor."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1

#: After the parent dies, a child that has not stopped by itself is ended this fast.
ORPHAN_GRACE = 1.5


def die_with_parent(parent_pid: int, signum: int = signal.SIGUSR1) -> None:
    """Ask the kernel to send ``signum`` when the parent dies (Linux).

    SIGUSR1 is the actors' "stop at once" signal: a worker hands its tasks
    back before it exits. If the parent is already gone, exit now.
    """
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def exit_soon(code: int, delay: float = ORPHAN_GRACE) -> None:
    """Hard-exit after ``delay`` from a side thread, even if the event loop is stuck."""

    def hard_exit() -> None:
        logger.error("정상 종료가 %.1f초 안에 끝나지 않아 강제 종료함", delay)
        os._exit(code)

    timer = threading.Timer(delay, hard_exit)
    timer.daemon = True
    timer.start()
