"""The ``supervisor`` command line, run in-process against the session's real Redis."""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import logging
import os
import subprocess
import sys
import tomllib
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import redis.asyncio
from helpers import wait_for

from actors.exceptions import ScriptError
from actors.exit_codes import CliExit
from actors.models import ScrapingRequest, ScrapingResponse, TaskStatus
from actors.queue import RedisQueue, TaskManager, WorkerMonitor
from config.settings import Settings
from supervisor import cli_tasks
from supervisor.cli import run
from supervisor.redis_server import free_port


def write_config(path: Path, url: str, key_prefix: str) -> Path:
    path.write_text(
        f'[redis]\nurl = "{url}"\nkey_prefix = "{key_prefix}"\nembedded = "never"\n'
        "[supervisor]\nmetrics_port = 0\n"
    )
    return path


@pytest.fixture
def config(settings: Settings, tmp_path: Path) -> str:
    return str(
        write_config(tmp_path / "scrapeq.toml", settings.redis.url, settings.redis.key_prefix)
    )


async def cli(*argv: str) -> int:
    """Run the CLI in a thread: ``run`` owns its own event loop."""
    return await asyncio.to_thread(run, list(argv))


def last_json(out: str) -> object:
    return json.loads(out.strip().splitlines()[-1])


def test_submit_prints_the_request_id(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["submit", "echo", "--config", config]) == 0
    request_id = capsys.readouterr().out.strip()
    assert run(["--config", config, "task", request_id, "--json"]) == 0
    record = last_json(capsys.readouterr().out)
    assert isinstance(record, dict)
    assert record["request_id"] == request_id
    assert record["status"] == "pending"
    assert record["request"]["script_name"] == "echo"


def test_submit_json_prints_an_object_with_the_request_id(
    config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["submit", "echo", "--json", "--config", config]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"request_id"}


