"""``supervisor status`` and ``supervisor events``: the queue now, and as it changes."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from actors import redis_errors
from actors.connection import open_subscription
from actors.exit_codes import CliExit
from actors.history import EventDomains, EventHistory, event_filter
from actors.listeners import ListenerAnnouncement
from actors.queue import RedisQueue, TaskManager, WorkerMonitor, total_stats
from actors.subscription import Message
from actors.telemetry import QueueTelemetry
from config.settings import Settings
from supervisor import watch_view
from supervisor.cli_common import (
    Subcommands,
    backpressure_view,
    eprint,
    format_time,
    positive_int,
    print_json,
    print_table,
    stop_on_signals,
)

logger = logging.getLogger(__name__)

WATCH_INTERVAL = 1.0
#: How long one poll of the event subscription blocks, so a stop is noticed promptly.
POLL_SECONDS = 0.25
#: Pause before reading the history again after Redis did not answer.
RETRY_SECONDS = 1.0


def register(commands: Subcommands, common: argparse.ArgumentParser) -> None:
    status = commands.add_parser(
        "status",
        parents=[common],
        help="show queue depths, workers and backpressure",
        description="Show queue depths and totals, throughput, latency percentiles, every "
        "known worker and the backpressure state. --json prints one object with 'queue', "
        "'workers', 'backpressure', 'paused_keys', 'domains', 'latency' and 'throughput' "
        "(and 'partitions', each partition's depths, with [redis] partitions > 1).",
    )
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.add_argument(
        "--watch",
        action="store_true",
        help="refresh every second until Ctrl-C (with --json: one object per line)",
    )
    status.set_defaults(handler=show_status)

    events = commands.add_parser(
        "events",
        parents=[common],
        help="replay recent events and follow the live stream",
        description="Print one line per queue event (task.enqueued, task.started, "
        "task.completed, worker.lost, ...) until Ctrl-C or SIGTERM, then exit 0. "
        "--since replays the event history first, then follows live with no gap "
        "and no duplicate; filters combine (all must match).",
    )
    events.add_argument("--json", action="store_true", help="print each event as its JSON object")
    events.add_argument("--count", type=positive_int, metavar="N", help="exit 0 after N events")
    events.add_argument(
        "--since",
        type=duration,
        metavar="DURATION",
        help="replay the history of the last DURATION first (30s, 10m, 2h; plain: seconds)",
    )
    events.add_argument("--task", metavar="ID", help="only events of this task")
    events.add_argument("--worker", metavar="ID", help="only events of this worker")
    events.add_argument(
        "--type",
        action="append",
        metavar="EVENT",
        dest="types",
        help="only events of this type (task.failed, ...); repeatable",
    )
    events.add_argument("--domain", metavar="HOST", help="only events about this site")
    events.set_defaults(handler=follow_events)


_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def duration(text: str) -> float:
    """An argparse type: ``30s``, ``10m``, ``2h``, ``1d`` or plain seconds, as seconds."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in _DURATION_UNITS else (text, "s")
    try:
        seconds = float(number) * _DURATION_UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a duration such as 30s, 10m or 2h, got {text!r}"
        ) from None
    if not seconds > 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive duration, got {text!r}")
    return seconds


async def snapshot(queue: RedisQueue) -> dict[str, Any]:
    """The ``status --json`` object."""
    manager = TaskManager(queue)
    per_partition = await manager.partition_stats()
    stats = total_stats(per_partition)
    paused = await manager.paused_keys()
    domains = await manager.domains()
    workers = await WorkerMonitor(queue).get_active_workers()
    fields = await manager.backpressure_fields()
    recent = await QueueTelemetry(queue.connection, queue.keys).recent()
    for worker in workers:
        worker.setdefault("pid", None)
        worker.setdefault("host", None)
    state: dict[str, Any] = {
        "queue": stats,
        "workers": workers,
        "backpressure": backpressure_view(fields, stats["pending"]),
        "paused_keys": paused,
        "domains": domains,
        "latency": recent["latency"],
        "throughput": recent["throughput"],
    }
    if len(per_partition) > 1:
        state["partitions"] = [depths(counts) for counts in per_partition]
    return state


def depths(counts: dict[str, int]) -> dict[str, int]:
    """A partition's current depths (``status --json``'s ``partitions``: how even the spread is)."""
    return {name: counts[name] for name in ("pending", "running", "retrying", "dead_letter")}


#: Domains the text view lists (``--json`` has them all).
DOMAINS_SHOWN = 20


