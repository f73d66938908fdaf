"""Signals of ``supervisor start``, turned into commands for the process tree.

The handlers only record: each one hands a `Command` to the tree's inbox and
returns; the tree's main loop acts on it, exactly as it would on the same
command from any other source.

=============  ==============================================
SIGTERM/SIGINT  `Command.DRAIN`; the second one `Command.STOP_NOW`
SIGHUP          `Command.RELOAD`
SIGTTIN         `Command.GROW` (one worker process more)
SIGTTOU         `Command.SHRINK` (one worker process fewer)
=============  ==============================================
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from enum import StrEnum
from types import TracebackType
from typing import Self

logger = logging.getLogger(__name__)


class Command(StrEnum):
    DRAIN = "drain"
    """Stop claiming, let running tasks finish up to drain_timeout, exit 0."""
    STOP_NOW = "stop_now"
    """Hand running tasks back at once and exit 0."""
    RELOAD = "reload"
    """Re-read the config file and apply it."""
    GROW = "grow"
    SHRINK = "shrink"


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_COMMANDS = {
    signal.SIGHUP: Command.RELOAD,
    signal.SIGTTIN: Command.GROW,
    signal.SIGTTOU: Command.SHRINK,
}


class SignalCommands:
    """Installs the handlers on the running loop for the span of a ``with`` block.

    Install it first thing, before whatever will act on the commands exists:
    until `forward_to` names the receiver, commands are kept in order.
    """

    def __init__(self) -> None:
        self._submit: Callable[[Command], None] | None = None
        self._held: list[Command] = []
        self._stops = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def stop_requested(self) -> bool:
        """True once SIGTERM or SIGINT has arrived."""
        return self._stops > 0

    def forward_to(self, submit: Callable[[Command], None]) -> None:
        """Send every command, the held ones first, to `submit` from now on."""
        self._submit = submit
        held, self._held = self._held, []
        for command in held:
            submit(command)

    def __enter__(self) -> Self:
        self._loop = asyncio.get_running_loop()
        for signum in (*_STOP_SIGNALS, *_COMMANDS):
            self._loop.add_signal_handler(signum, self._record, signum)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._loop is not None:
            for signum in (*_STOP_SIGNALS, *_COMMANDS):
                self._loop.remove_signal_handler(signum)
            self._loop = None

    def _record(self, signum: signal.Signals) -> None:
        if signum in _STOP_SIGNALS:
            self._stops += 1
            command = Command.DRAIN if self._stops == 1 else Command.STOP_NOW
        else:
            command = _COMMANDS[signum]
        logger.info("신호 %s 수신 → %s", signum.name, command.value)
        if self._submit is None:
            self._held.append(command)
        else:
            self._submit(command)
