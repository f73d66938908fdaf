"""The event history of a partitioned queue: every partition's stream, merged behind one cursor.

Each partition's scripts write their own stream; ``EventHistory`` reads them
all, oldest first by entry id (ms, seq, then partition), and its cursor is
the partitions' last ids joined by ``,`` (one partition: the plain id).
"""

from __future__ import annotations

import asyncio
import json
import re
from itertools import chain
from pathlib import Path
from typing import Any

import pytest
from helpers import admin
from test_cli import cli

from actors import history as history_module
from actors.exit_codes import CliExit
from actors.history import Event, EventDomains, EventHistory, parse_entry
from actors.models import ScrapingRequest
from actors.partitions import place
from actors.queue import RedisQueue
from actors.store import Completion
from config.settings import EventsSettings, Settings
from supervisor import dashboard_data
from supervisor.dashboard_data import EventQuery

PARTITIONS = 3

#: One history entry as the tests compare them: (partition, stream id, its events).
Entry = tuple[int, str, list[Event]]


def fetch(host: str) -> ScrapingRequest:
    return ScrapingRequest(script_name="echo", parameters={"url": f"https://{host}/"})


def hosts_in(queue: RedisQueue, partition: int, count: int) -> list[str]:
    """Hosts whose tasks the queue places in ``partition``."""
    found: list[str] = []
    for n in range(10_000):
        item = queue.prepare(fetch(f"site{n}.example"))
        if place(item.rate_keys, item.request_id, PARTITIONS) == partition:
            found.append(f"site{n}.example")
            if len(found) == count:
                break
    return found


async def busy_partitions(queue: RedisQueue) -> None:
    """Tasks of several domains in every partition; some claimed, some of those completed."""
    hosts = [host for p in range(PARTITIONS) for host in hosts_in(queue, p, 3)]
    for round_ in range(2):
        await queue.enqueue_many([fetch(host) for host in hosts[round_::2]])
        await queue.enqueue_task(fetch(hosts[-1 - round_]))
    for index, store in enumerate(queue.stores):
        leases = (await store.claim(f"w{index}", 4)).leases
        assert leases, f"partition {index} holds tasks"
        done = [
            Completion(lease.request_id, lease.attempt, "1", 0.01, index) for lease in leases[:2]
        ]
        await store.complete(f"w{index}", done)


async def stored(queue: RedisQueue) -> list[Entry]:
    """Every entry of every partition's stream, read raw, in the history's order."""
    client = admin(queue)
    entries: list[tuple[tuple[int, int], Entry]] = []
    for partition, keys in enumerate(queue.partitions):
        for raw_id, fields in await client.xrange(keys.history):
            entry_id = raw_id.decode()
            ms, seq = entry_id.split("-")
            flat = list(chain.from_iterable(fields.items()))
            entries.append(((int(ms), int(seq)), (partition, entry_id, parse_entry(flat))))
    return [entry for _, entry in sorted(entries, key=lambda e: (e[0], e[1][0]))]


def events_of(entries: list[Entry]) -> list[Event]:
    return [event for _, _, events in entries for event in events]


async def replay(history: EventHistory, cursor: str) -> list[tuple[str, list[Event]]]:
    """Every entry after ``cursor``, page after page, each page resumed from its last cursor."""
    read: list[tuple[str, list[Event]]] = []
    while page := await history.after(cursor):
        read += page
        cursor = page[-1][0]
    return read


async def test_replay_from_start_id_returns_every_event_of_every_partition_once_in_time_order(
    pqueue: RedisQueue,
) -> None:
    await busy_partitions(pqueue)
    history = EventHistory(pqueue.connection, pqueue.partitions)
    expected = await stored(pqueue)

    start = await history.start_id(60)
    read = await replay(history, start)

    assert {partition for partition, _, _ in expected} == set(range(PARTITIONS))
    assert [events for _, events in read] == [events for _, _, events in expected]
    assert events_of(expected)  # the entries hold events
    assert [cursor.count(",") for cursor, _ in read] == [PARTITIONS - 1] * len(read)
    assert read[-1][0] == await history.last_id()
    assert await history.after(await history.last_id()) == []


