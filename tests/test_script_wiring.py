"""Things written twice must agree: each Lua script's KEYS header and its wiring in
``SCRIPT_KEYS`` (actors/store.py), and the task defaults and config/default.toml.

No Redis needed: these read the files.
"""

from __future__ import annotations

import re
import tomllib
from importlib import resources
from pathlib import Path

import pytest

from actors.defaults import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT
from actors.keys import KeySpace
from actors.models import ScrapingRequest
from actors.store import SCRIPT_KEYS, SCRIPT_NAMES, script_keys
from config.settings import Settings

LUA = resources.files("actors") / "lua"
DEFAULT_TOML = Path(__file__).resolve().parents[1] / "config" / "default.toml"

#: Header names that differ from their wiring name. The headers use the
#: KeySpace attribute names (rate_state, breaker_settings, gates, ...) and
#: <worker>, <lock> for keys the call supplies, so none differ today; a
#: header that wants another name adds it here.
HEADER_ALIASES: dict[str, str] = {}

_HEADER_KEY = re.compile(r"^-- KEYS\[(\d+)\]\s+(\S+)")
_USED_KEY = re.compile(r"\bKEYS\[(\d+)\]")


def header(name: str) -> list[str]:
    """The comment lines that open ``name``.lua, up to its first blank line."""
    lines = (LUA / f"{name}.lua").read_text().splitlines()
    end = lines.index("") if "" in lines else len(lines)
    return [line for line in lines[:end] if line.startswith("--")]


def header_keys(name: str) -> list[str]:
    """The KEYS a script's header names, in order, checking they are numbered 1..n."""
    found = [match.groups() for line in header(name) if (match := _HEADER_KEY.match(line))]
    numbers = [int(number) for number, _ in found]
    assert numbers == list(range(1, len(found) + 1)), f"{name}.lua: KEYS numbered {numbers}"
    return [HEADER_ALIASES.get(key, key) for _, key in found]


def test_every_registered_script_has_a_wiring_and_every_wiring_a_script() -> None:
    assert set(SCRIPT_KEYS) == set(SCRIPT_NAMES)


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_the_header_names_the_wired_keys_in_the_wired_order(name: str) -> None:
    assert header_keys(name) == list(SCRIPT_KEYS[name])


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_the_script_uses_no_key_its_header_does_not_name(name: str) -> None:
    body = (LUA / f"{name}.lua").read_text()
    used = {int(number) for number in _USED_KEY.findall(body)}

    assert used <= set(range(1, len(SCRIPT_KEYS[name]) + 1)), f"{name}.lua uses KEYS{sorted(used)}"


def test_the_shared_library_takes_its_keys_as_arguments() -> None:
    assert not _USED_KEY.search((LUA / "_lib.lua").read_text())


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_every_wired_name_is_a_keyspace_attribute_or_a_key_of_the_call(name: str) -> None:
    for attr in SCRIPT_KEYS[name]:
        if attr.startswith("<"):
            assert re.fullmatch(r"<[a-z_]+>", attr), attr
        else:
            assert attr in KeySpace.__slots__, f"{name}: KeySpace has no {attr}"
            assert not attr.endswith("_prefix"), f"{name}: {attr} is a prefix, not a key"


def test_script_keys_builds_the_keys_in_order_and_fills_the_call_keys() -> None:
    keys = KeySpace("p", "q")

    assert script_keys(keys, "promote") == [keys.pending, keys.delayed, keys.guard]
    assert script_keys(keys, "heartbeat", worker=keys.worker("w1")) == [
        keys.workers,
        keys.worker("w1"),
        keys.guard,
    ]
    assert script_keys(keys, "lock", lock=keys.reaper_lock) == [keys.reaper_lock, keys.guard]
    with pytest.raises(KeyError):
        script_keys(keys, "lock")


def test_every_script_names_the_guard_last_so_a_migrating_slot_refuses_it_whole() -> None:
    assert all(wiring[-1] == "guard" for wiring in SCRIPT_KEYS.values())


# -- the task defaults, written once in actors/defaults.py ---------------------------------


def test_the_default_toml_shows_the_task_defaults() -> None:
    tasks = tomllib.loads(DEFAULT_TOML.read_text())["tasks"]

    assert tasks["default_timeout"] == DEFAULT_TIMEOUT
    assert tasks["max_retries"] == DEFAULT_MAX_RETRIES


def test_the_settings_and_the_request_model_take_the_task_defaults() -> None:
    tasks = Settings().tasks
    request = ScrapingRequest(script_name="echo")

    assert (tasks.default_timeout, tasks.max_retries) == (DEFAULT_TIMEOUT, DEFAULT_MAX_RETRIES)
    assert (request.timeout, request.max_retries) == (DEFAULT_TIMEOUT, DEFAULT_MAX_RETRIES)
