"""The Redis password never leaves the configuration.

One run that goes through the places a URL can surface, errors above all:
config errors, refused and unreachable servers (URL, query and unix forms),
a failing task, the event stream, ``status --json``, and a running
supervisor that is sent a broken config on SIGHUP. Every line any of them
printed or logged is searched for the password.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import wait_for
from supervisor_harness import DRAIN_TIMEOUT, Launcher, config_file, configured, wait_for_workers

from actors.queue import RedisQueue
from config.settings import Settings
from supervisor.redis_server import RedisServer, free_port

PASSWORD = "pw-" + uuid.uuid4().hex
CLI = str(Path(sys.executable).parent / "supervisor")


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("secret"), appendonly=False, password=PASSWORD)
    server.start()
    yield server
    server.stop()


def cli(*args: str, url: str, cwd: Path) -> str:
    """Run the CLI with ``REDIS_URL=url``; its stdout and stderr, and its exit code."""
    env = {k: v for k, v in os.environ.items() if k != "SUPERVISOR_CONFIG"}
    env["REDIS_URL"] = url
    done = subprocess.run(
        [CLI, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    return f"$ {' '.join(args)} -> {done.returncode}\n{done.stdout}{done.stderr}"


async def test_no_output_of_a_run_full_of_errors_contains_the_password(
    secured: RedisServer, settings: Settings, launch: Launcher, tmp_path: Path
) -> None:
    good = secured.url
    port = secured.port
    unreachable = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"
    outputs = [
        cli("status", "--json", url=good, cwd=tmp_path),
        cli("status", url=f"redis://:{PASSWORD}x@127.0.0.1:{port}/0", cwd=tmp_path),
        cli("status", url=unreachable, cwd=tmp_path),
        cli("status", url=f"redis://127.0.0.1:{free_port()}/0?password={PASSWORD}", cwd=tmp_path),
        cli("status", url=f"unix://{tmp_path}/none.sock?password={PASSWORD}", cwd=tmp_path),
        cli("status", url=f"redis://:{PASSWORD}@127.0.0.1:{port}/0?bogus=1", cwd=tmp_path),
        cli("status", url=f"redis://:{PASSWORD}@127.0.0.1:notaport/0", cwd=tmp_path),
        cli("submit", "fail", "--wait", "--wait-timeout", "1", url=good, cwd=tmp_path),
        cli("events", "--count", "1", url=unreachable, cwd=tmp_path),
    ]

    served = configured(settings, redis={"url": good})
    config = config_file(tmp_path, served, processes=1)
    supervisor = launch(config)
    async with RedisQueue(served) as queue:
        await wait_for_workers(queue, supervisor, 1)
        original = config.read_text()
        config.write_text(original + "\n[redis\nbroken = ")
        supervisor.send(signal.SIGHUP)
        await wait_for(lambda: "invalid TOML" in supervisor.output(), timeout=10)
        config.write_text(original)
        failing = ("submit", "fail", "--max-retries", "0", "--wait", "--wait-timeout", "20")
        outputs.append(cli("--config", str(config), *failing, url=good, cwd=tmp_path))
        supervisor.send(signal.SIGTERM)
        assert await supervisor.exit_code(DRAIN_TIMEOUT + 5) == 0, supervisor.output()
    outputs.append(supervisor.output())
    await asyncio.sleep(0)

    everything = "\n".join(outputs)
    for code in (1, 2, 3, 5):  # a failed task, config errors, a timeout, unreachable Redis
        assert f"-> {code}\n" in everything, everything
    assert PASSWORD not in everything
    assert "***" in everything  # the URL is named, masked
