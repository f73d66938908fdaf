"""The script registry: ``@script`` and the built-in scripts.

A script is ``async def f(parameters: dict) -> <JSON value>``; a plain ``def``
runs in a thread. Inside a script, :func:`current_attempt` tells which attempt
this is (1 for the first run).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

ScriptFunction = Callable[[dict[str, Any]], Any]
F = TypeVar("F", bound=ScriptFunction)

_attempt: ContextVar[int] = ContextVar("scrapeq_attempt", default=1)


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    version: str | None
    function: ScriptFunction
    is_async: bool

    def call(self, parameters: dict[str, Any]) -> Awaitable[Any]:
        if self.is_async:
            result: Awaitable[Any] = self.function(parameters)
            return result
        return asyncio.to_thread(self.function, parameters)


_registry: dict[str, Script] = {}


def script(name: str, version: str | None = None) -> Callable[[F], F]:
    """Register ``function`` under ``name`` (and ``version``, if given)."""

    def register(function: F) -> F:
        _registry[name] = Script(name, version, function, inspect.iscoroutinefunction(function))
        return function

    return register


def find_script(name: str, version: str | None = None) -> Script | None:
    """The registered script, or None if the name (or the asked version) is unknown."""
    found = _registry.get(name)
    if found is None or (version is not None and found.version != version):
        return None
    return found


def import_script_modules(modules: Iterable[str]) -> None:
    """Import the modules of ``[worker] scripts`` so their ``@script``s register."""
    for module in modules:
        importlib.import_module(module)


def current_attempt() -> int:
    """The attempt number of the task this code runs for (1 = first run)."""
    return _attempt.get()


def set_attempt(attempt: int) -> None:
    _attempt.set(attempt)


@script("echo")
async def echo(parameters: dict[str, Any]) -> dict[str, Any]:
    return parameters


@script("sleep")
async def sleep(parameters: dict[str, Any]) -> dict[str, float]:
    seconds = float(parameters.get("seconds", 0))
    await asyncio.sleep(seconds)
    return {"slept": seconds}


@script("fail")
async def fail(parameters: dict[str, Any]) -> dict[str, int]:
    times, attempt = int(parameters.get("times", -1)), current_attempt()
    if times < 0 or attempt <= times:
        raise RuntimeError(f"fail: deliberate failure on attempt {attempt}")
    return {"attempts": attempt}


@script("crash")
async def crash(parameters: dict[str, Any]) -> dict[str, int]:
    times, attempt = int(parameters.get("times", 1)), current_attempt()
    if times < 0 or attempt <= times:
        os._exit(1)
    return {"attempts": attempt}


@script("cpu")
def cpu(parameters: dict[str, Any]) -> dict[str, int]:
    ms = int(parameters.get("ms", 0))
    deadline = time.perf_counter() + ms / 1000
    while time.perf_counter() < deadline:
        pass
    return {"ms": ms}
