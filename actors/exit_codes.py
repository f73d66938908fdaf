"""Exit codes: the contract between actor processes, the supervisor and scripts.

`ChildExit` is what an actor process returns to the supervisor; the values
follow BSD ``sysexits.h`` where one fits, so they read sensibly in
``journalctl`` and ``systemctl status``. `CliExit` is the public command-line
contract (CONTRACT.md, "Command line").
"""

from enum import IntEnum


class ChildExit(IntEnum):
    """Why an actor process stopped; the restart policy acts on it."""

    OK = 0
    """Clean stop (drained, or asked to stop)."""
    CRASH = 1
    """Unexpected failure; restarted with backoff and counted toward intensity."""
    REDIS_UNAVAILABLE = 69
    """EX_UNAVAILABLE: Redis could not be reached; restarted with backoff."""
    RECYCLE = 75
    """EX_TEMPFAIL: max_tasks_per_child / max_memory_mb reached; restarted at
    once and not counted toward intensity."""
    CONFIG_ERROR = 78
    """EX_CONFIG: the settings cannot work; never restarted."""


class CliExit(IntEnum):
    """Exit status of every ``supervisor`` command."""

    OK = 0
    TASK_FAILED = 1
    USAGE = 2
    """Bad usage or a configuration error."""
    TIMEOUT = 3
    BACKPRESSURE = 4
    REDIS_UNREACHABLE = 5
    INTERNAL = 70
    """EX_SOFTWARE: an unexpected error inside the command (a bug, or an error
    no other status names); stderr has one line saying what it was."""
