"""The script registry: ``@script``, version matching, threads for sync scripts, script modules."""

from __future__ import annotations

import asyncio
import sys
import textwrap
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from actors.exit_codes import ChildExit
from actors.runtime import ActorSpec, run_actor
from actors.scripts import (
    Script,
    current_attempt,
    find_script,
    import_script_modules,
    script,
    set_attempt,
)
from config.settings import Settings


def unique(name: str) -> str:
    """A script name no other test registers (the registry is process-wide)."""
    return f"test-{name}-{uuid.uuid4().hex[:8]}"


def found(name: str, version: str | None = None) -> Script:
    registered = find_script(name, version)
    assert registered is not None, f"{name!r} (version {version}) is not registered"
    return registered


def test_script_registers_the_function_under_its_name_and_returns_it_unchanged() -> None:
    name = unique("registered")

    async def scrape(parameters: dict[str, Any]) -> str:
        return "ok"

    assert script(name)(scrape) is scrape
    registered = found(name)
    assert (registered.name, registered.function, registered.is_async) == (name, scrape, True)


def test_find_script_matches_the_version_only_when_one_is_asked_for() -> None:
    versioned, plain = unique("versioned"), unique("plain")
    script(versioned, version="2")(lambda parameters: None)
    script(plain)(lambda parameters: None)

    assert found(versioned).version == "2"
    assert found(versioned, "2").version == "2"
    assert find_script(versioned, "1") is None
    assert find_script(plain, "1") is None
    assert find_script(unique("never-registered")) is None


@pytest.mark.parametrize(
    ("name", "is_async"),
    [("echo", True), ("sleep", True), ("fail", True), ("crash", True), ("cpu", False)],
)
def test_built_in_scripts_are_always_registered(name: str, is_async: bool) -> None:
    assert found(name).is_async is is_async


async def test_sync_script_runs_in_a_thread_and_async_script_on_the_loop() -> None:
    sync_name, async_name = unique("sync"), unique("async")

    @script(sync_name)
    def in_thread(parameters: dict[str, Any]) -> int:
        return threading.get_ident()

    @script(async_name)
    async def on_loop(parameters: dict[str, Any]) -> int:
        return threading.get_ident()

    assert await found(sync_name).call({}) != threading.get_ident()
    assert await found(async_name).call({}) == threading.get_ident()


async def test_current_attempt_is_per_task_and_reaches_sync_scripts() -> None:
    name = unique("attempt")
    script(name)(lambda parameters: current_attempt())

    async def run_as(attempt: int) -> int:
        set_attempt(attempt)
        await asyncio.sleep(0)  # let the other task set its own attempt first
        result: int = await found(name).call({})
        return result

    assert list(await asyncio.gather(run_as(2), run_as(3))) == [2, 3]
    assert current_attempt() == 1  # outside any task: the first attempt


def test_import_script_modules_registers_the_scripts_of_a_module_on_sys_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module, name = f"scripts_{uuid.uuid4().hex[:8]}", unique("from-module")
    source = f"""
        from actors.scripts import script

        @script({name!r}, version="1.0")
        async def run(parameters):
            return parameters
    """
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(tmp_path)
    try:
        import_script_modules([module])

        assert found(name, "1.0").function.__module__ == module
    finally:
        sys.modules.pop(module, None)


def test_worker_with_a_script_module_that_cannot_be_imported_exits_with_config_error(
    settings: Settings,
) -> None:
    data = settings.model_dump(mode="json")
    data["worker"]["scripts"] = [f"no_such_module_{uuid.uuid4().hex[:8]}"]
    broken = Settings.model_validate(data)

    with pytest.raises(ModuleNotFoundError):
        import_script_modules(broken.worker.scripts)
    spec = ActorSpec("worker", "w1", broken.to_json(), 0)
    assert run_actor(spec) == ChildExit.CONFIG_ERROR
