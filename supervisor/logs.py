"""Logging setup shared by the command line and the actor processes.

One format and one setup function (``configure_logging``): the supervisor's
records name the process (``[MainProcess]``), an actor's name the actor
(``[worker-1]``, see ``actors/runtime.py``).

Every record comes out as one line. Messages carry text from outside (a
scraped page in an error, a script's exception), and stderr goes to the
journal line by line: a newline in a message would start a fake record, an
ANSI escape would rewrite the terminal. So the formatter writes each control
character as a visible escape (``\\n``, ``\\x1b``) instead.
"""

from __future__ import annotations

import logging
import sys
from types import TracebackType
from typing import TextIO, TypeAlias

#: ``source`` is the process name, or the actor id in an actor process.
FORMAT = "%(asctime)s %(levelname)s [%(source)s] %(message)s"

_ExcInfo: TypeAlias = (
    tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]
)

_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
#: Every C0 control, DEL and every C1 control (CSI, 0x9b, is an ANSI escape on
#: its own) -> its visible escape, for ``str.translate``.
_ESCAPE_CONTROLS = {
    code: _NAMED_ESCAPES.get(chr(code), f"\\x{code:02x}")
    for code in (*range(0x20), *range(0x7F, 0xA0))
}
#: The same but for newlines: a traceback keeps its lines.
_ESCAPE_CONTROLS_BUT_NEWLINE = {k: v for k, v in _ESCAPE_CONTROLS.items() if k != ord("\n")}


def escape_controls(text: str) -> str:
    """``text`` with every control character written as a visible escape: one line."""
    return text.translate(_ESCAPE_CONTROLS)


class OneLineFormatter(logging.Formatter):
    """``FORMAT``, with the control characters of every message escaped.

    The record itself is left as it is (other handlers, pytest's among them,
    see the original message). A traceback keeps its line breaks, but other
    control characters in it are escaped too.
    """

    def __init__(self, source: str | None = None) -> None:
        super().__init__(FORMAT)
        self._source = source

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        source = self._source if self._source is not None else record.processName
        return escape_controls(FORMAT % {**record.__dict__, "source": source})

    def formatException(self, ei: _ExcInfo) -> str:  # noqa: N802
        return super().formatException(ei).translate(_ESCAPE_CONTROLS_BUT_NEWLINE)

    def formatStack(self, stack_info: str) -> str:  # noqa: N802
        return super().formatStack(stack_info).translate(_ESCAPE_CONTROLS_BUT_NEWLINE)


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever ``sys.stderr`` is when a record is emitted.

    Binding the stream at emit time keeps the handler valid when stderr is
    replaced later (pytest's capture, a daemon redirecting its output).
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        """Ignored: the stream is always the current ``sys.stderr``."""


def configure_logging(level: str = "INFO", source: str | None = None) -> None:
    """Send log records of ``level`` and above to stderr, one line each.

    ``source`` names the sender in every line (an actor passes its id); by
    default each record's process name does. Calling it again replaces the
    handler it installed before (and only that one), so handlers added by
    others, such as pytest's, are left alone.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _StderrHandler):
            root.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(OneLineFormatter(source))
    root.addHandler(handler)
    root.setLevel(level.upper())
