"""``supervisor status`` and ``supervisor events``: the queue now, and as it changes."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import time
from typing import Any

from actors.connection import open_subscription
from actors.exit_codes import CliExit
from actors.queue import RedisQueue, TaskManager, WorkerMonitor
from actors.subscription import Message
from config.settings import Settings
from supervisor.cli_common import (
    Subcommands,
    backpressure_view,
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
_CLEAR_SCREEN = "\x1b[H\x1b[2J"


def register(commands: Subcommands, common: argparse.ArgumentParser) -> None:
    status = commands.add_parser(
        "status",
        parents=[common],
        help="show queue depths, workers and backpressure",
        description="Show queue depths and totals, every known worker and the backpressure "
        "state. --json prints one object with 'queue', 'workers', 'backpressure', "
        "'paused_keys' and 'domains'.",
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
        help="follow the live event stream",
        description="Print one line per queue event (task.enqueued, task.started, "
        "task.completed, worker.lost, ...) until Ctrl-C or SIGTERM, then exit 0.",
    )
    events.add_argument("--json", action="store_true", help="print each event as its JSON object")
    events.add_argument("--count", type=positive_int, metavar="N", help="exit 0 after N events")
    events.set_defaults(handler=follow_events)


async def snapshot(queue: RedisQueue) -> dict[str, Any]:
    """The ``status --json`` object."""
    manager = TaskManager(queue)
    stats = await manager.queue_stats()
    paused = await manager.paused_keys()
    domains = await manager.domains()
    workers = await WorkerMonitor(queue).get_active_workers()
    fields = await manager.backpressure_fields()
    for worker in workers:
        worker.setdefault("pid", None)
        worker.setdefault("host", None)
    return {
        "queue": stats,
        "workers": workers,
        "backpressure": backpressure_view(fields, stats["pending"]),
        "paused_keys": paused,
        "domains": domains,
    }


#: Domains the text view lists (``--json`` has them all).
DOMAINS_SHOWN = 20


def _rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.3g}"


def print_snapshot(state: dict[str, Any]) -> None:
    queue, backpressure = state["queue"], state["backpressure"]
    print_table(list(queue), [list(queue.values())])
    rate = f", rate {backpressure['rate']}/s" if "rate" in backpressure else ""
    print(f"\nbackpressure: {backpressure['state']} (depth {backpressure['depth']}{rate})")
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
            return CliExit.OK
        with stop_on_signals() as stop:
            clear = not args.json and sys.stdout.isatty()
            while not stop.is_set():
                state = await snapshot(queue)
                if args.json:
                    print_json(state)
                else:
                    print(_CLEAR_SCREEN if clear else "", end="")
                    print_snapshot(state)
                    print(flush=True)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), WATCH_INTERVAL)
    return CliExit.OK


def format_event(event: dict[str, Any]) -> str:
    """``<time> <event> key=value ...`` for the human-readable stream."""
    ts = event.get("ts")
    when = format_time(ts) if isinstance(ts, int | float) else "-"
    rest = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("event", "ts"))
    return f"{when} {event.get('event', '?')} {rest}".rstrip()


async def follow_events(args: argparse.Namespace, settings: Settings) -> int:
    async with RedisQueue(settings) as queue:
        feed = EventFeed()
        subscription = open_subscription(
            settings, "이벤트 스트림 구독", feed.on_message, feed.on_outage
        )
        try:
            await subscription.subscribe(queue.keys.events)
            logger.info("이벤트 스트림 구독 시작: %s", queue.keys.events)
            with stop_on_signals() as stop:
                seen = 0
                while not stop.is_set() and (args.count is None or seen < args.count):
                    event = await feed.next(POLL_SECONDS)
                    if event is None:
                        continue
                    if args.json:
                        print_json(event)
                    else:
                        print(format_event(event), flush=True)
                    seen += 1
        finally:
            await subscription.close()
    return CliExit.OK


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