async def test_paging_with_a_small_page_resumes_from_each_entrys_cursor_with_no_gap_or_duplicate(
    pqueue: RedisQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    await busy_partitions(pqueue)
    history = EventHistory(pqueue.connection, pqueue.partitions)
    expected = await stored(pqueue)
    monkeypatch.setattr(history_module, "PAGE", 2)

    read = await replay(history, history.beginning)

    assert [events for _, events in read] == [events for _, _, events in expected]
    for index, (cursor, _) in enumerate(read):  # each entry's cursor resumes just after it
        resumed = await history.after(cursor)
        assert [events for _, events in resumed] == [
            events for _, _, events in expected[index + 1 : index + 3]
        ]
    assert await history.after(read[-1][0]) == []


async def test_each_entrys_cursor_advances_only_the_partition_the_entry_is_in(
    pqueue: RedisQueue,
) -> None:
    await busy_partitions(pqueue)
    history = EventHistory(pqueue.connection, pqueue.partitions)
    expected = await stored(pqueue)

    read = await replay(history, history.beginning)

    before = ["0-0"] * PARTITIONS
    for (cursor, _), (partition, entry_id, _) in zip(read, expected, strict=True):
        before[partition] = entry_id
        assert cursor == ",".join(before)


async def test_wait_after_returns_an_entry_written_after_the_cursor_in_a_partition_other_than_0(
    pqueue: RedisQueue, partitioned: Settings
) -> None:
    await busy_partitions(pqueue)
    # The reader's own connection: its blocked XREADs hold up nothing of the writer's.
    async with RedisQueue(partitioned) as reader:
        history = EventHistory(reader.connection, reader.partitions)
        cursor = await history.last_id()
        waiting = asyncio.create_task(history.wait_after(cursor, 3000))
        await asyncio.sleep(0.2)
        (host,) = hosts_in(pqueue, 2, 1)
        written = await pqueue.enqueue_task(fetch(host))
        entries = await asyncio.wait_for(waiting, 10)

    assert [(e["event"], e["request_id"]) for _, events in entries for e in events] == [
        ("task.enqueued", written)
    ]
    ((new_cursor, _),) = entries
    old, new = cursor.split(","), new_cursor.split(",")
    assert new[:2] == old[:2]
    assert new[2] != old[2]
    ((newest, _),) = await admin(pqueue).xrevrange(pqueue.partitions[2].history, count=1)
    assert new[2] == newest.decode()


async def test_wait_after_with_nothing_new_comes_back_empty_within_its_block(
    pqueue: RedisQueue,
) -> None:
    await busy_partitions(pqueue)
    history = EventHistory(pqueue.connection, pqueue.partitions)

    loop = asyncio.get_running_loop()
    started = loop.time()
    entries = await history.wait_after(await history.last_id(), 300)

    assert entries == []
    assert loop.time() - started < 2


async def test_with_one_partition_the_cursor_is_the_plain_stream_id(queue: RedisQueue) -> None:
    await queue.publish_settings(queue.settings)
    await queue.enqueue_many([fetch(f"site{n}.example") for n in range(3)])
    await queue.enqueue_task(fetch("other.example"))
    history = EventHistory(queue.connection, queue.partitions)
    raw_ids = [raw_id.decode() for raw_id, _ in await admin(queue).xrange(queue.keys.history)]

    read = await replay(history, "0-0")

    assert [cursor for cursor, _ in read] == raw_ids
    assert await history.last_id() == raw_ids[-1]
    assert history.beginning == "0-0"
    assert re.fullmatch(r"\d+-18446744073709551615", await history.start_id(60))
    assert [cursor for cursor, _ in await replay(history, await history.start_id(60))] == raw_ids


async def test_a_plain_id_means_every_partition_and_a_cursor_of_another_count_is_refused(
    pqueue: RedisQueue,
) -> None:
    await busy_partitions(pqueue)
    history = EventHistory(pqueue.connection, pqueue.partitions)

    assert history.beginning == "0-0,0-0,0-0"
    assert await replay(history, "0-0") == await replay(history, history.beginning)
    assert history.fits("0-0")
    assert history.fits("1-2,3-4,5-6")
    assert not history.fits("1-2,3-4")
    assert not history.fits("1-2,x,5-6")
    with pytest.raises(ValueError, match="3 partition"):
        await history.after("1-2,3-4")


async def test_the_domain_of_a_task_event_is_found_in_whichever_partition_holds_the_task(
    pqueue: RedisQueue,
) -> None:
    hosts = [hosts_in(pqueue, p, 1)[0] for p in range(PARTITIONS)]
    ids = await pqueue.enqueue_many([fetch(host) for host in hosts])
    domains = EventDomains(pqueue.connection, pqueue.partitions)

    found = [await domains.of({"event": "task.enqueued", "request_id": i}) for i in ids]

    assert found == hosts
    assert await domains.of({"event": "task.enqueued", "request_id": "no-such-task"}) is None


async def test_the_dashboard_shows_every_partitions_events_newest_first_and_follows_its_cursor(
    pqueue: RedisQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    await busy_partitions(pqueue)
    expected = await stored(pqueue)
    monkeypatch.setattr(history_module, "PAGE", 2)  # the backwards read goes page by page
    monkeypatch.setattr(dashboard_data, "PAGE", 2)
    monkeypatch.setattr(dashboard_data, "FOLLOW_PAGES", 100)

    everything = await dashboard_data.events(pqueue, EventQuery())
    (host,) = hosts_in(pqueue, 1, 1)
    later = await pqueue.enqueue_task(fetch(host))
    followed = await dashboard_data.events(pqueue, EventQuery(after=everything["cursor"]))
    nothing_new = await dashboard_data.events(pqueue, EventQuery(after=followed["cursor"]))

    assert everything["events"] == list(reversed(events_of(expected)))
    assert everything["cursor"] == ",".join(
        max((entry_id for p, entry_id, _ in expected if p == partition), key=order)
        for partition in range(PARTITIONS)
    )
    assert [(e["event"], e["request_id"]) for e in followed["events"]] == [("task.enqueued", later)]
    assert (nothing_new["events"], nothing_new["gap"]) == ([], False)
    assert nothing_new["cursor"] == followed["cursor"]


def order(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


async def test_events_since_replays_every_partition_in_time_order(
    pqueue: RedisQueue, partitioned: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await busy_partitions(pqueue)
    expected = events_of(await stored(pqueue))
    config = tmp_path / "scrapeq.toml"
    config.write_text(
        f'[redis]\nurl = "{partitioned.redis.url}"\nkey_prefix = "{partitioned.redis.key_prefix}"\n'
        f'embedded = "never"\npartitions = {PARTITIONS}\n[supervisor]\nmetrics_port = 0\n'
    )
    capsys.readouterr()

    argv = ("--config", str(config), "events", "--since", "10m", "--json")
    assert await asyncio.wait_for(cli(*argv, "--count", str(len(expected))), 10) == CliExit.OK
    printed: list[dict[str, Any]] = [
        json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()
    ]

    assert printed == expected


async def test_each_partition_keeps_its_share_of_the_history_bound(pqueue: RedisQueue) -> None:
    for store in pqueue.stores:
        await store.keep_history(EventsSettings(history=10), share=PARTITIONS)
    await busy_partitions(pqueue)
    for store in pqueue.stores:  # the reaper's pass
        await store.keep_history(EventsSettings(history=10), share=PARTITIONS)

    counts = [int(await admin(pqueue).get(keys.history_count) or 0) for keys in pqueue.partitions]
    assert all(count <= 4 for count in counts), counts  # 10 / 3, rounded up
