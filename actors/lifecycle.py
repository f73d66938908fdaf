"""Process-level safety: actor processes and the embedded redis-server never outlive
the supervisor.

Kept light (standard library only): supervisor/redis_server.py imports it too.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_PR_SET_CHILD_SUBREAPER = 36

#: After the parent dies, a child that has not stopped by itself is ended this fast.
ORPHAN_GRACE = 1.5


def libc_prctl() -> Callable[..., int] | None:
    """libc's ``prctl`` on Linux, else None (no parent-death signal there)."""
    if sys.platform != "linux":
        return None
    prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    return prctl


def die_with_parent(
    parent_pid: int,
    signum: int = signal.SIGUSR1,
    prctl: Callable[..., int] | None = None,
) -> None:
    """Ask the kernel to send ``signum`` to this process when its parent dies (Linux).

    The one ``PR_SET_PDEATHSIG`` wrapper, for both kinds of child:

    - an actor process calls it first thing (``actors/runtime.py``) with the
      default SIGUSR1, the actors' "stop at once" signal: a worker hands its
      tasks back before it exits;
    - the embedded redis-server runs it between fork and exec (``preexec_fn``
      in ``supervisor/redis_server.py``) with SIGKILL. There it must run as
      little Python as possible, so the caller looks ``prctl`` up in the parent
      (``libc_prctl()``) and passes it in; without one it is looked up here.

    The kernel sends the signal when the *thread* that created the child exits,
    not the process: the parent must start its children from a thread that
    lives as long as they do (the main thread), never from a short-lived one
    such as ``asyncio.to_thread``'s.

    If the parent died before ``prctl`` took effect (the race between its
    death and this call), no signal will ever come: the child sends itself
    ``signum`` now, as the kernel would have, and exits should the signal be
    ignored or handled.
    """
    if prctl is None:
        prctl = libc_prctl()
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), signum)
        os._exit(1)


def adopt_orphans() -> None:
    """Make this process a child subreaper (Linux): a process that a script started
    and that outlived its own parent (a daemon, a browser's helpers) is reparented
    to this process instead of to init, so it can be found and ended at exit."""
    prctl = libc_prctl()
    if prctl is not None:
        prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def exit_soon(code: int, delay: float = ORPHAN_GRACE) -> None:
    """Hard-exit after ``delay`` from a side thread, even if the event loop is stuck."""

    def hard_exit() -> None:
        logger.error("정상 종료가 %.1f초 안에 끝나지 않아 강제 종료함", delay)
        os._exit(code)

    timer = threading.Timer(delay, hard_exit)
    timer.daemon = True
    timer.start()
