"""Helpers shared by the ``supervisor`` subcommands: output, signals, backpressure view."""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import signal
import sys
import threading
import tomllib
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, TypeAlias

from config.settings import Settings

#: What ``add_subparsers`` returns; each ``cli_*`` module adds its commands to it.
Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

#: A subcommand: parsed arguments and settings in, exit status out.
Handler = Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]

#: The distribution whose version ``supervisor --version`` prints.
DISTRIBUTION = "scrapeq"

#: The source tree's project file: the version when the distribution is not installed.
PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"

#: Backpressure states, in the order of ``scrapeq_backpressure_state``'s values.
BACKPRESSURE_STATES = ("open", "throttled", "closed")


def backpressure_view(fields: Mapping[bytes, bytes], pending: int) -> dict[str, Any]:
    """Backpressure as ``status`` reports it; ``open`` at the pending depth when unpublished."""
    view: dict[str, Any] = {
        "state": fields[b"state"].decode() if b"state" in fields else "open",
        "depth": int(fields[b"depth"]) if b"depth" in fields else pending,
    }
    if b"rate" in fields:
        view["rate"] = float(fields[b"rate"])
    return view


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def print_json(value: Any) -> None:
    """One JSON document on one stdout line, flushed (pipes and ``--watch`` see it at once)."""
    print(json.dumps(value, ensure_ascii=False, default=str), flush=True)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Left-aligned columns, two spaces apart; ``None`` cells print as ``-``."""
    cells = [list(headers), *[["-" if c is None else str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def format_time(seconds: float) -> str:
    """A Unix time as local ``YYYY-MM-DD HH:MM:SS.mmm``."""
    return datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


@contextmanager
def stop_on_signals() -> Iterator[asyncio.Event]:
    """An event that SIGINT or SIGTERM sets while the block runs.

    Lets a following command (``events``, ``status --watch``) finish cleanly
    and exit 0. Signal handlers exist only in the main thread; elsewhere (a
    test running the CLI in a thread) the event is only set by the caller.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        for signum in signals:
            loop.add_signal_handler(signum, stop.set)
    try:
        yield stop
    finally:
        if in_main:
            for signum in signals:
                loop.remove_signal_handler(signum)


def eprint(message: str) -> None:
    """A message for the operator on stderr (data goes to stdout)."""
    print(message, file=sys.stderr, flush=True)


def package_version() -> str:
    """The installed distribution's version, else ``pyproject.toml``'s, else ``unknown``."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        with PYPROJECT.open("rb") as file:
            version = tomllib.load(file)["project"]["version"]
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError):
        return "unknown"
    return str(version)
