"""The event history: kept by the scripts, replayed by ``supervisor events --since``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from faults.proxy import Proxy
from helpers import admin, wait_for
from test_cli import cli, write_config

from actors.exit_codes import CliExit
from actors.history import EventHistory
from actors.models import ScrapingRequest
from actors.queue import RedisQueue
from actors.store import Completion
from config.settings import EventsSettings, Settings


def echo(host: str | None = None) -> ScrapingRequest:
    parameters = {"url": f"http://{host}/"} if host else {}
    return ScrapingRequest(script_name="echo", parameters=parameters)


class Printed:
    """What the CLI (run in a thread) printed so far, one JSON event per line."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self._capsys = capsys
        self._text = ""

    def events(self) -> list[dict[str, Any]]:
        self._text += self._capsys.readouterr().out
        return [json.loads(line) for line in self._text.splitlines() if line.strip()]


def seen(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["event"], e.get("request_id") or e.get("worker_id", "")) for e in events]


@pytest.fixture
def config(settings: Settings, tmp_path: Path) -> str:
    return str(
        write_config(tmp_path / "scrapeq.toml", settings.redis.url, settings.redis.key_prefix)
    )


async def history_on(queue: RedisQueue, **events: Any) -> None:
    await queue.store.keep_history(EventsSettings(**events))


async def test_one_script_call_is_one_history_entry_holding_its_events_in_order(
    queue: RedisQueue,
) -> None:
    await history_on(queue)
    ids = await queue.enqueue_many([echo() for _ in range(10)])
    leases = (await queue.store.claim("w1", 10)).leases
    history = EventHistory(queue.connection, queue.partitions)
    entries = await history.after("0-0")

    assert [len(events) for _, events in entries] == [10, 10]
    assert [e["request_id"] for e in entries[0][1]] == ids
    assert [e["event"] for e in entries[1][1]] == ["task.started"] * 10
    assert [e["request_id"] for e in entries[1][1]] == [lease.request_id for lease in leases]


async def test_since_replays_what_a_late_reader_missed_then_follows_live_without_gap_or_duplicate(
    config: str, queue: RedisQueue, capsys: pytest.CaptureFixture[str]
) -> None:
    await history_on(queue)
    missed = await queue.enqueue_many([echo() for _ in range(5)])
    missed.append(await queue.enqueue_task(echo()))
    expected = [("task.enqueued", i) for i in missed]
    total = len(expected) + 8
    reader = asyncio.create_task(
        cli("--config", config, "events", "--since", "10m", "--json", "--count", str(total))
    )
    printed = Printed(capsys)
    await wait_for(lambda: len(printed.events()) >= len(missed))
    late = await queue.enqueue_many([echo() for _ in range(3)])
    leases = (await queue.store.claim("w1", 3)).leases
    await queue.store.complete(
        "w1", [Completion(lease.request_id, lease.attempt, "1", 0.01) for lease in leases[:2]]
    )
    expected += [("task.enqueued", i) for i in late]
    expected += [("task.started", lease.request_id) for lease in leases]
    expected += [("task.completed", lease.request_id) for lease in leases[:2]]

    assert await asyncio.wait_for(reader, 10) == CliExit.OK
    assert seen(printed.events()) == expected


async def test_a_reader_cut_off_from_redis_resumes_from_its_last_entry(
    settings: Settings, queue: RedisQueue, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await history_on(queue)
    with Proxy.for_url(settings.redis.url) as proxy:
        config = write_config(tmp_path / "proxied.toml", proxy.url, settings.redis.key_prefix)
        before = await queue.enqueue_task(echo())
        reader = asyncio.create_task(
            cli("--config", str(config), "events", "--since", "1m", "--json", "--count", "6")
        )
        printed = Printed(capsys)
        await wait_for(lambda: len(printed.events()) >= 1)
        proxy.set_mode("reset")
        during = await queue.enqueue_many([echo() for _ in range(4)])
        await asyncio.sleep(1.5)  # the reader retries through the cut
        proxy.set_mode("pass")
        after = await queue.enqueue_task(echo())
        assert await asyncio.wait_for(reader, 30) == CliExit.OK

    assert seen(printed.events()) == [("task.enqueued", i) for i in [before, *during, after]]


async def test_filters_select_by_task_type_worker_and_domain(
    config: str, queue: RedisQueue, capsys: pytest.CaptureFixture[str]
) -> None:
    await history_on(queue)
    first, second = await queue.enqueue_many([echo("a.test"), echo("b.test")])
    leases = {lease.request_id: lease for lease in (await queue.store.claim("w1", 1)).leases}
    leases.update({lease.request_id: lease for lease in (await queue.store.claim("w2", 1)).leases})
    await queue.store.complete("w1", [Completion(first, leases[first].attempt, "1", 0.01)])

    async def replay(*filters: str, count: int) -> list[tuple[str, str]]:
        argv = ("--config", config, "events", "--since", "5m", "--json", "--count", str(count))
        assert await asyncio.wait_for(cli(*argv, *filters), 10) == CliExit.OK
        return seen(Printed(capsys).events())

    assert await replay("--task", second, count=2) == [
        ("task.enqueued", second),
        ("task.started", second),
    ]
    assert await replay("--type", "task.completed", count=1) == [("task.completed", first)]
    assert await replay("--worker", "w2", "--type", "task.started", count=1) == [
        ("task.started", second)
    ]
    assert await replay("--domain", "a.test", count=3) == [
        ("task.enqueued", first),
        ("task.started", first),
        ("task.completed", first),
    ]


async def test_since_without_history_is_a_usage_error(
    config: str, queue: RedisQueue, capsys: pytest.CaptureFixture[str]
) -> None:
    await history_on(queue, history=0)

    assert await cli("--config", config, "events", "--since", "10m") == CliExit.USAGE
    assert "history" in capsys.readouterr().err
    assert not await admin(queue).exists(queue.keys.history)


async def test_history_is_trimmed_to_its_event_count_and_age(queue: RedisQueue) -> None:
    await history_on(queue)
    await queue.enqueue_many([echo() for _ in range(20)])  # one entry of 20 events
    for _ in range(30):
        await queue.enqueue_task(echo())  # 30 entries of one
    assert await queue.store.keep_history(EventsSettings(history=10)) == 10
    assert await admin(queue).xlen(queue.keys.history) == 10  # the batch went whole
    await asyncio.sleep(0.3)
    fresh = await queue.enqueue_task(echo())

    assert await queue.store.keep_history(EventsSettings(history_max_age=0.2)) == 1
    entries = await EventHistory(queue.connection, queue.partitions).after("0-0")
    assert [e["request_id"] for _, events in entries for e in events] == [fresh]


async def test_a_lost_event_count_is_recounted_from_the_entries(queue: RedisQueue) -> None:
    await history_on(queue)
    await queue.enqueue_many([echo() for _ in range(7)])
    await admin(queue).set(queue.keys.history_count, "damaged")

    assert await queue.store.keep_history(EventsSettings(history=100)) == 7


@pytest.mark.parametrize("text", ["10", "30s", "10m", "2h", "1d"])
def test_durations_are_read_in_seconds_minutes_hours_and_days(text: str) -> None:
    from supervisor.cli_status import duration  # noqa: PLC0415

    assert duration(text) == {"10": 10, "30s": 30, "10m": 600, "2h": 7200, "1d": 86400}[text]