def _rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.3g}"


def format_percentiles(values: dict[str, float | None]) -> str:
    return " ".join(f"{name} {watch_view.format_seconds(value)}" for name, value in values.items())


def print_snapshot(state: dict[str, Any]) -> None:
    queue, backpressure = state["queue"], state["backpressure"]
    print_table(list(queue), [list(queue.values())])
    rate = f", rate {backpressure['rate']}/s" if "rate" in backpressure else ""
    print(f"\nbackpressure: {backpressure['state']} (depth {backpressure['depth']}{rate})")
    if "partitions" in state:
        spread = " · ".join(
            f"{index}: {p['pending']}/{p['running']}" for index, p in enumerate(state["partitions"])
        )
        print(f"partitions (pending/running): {spread}")
    flow = state["throughput"]
    print(
        f"throughput/s: started {flow['started_per_s']:g}, completed {flow['completed_per_s']:g}, "
        f"failed {flow['failed_per_s']:g} (last minute)"
    )
    for name, shown in (("queue_wait", "queue wait"), ("execution", "execution")):
        print(f"{shown} (last 5 min): {format_percentiles(state['latency'][name])}")
    if state["paused_keys"]:
        paused = ", ".join(f"{key} ({left:.0f}s)" for key, left in state["paused_keys"].items())
        print(f"paused rate keys: {paused}")
    if state["domains"]:
        shown = state["domains"][:DOMAINS_SHOWN]
        more = len(state["domains"]) - len(shown)
        print(f"\ndomains (busiest first{f', {more} more in --json' if more > 0 else ''}):")
        print_table(
            ["domain", "in_flight", "limit/s", "rate/s", "learned/s", "429s/min", "paused"],
            [
                [
                    d["domain"],
                    d["in_flight"],
                    _rate(d["limit"]),
                    _rate(d["rate"]),
                    _rate(d["learned"]),
                    d["throttled_last_minute"],
                    f"{d['paused_for']:.1f}s" if d["paused_for"] else "-",
                ]
                for d in shown
            ],
        )
    workers = state["workers"]
    active = sum(1 for w in workers if w.get("status") == "active")
    print(f"\nworkers: {active} active, {len(workers) - active} inactive")
    if workers:
        now = time.time()
        print_table(
            ["worker_id", "status", "pid", "host", "tasks", "last_heartbeat"],
            [
                [
                    w.get("worker_id"),
                    w.get("status"),
                    w.get("pid"),
                    w.get("host"),
                    w.get("tasks_processed"),
                    f"{max(0.0, now - float(w.get('last_heartbeat', now))):.1f}s ago",
                ]
                for w in workers
            ],
        )


async def show_status(args: argparse.Namespace, settings: Settings) -> int:
    async with RedisQueue(settings) as queue:
        if not args.watch:
            state = await snapshot(queue)
            if args.json:
                print_json(state)
            else:
                print_snapshot(state)
        elif args.json:
            await _watch(queue, print_json)
        elif sys.stdout.isatty():
            with _alternate_screen():
                await _watch(queue, draw_view)
        else:
            await _watch(queue, print_view)
    return CliExit.OK


async def _watch(queue: RedisQueue, show: Callable[[dict[str, Any]], None]) -> None:
    """Show a fresh snapshot every WATCH_INTERVAL until SIGINT or SIGTERM."""
    with stop_on_signals() as stop:
        while not stop.is_set():
            show(await snapshot(queue))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), WATCH_INTERVAL)


@contextlib.contextmanager
def _alternate_screen() -> Iterator[None]:
    """Draw on the terminal's alternate screen; give the operator's screen back on exit."""
    sys.stdout.write(watch_view.ENTER)
    try:
        yield
    finally:
        sys.stdout.write(watch_view.LEAVE)
        sys.stdout.flush()


def draw_view(state: dict[str, Any]) -> None:
    """Redraw the terminal with the watch view, sized to the terminal as it is now."""
    size = shutil.get_terminal_size()
    lines = watch_view.render(state, now=time.time(), width=size.columns, height=size.lines)
    sys.stdout.write(watch_view.frame(lines))
    sys.stdout.flush()


def print_view(state: dict[str, Any]) -> None:
    """The watch view as plain 80-column lines and a blank one, for a pipe or a file."""
    print("\n".join(watch_view.render(state, now=time.time())), end="\n\n", flush=True)