def test_submit_merges_params_with_p_options_parsed_as_json_when_they_are(
    config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--config", config, "submit", "echo", "--params", '{"a": 1, "n": 0}']
    argv += ["-p", "n=3", "-p", "flag=true", "-p", "url=https://x.test/?q=1", "-p", 's="7"']
    argv += ["-p", "none=null", "-p", "bad=NaN", "--priority", "5", "--max-retries", "0"]
    assert run(argv) == 0
    request_id = capsys.readouterr().out.strip()
    assert run(["--config", config, "task", request_id, "--json"]) == 0
    record = last_json(capsys.readouterr().out)
    assert isinstance(record, dict)
    request = record["request"]
    assert request["parameters"] == {
        "a": 1,
        "n": 3,
        "flag": True,
        "url": "https://x.test/?q=1",
        "s": "7",
        "none": None,
        "bad": "NaN",
    }
    assert request["priority"] == 5
    assert request["max_retries"] == 0


@pytest.mark.parametrize("params", ["{not json", "[1, 2]"])
def test_submit_with_params_that_are_not_a_json_object_exits_2(
    config: str, params: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["--config", config, "submit", "echo", "--params", params]) == 2
    assert "--params" in capsys.readouterr().err


def test_submit_breaking_a_request_limit_exits_2_naming_the_field(
    config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["--config", config, "submit", "echo", "--priority", "5000"]) == 2
    assert "priority" in capsys.readouterr().err


def test_unknown_config_key_exits_2_naming_the_key_and_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[worker]\nconcurency = 3\n")
    assert run(["status", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "worker.concurency" in err
    assert str(path) in err


def test_config_from_supervisor_config_env_is_used_without_the_option(
    config: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SUPERVISOR_CONFIG", config)
    assert run(["status", "--json"]) == 0
    assert last_json(capsys.readouterr().out) is not None


def test_unreachable_redis_exits_5_naming_the_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"redis://:secret@127.0.0.1:{free_port()}/0"
    config = write_config(tmp_path / "down.toml", url, "down")
    assert run(["--config", str(config), "submit", "echo"]) == 5
    err = capsys.readouterr().err
    assert url.replace("secret", "***") in err
    assert "secret" not in err


def test_task_with_unknown_id_exits_1(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--config", config, "task", "no-such-task"]) == 1
    assert "task not found: no-such-task" in capsys.readouterr().err


async def test_status_json_reports_counts_workers_and_default_backpressure(
    config: str, queue: RedisQueue, capsys: pytest.CaptureFixture[str]
) -> None:
    for _ in range(3):
        await queue.enqueue_task(ScrapingRequest(script_name="echo"))
    await queue.dequeue_task("w1", timeout=1)
    await WorkerMonitor(queue).register_worker("w1", pid=4242, host="node-a")

    assert await cli("--config", config, "status", "--json") == 0
    state = json.loads(capsys.readouterr().out)
    assert set(state) == {
        "queue",
        "workers",
        "backpressure",
        "paused_keys",
        "domains",
        "latency",
        "throughput",
    }
    assert {k: state["queue"][k] for k in ("pending", "running", "retrying", "dead_letter")} == {
        "pending": 2,
        "running": 1,
        "retrying": 0,
        "dead_letter": 0,
    }
    assert state["queue"]["completed"] == state["queue"]["failed"] == 0
    (worker,) = state["workers"]
    assert (worker["worker_id"], worker["status"], worker["pid"], worker["host"]) == (
        "w1",
        "active",
        4242,
        "node-a",
    )
    assert state["backpressure"] == {"state": "open", "depth": 2}


async def test_status_reports_the_published_backpressure_state(
    config: str,
    queue: RedisQueue,
    redis_client: redis.asyncio.Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    key = queue.keys.backpressure
    await redis_client.hset(key, mapping={"state": "throttled", "depth": 60000, "rate": 12.5})

    assert await cli("--config", config, "status", "--json") == 0
    state = json.loads(capsys.readouterr().out)
    assert state["backpressure"] == {"state": "throttled", "depth": 60000, "rate": 12.5}

    assert await cli("--config", config, "status") == 0
    assert "backpressure: throttled (depth 60000, rate 12.5/s)" in capsys.readouterr().out


async def dead_letter(queue: RedisQueue, error: str = "boom") -> str:
    """Enqueue a task, then claim the next one and fail it permanently; returns its id."""
    await queue.enqueue_task(ScrapingRequest(script_name="echo"))
    (lease,) = (await queue.store.claim("w1", 1)).leases
    await queue.store.fail("w1", lease.request_id, lease.attempt, error, permanent=True)
    return lease.request_id


async def test_dlq_list_shows_a_dead_letter_and_retry_requeues_it(
    config: str, queue: RedisQueue, capsys: pytest.CaptureFixture[str]
) -> None:
    request_id = await dead_letter(queue, "kaput")

    assert await cli("--config", config, "dlq", "list", "--json") == 0
    (letter,) = json.loads(capsys.readouterr().out)
    assert (letter["request_id"], letter["error"], letter["status"]) == (
        request_id,
        "kaput",
        "failed",
    )

    assert await cli("dlq", "list", "--config", config) == 0
    assert request_id in capsys.readouterr().out

    assert await cli("--config", config, "dlq", "retry", request_id) == 0
    assert await TaskManager(queue).get_task_status(request_id) is TaskStatus.PENDING
    assert await cli("--config", config, "dlq", "retry", request_id) == 1
    assert "not in the dead-letter queue" in capsys.readouterr().err


async def test_dlq_retry_all_and_purge_empty_the_dead_letter_queue(
    config: str, queue: RedisQueue, capsys: pytest.CaptureFixture[str]
) -> None:
    manager = TaskManager(queue)
    for _ in range(2):
        await dead_letter(queue)
    assert await cli("--config", config, "dlq", "retry", "--all") == 0
    assert "requeued 2" in capsys.readouterr().out
    assert (await manager.queue_stats())["pending"] == 2

    purged = [await dead_letter(queue) for _ in range(2)]
    assert await cli("--config", config, "dlq", "purge") == 0
    assert "purged 2" in capsys.readouterr().out
    assert await manager.list_dead_letters(10) == []
    assert [await manager.get_task(request_id) for request_id in purged] == [None, None]


async def fake_worker(settings: Settings, status: TaskStatus) -> None:
    """Dequeue one task and report ``status`` for it, as a worker process would."""
    async with RedisQueue(settings) as queue:
        request = await queue.dequeue_task("fake-worker", timeout=10)
        assert request is not None
        await TaskManager(queue).complete_task(
            ScrapingResponse(
                request_id=request.request_id,
                status=status,
                data=request.parameters if status is TaskStatus.COMPLETED else None,
                error=None if status is TaskStatus.COMPLETED else "it broke",
                execution_time=0.01,
            )
        )


async def test_submit_wait_prints_the_response_and_exits_0_when_completed(
    config: str, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _ = await asyncio.gather(
        cli("--config", config, "submit", "echo", "-p", "x=1", "--wait", "--json"),
        fake_worker(settings, TaskStatus.COMPLETED),
    )
    assert code == 0
    response = json.loads(capsys.readouterr().out)
    assert (response["status"], response["data"]) == ("completed", {"x": 1})


async def test_submit_wait_exits_1_when_the_task_fails(
    config: str, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _ = await asyncio.gather(
        cli("--config", config, "submit", "echo", "--max-retries", "0", "--wait"),
        fake_worker(settings, TaskStatus.FAILED),
    )
    assert code == 1
    out = capsys.readouterr().out
    assert "status: failed" in out
    assert "error: it broke" in out


def test_submit_wait_without_a_worker_exits_3_after_the_wait_timeout(
    config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["--config", config, "submit", "echo", "--wait", "--wait-timeout", "0.5"]) == 3
    captured = capsys.readouterr()
    assert captured.out.strip()  # the request id, printed before waiting
    assert "within 0.5s" in captured.err


async def test_events_json_prints_an_enqueued_event(
    config: str,
    queue: RedisQueue,
    redis_client: redis.asyncio.Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    events = asyncio.create_task(cli("--config", config, "events", "--json", "--count", "1"))

    async def subscribed() -> bool:
        counts = await redis_client.pubsub_numsub(queue.keys.events)
        return bool(counts[0][1])

    await wait_for(subscribed)
    request_id = await queue.enqueue_task(ScrapingRequest(script_name="echo"))
    assert await asyncio.wait_for(events, 10) == 0
    event = json.loads(capsys.readouterr().out)
    assert event["event"] == "task.enqueued"
    assert event["request_id"] == request_id
    assert isinstance(event["ts"], int | float)


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["start"],
        ["submit"],
        ["task"],
        ["status"],
        ["events"],
        ["dlq"],
        ["dlq", "list"],
        ["dlq", "retry"],
        ["dlq", "purge"],
    ],
)
def test_help_is_available_on_every_command(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert run([*command, "--help"]) == 0
    assert "--config PATH" in capsys.readouterr().out


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["submit"]) == 2
    assert run(["dlq", "retry", "some-id", "--all"]) == 2
    assert run(["submit", "echo", "-p", "no-equals-sign"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


# -- conventions every command follows (issue #16) ---------------------------------------------


@pytest.fixture
def _root_log_level() -> Iterator[None]:
    """Give the root logger back its level: ``run`` sets it for the whole process."""
    root = logging.getLogger()
    level = root.level
    yield
    root.setLevel(level)


def pyproject_version() -> str:
    with (Path(__file__).parent.parent / "pyproject.toml").open("rb") as file:
        version = tomllib.load(file)["project"]["version"]
    assert isinstance(version, str)
    return version


def test_version_prints_the_installed_version_and_exits_0() -> None:
    supervisor = Path(sys.executable).with_name("supervisor")
    done = subprocess.run(
        [str(supervisor), "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"supervisor {importlib.metadata.version('scrapeq')}\n"
    assert importlib.metadata.version("scrapeq") == pyproject_version()


def test_version_falls_back_to_pyproject_when_the_distribution_is_not_installed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert run(["--version"]) == 0
    assert capsys.readouterr().out == f"supervisor {pyproject_version()}\n"


@pytest.mark.parametrize(
    "command",
    [
        ["submit"],
        ["task"],
        ["status"],
        ["events"],
        ["dlq", "list"],
        ["dlq", "retry"],
        ["dlq", "purge"],
    ],
)
def test_every_command_that_prints_data_takes_json(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert run([*command, "--help"]) == 0
    assert "--json" in capsys.readouterr().out


async def test_dlq_retry_json_prints_one_object_naming_the_requeued_task(
    config: str, queue: RedisQueue, capsys: pytest.CaptureFixture[str]
) -> None:
    request_id = await dead_letter(queue)

    assert await cli("--config", config, "dlq", "retry", request_id, "--json") == 0
    assert json.loads(capsys.readouterr().out) == {"requeued": 1, "request_id": request_id}
    assert await TaskManager(queue).get_task_status(request_id) is TaskStatus.PENDING


async def test_dlq_retry_json_of_an_unknown_id_exits_1_and_prints_nothing_on_stdout(
    config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await cli("--config", config, "dlq", "retry", "no-such-task", "--json") == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "not in the dead-letter queue: no-such-task" in captured.err


async def test_dlq_retry_all_json_prints_how_many_were_requeued(
    config: str, queue: RedisQueue, capsys: pytest.CaptureFixture[str]
) -> None:
    for _ in range(3):
        await dead_letter(queue)

    assert await cli("--config", config, "dlq", "retry", "--all", "--json") == 0
    assert json.loads(capsys.readouterr().out) == {"requeued": 3}
    assert (await TaskManager(queue).queue_stats())["pending"] == 3


async def test_dlq_purge_json_prints_how_many_were_purged(
    config: str, queue: RedisQueue, capsys: pytest.CaptureFixture[str]
) -> None:
    for _ in range(2):
        await dead_letter(queue)

    assert await cli("--config", config, "dlq", "purge", "--json") == 0
    assert json.loads(capsys.readouterr().out) == {"purged": 2}
    assert await cli("--config", config, "dlq", "purge", "--json") == 0
    assert json.loads(capsys.readouterr().out) == {"purged": 0}


@pytest.mark.usefixtures("_root_log_level")
def test_submit_logs_nothing_on_stderr_by_default(
    config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["--config", config, "submit", "echo"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip()
    assert captured.err == ""


@pytest.mark.usefixtures("_root_log_level")
@pytest.mark.parametrize("where", ["before", "after"])
def test_an_explicit_log_level_wins_before_or_after_the_command(
    config: str, where: str, capsys: pytest.CaptureFixture[str]
) -> None:
    option = ["--log-level", "info"]
    argv = ["--config", config, *(option if where == "before" else [])]
    argv += ["submit", "echo", *(option if where == "after" else [])]
    assert run(argv) == 0
    err = capsys.readouterr().err
    assert " INFO " in err
    assert "작업 제출됨" in err


@pytest.mark.usefixtures("_root_log_level")
@pytest.mark.parametrize(
    ("option", "level"), [([], logging.INFO), (["--log-level", "ERROR"], logging.ERROR)]
)
def test_start_logs_at_info_unless_told_otherwise(
    config: str, option: list[str], level: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import supervisor.app  # noqa: PLC0415 -- heavy, only this test needs it

    levels: list[int] = []

    def fake_supervisor(settings: Settings, config_path: Path | None) -> int:
        levels.append(logging.getLogger().level)
        return 0

    monkeypatch.setattr(supervisor.app, "run_supervisor", fake_supervisor)
    assert run(["start", "--config", config, *option]) == 0
    assert levels == [level]


def raising(exc: Exception) -> Callable[[argparse.Namespace, Settings], Awaitable[int]]:
    async def handler(args: argparse.Namespace, settings: Settings) -> int:
        raise exc

    return handler


@pytest.mark.usefixtures("_root_log_level")
def test_an_unexpected_error_exits_70_with_one_stderr_line_and_no_traceback(
    config: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli_tasks, "show_task", raising(RuntimeError("boom\nat line 2")))

    assert run(["--config", config, "task", "some-id"]) == CliExit.INTERNAL == 70
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        "error: unexpected RuntimeError: boom\\nat line 2 (--log-level DEBUG shows the traceback)"
    ]


@pytest.mark.usefixtures("_root_log_level")
def test_log_level_debug_shows_the_traceback_of_an_unexpected_error(
    config: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli_tasks, "show_task", raising(RuntimeError("boom")))

    assert run(["--config", config, "task", "some-id", "--log-level", "DEBUG"]) == 70
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert "예기치 않은 오류 (RuntimeError): boom" in err
    assert err.splitlines()[-1].startswith("error: unexpected RuntimeError: boom")


@pytest.mark.usefixtures("_root_log_level")
def test_a_queue_error_without_an_exit_status_exits_70_not_with_a_traceback(
    config: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli_tasks, "show_task", raising(ScriptError("corrupt record")))

    assert run(["--config", config, "task", "some-id"]) == 70
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: unexpected ScriptError: corrupt record")


@pytest.mark.usefixtures("_root_log_level")
def test_an_unexpected_error_line_masks_the_redis_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    config = write_config(tmp_path / "secret.toml", url, "secret")
    monkeypatch.setattr(cli_tasks, "show_task", raising(RuntimeError(f"bad {url}; s3cret")))

    assert run(["--config", str(config), "task", "some-id"]) == 70
    err = capsys.readouterr().err
    assert "s3cret" not in err
    assert "redis://:***@127.0.0.1" in err


@pytest.mark.usefixtures("_root_log_level")
def test_an_unexpected_error_in_start_exits_70_and_logs_its_traceback(
    config: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import supervisor.app  # noqa: PLC0415 -- heavy, only this test needs it

    def crashing_supervisor(settings: Settings, config_path: Path | None) -> int:
        raise RuntimeError("boom")

    monkeypatch.setattr(supervisor.app, "run_supervisor", crashing_supervisor)
    assert run(["start", "--config", config]) == 70
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err  # start's log is the operators' record
    assert err.splitlines()[-1] == "error: unexpected RuntimeError: boom"


def test_a_reader_that_goes_away_early_is_no_error(settings: Settings, tmp_path: Path) -> None:
    """``supervisor status | head -1``: the pipe closes before the output is written."""
    config = write_config(tmp_path / "pipe.toml", settings.redis.url, settings.redis.key_prefix)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [str(Path(sys.executable).with_name("supervisor")), "--config", str(config), "status"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)

    assert done.returncode == 0, done.stderr
    assert "error" not in done.stderr.lower()