def format_event(event: dict[str, Any]) -> str:
    """``<time> <event> key=value ...`` for the human-readable stream."""
    ts = event.get("ts")
    when = format_time(ts) if isinstance(ts, int | float) else "-"
    rest = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("event", "ts"))
    return f"{when} {event.get('event', '?')} {rest}".rstrip()


async def follow_events(args: argparse.Namespace, settings: Settings) -> int:
    async with RedisQueue(settings) as queue:
        history = EventHistory(queue.connection, queue.partitions)
        printer = _EventPrinter(args, EventDomains(queue.connection, queue.partitions))
        if await history.kept():
            await _follow_history(history, printer, args.since)
            return CliExit.OK
        if args.since is not None:
            logger.error("이벤트 기록이 꺼져 있어 --since 를 쓸 수 없음")
            eprint("error: --since needs the event history, which is off ([events] history = 0)")
            return CliExit.USAGE
        await _follow_live(settings, queue, printer)
    return CliExit.OK


class _EventPrinter:
    """Prints the events that pass ``supervisor events``' filters; counts toward ``--count``."""

    def __init__(self, args: argparse.Namespace, domains: EventDomains) -> None:
        self._matches = event_filter(
            task=args.task, worker=args.worker, kinds=frozenset(args.types or ())
        )
        self._domain: str | None = args.domain
        self._domains = domains
        self._json: bool = args.json
        self._left: int | None = args.count

    @property
    def done(self) -> bool:
        return self._left is not None and self._left <= 0

    async def show(self, event: dict[str, Any]) -> None:
        if self.done or not self._matches(event):
            return
        if self._domain is not None and await self._domains.of(event) != self._domain:
            return
        if self._json:
            print_json(event)
        else:
            print(format_event(event), flush=True)
        if self._left is not None:
            self._left -= 1


async def _follow_history(
    history: EventHistory, printer: _EventPrinter, since: float | None
) -> None:
    """Replay from ``since`` seconds ago (else from now), then follow, by cursor."""
    last = await history.start_id(since) if since is not None else await history.last_id()
    outage = False
    with stop_on_signals() as stop:
        while not stop.is_set() and not printer.done:
            try:
                entries = await history.wait_after(last, int(POLL_SECONDS * 1000))
            except (redis_errors.ConnectionError, redis_errors.TimeoutError) as exc:
                if not outage:
                    logger.warning(
                        "이벤트 기록 읽기 실패, 마지막 위치 %s 부터 다시 시도: %s", last, exc
                    )
                    outage = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), RETRY_SECONDS)
                continue
            if outage:
                logger.info("이벤트 기록 읽기 복구: %s 다음부터 이어서 읽음", last)
                outage = False
            for entry_id, events in entries:
                for event in events:
                    await printer.show(event)
                last = entry_id


async def _follow_live(settings: Settings, queue: RedisQueue, printer: _EventPrinter) -> None:
    """Follow the pub/sub channel (no history: what is published while it runs)."""
    feed = EventFeed()
    subscription = open_subscription(
        settings, "이벤트 스트림 구독", feed.on_message, feed.on_outage
    )
    try:
        await subscription.subscribe(queue.keys.events)
        logger.info("이벤트 스트림 구독 시작: %s", queue.keys.events)
        async with ListenerAnnouncement(queue):
            with stop_on_signals() as stop:
                while not stop.is_set() and not printer.done:
                    event = await feed.next(POLL_SECONDS)
                    if event is not None:
                        await printer.show(event)
    finally:
        await subscription.close()


class EventFeed:
    """Events from a subscription, riding out lost connections.

    The subscription resubscribes when the connection comes back; events
    published while it was down are lost (pub/sub keeps no history), and the
    log says when that window opened and closed.
    """

    def __init__(self) -> None:
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._down = False

    def on_outage(self) -> None:
        if not self._down:
            logger.warning("이벤트 구독 연결 끊김, 재연결 시도 중")
            self._down = True

    def on_message(self, message: Message) -> None:
        if message["type"] == "subscribe":
            if self._down:
                logger.info("이벤트 구독 연결 복구")
                self._down = False
            return
        if message["type"] != "message":
            return
        try:
            event = json.loads(message["data"])
        except ValueError:
            logger.warning("해석할 수 없는 이벤트 무시: %r", message["data"])
            return
        if isinstance(event, dict):
            self._events.put_nowait(event)

    async def next(self, timeout: float) -> dict[str, Any] | None:
        """The next event, or None after ``timeout`` seconds without one."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                return await self._events.get()
        return None
