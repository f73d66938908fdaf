"""Run the full fault suite and write docs/reliability.md from what it measured.

Usage (from the repository root)::

    uv run python tests/faults/run_report.py                  # 20 repeats, 30-minute soak
    uv run python tests/faults/run_report.py --repeats 3 --soak-minutes 2
    uv run python -m tests.faults.run_report --repeats 3 --soak-minutes 2

It runs ``pytest tests/faults -m "slow or soak"`` (every fault repeated at seeded
random moments, then the soak), then the default suite (every fault once, in
short form, and the faults that only run there). Each fault
run appends one JSON line of figures to the file named by ``FIGURES_ENV``
(written by ``faults.workload.record_figures``); this script reduces them to the
worst and median value per fault and writes the report with the exact command.
Stdlib only, so it runs as a script or a module without the test path set up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: File that receives one JSON line of figures per fault run.
FIGURES_ENV = "FAULT_SUITE_FIGURES"
#: How often each ``slow`` fault test repeats.
REPEATS_ENV = "FAULT_SUITE_REPEATS"
#: Length of the soak test in minutes.
SOAK_MINUTES_ENV = "FAULT_SUITE_SOAK_MINUTES"

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUTPUT = REPO_ROOT / "docs" / "reliability.md"

#: Figures every run reports, in table order: (key, heading, how to reduce).
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("acknowledged", "acked", "median"),
    ("refused", "refused", "worst"),
    ("lost", "lost", "worst"),
    ("dup_complete", "double completions", "worst"),
    ("dup_exec", "re-executions", "both"),
    ("recovery_s", "recovery s", "both"),
    ("restarts", "restarts", "both"),
    ("actor_restarts", "actor restarts", "both"),
    ("peak_connections", "peak Redis clients", "worst"),
    ("worker_rss_mb", "worker RSS MB", "both"),
)
#: Bookkeeping keys that are not figures.
IGNORED = frozenset(
    {"fault", "repeat", "test", "t", "executions", "dup_side_effect", "extra_commits", "event_gaps"}
)


#: What the suite has shown so far, fixed or not: part of every report.
FINDINGS: tuple[str, ...] = (
    "Fixed since the suite first ran:",
    "",
    "* A task record whose `attempt` field was not an integer aborted `claim.lua` after",
    "  its `ZPOPMIN`; Redis does not roll a script back, so the tasks popped with it were",
    "  lost, and the script error killed the worker. Scripts now check a record before",
    "  their first write and dead-letter it (`invalid task record`).",
    "* At `maxmemory`, the OOM reply (a `BackpressureException`) ended a worker's",
    "  heartbeat loop for good: its leases lapsed and its tasks ran again and again.",
    "  Every actor loop now backs off on any queue error.",
    "* Under uvloop, a write on a connection the peer reset raised `RuntimeError`",
    "  (MagicStack/uvloop#506), which redis-py neither retried nor reported as a lost",
    "  connection: actors crashed and the supervisor's health loop ended the whole tree.",
    "  It is now a `ConnectionError`; a reset loop also opened 60+ connections a second,",
    "  so client retries went from 4 to 2 and loops back off from 0.1 s.",
    "* After a network cut longer than `heartbeat.timeout` (N1, N3), the supervisor's",
    "  first health check saw every worker's heartbeat overdue, because none could get",
    "  through, and SIGKILLed them: one restart per worker per cut, counted toward",
    "  `max_restarts` (back-to-back cuts made a tree give up). A first fix (judge beats",
    "  once Redis had been reachable for one `heartbeat.timeout`) still let some cuts",
    "  kill a worker: its loops back off up to 5 s, and a health check held by a",
    "  blackhole read the stale beats and killed in that same check. The supervisor",
    "  now waits `heartbeat.timeout` plus the 5 s backoff cap after an outage, and a",
    "  check whose reads took longer than `heartbeat.interval` counts as one. The",
    "  network tests assert no restart at all.",
    "* After a Redis outage of 5 minutes (R12), the reaper's first pass forgot every",
    "  live worker (silent for longer than the 5 minutes after which a gone worker's",
    "  record is dropped) and requeued every lease (past its deadline on the Redis",
    "  clock), and the heartbeat actor marked every worker lost: live workers lost",
    '  their records (pid, registration; a test saw "a worker process died") and',
    "  their running tasks ran again. The heartbeat actor and the reaper now hold",
    "  those judgements after an outage they saw, by the supervisor's rule above;",
    "  a worker back within its backoff cap renews its leases and keeps its tasks.",
)


@dataclass
class Outcomes:
    """Test results read from pytest's JUnit XML."""

    counts: Counter[str] = field(default_factory=Counter)
    by_test: dict[str, str] = field(default_factory=dict)
    """``module::name[params]`` -> passed, failed, xfailed or skipped."""
    known_bugs: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    """xfail reason -> the tests (without parameters) that show it."""

    def read(self, path: Path) -> None:
        if not path.exists():
            return
        for case in ET.parse(path).iter("testcase"):
            module = case.get("classname", "").rsplit(".", 1)[-1]
            name = case.get("name", "")
            skipped = case.find("skipped")
            if case.find("failure") is not None or case.find("error") is not None:
                outcome = "failed"
            elif skipped is not None and skipped.get("type") == "pytest.xfail":
                outcome = "xfailed"
                self.known_bugs[skipped.get("message", "")].add(name.split("[", 1)[0])
            elif skipped is not None:
                outcome = "skipped"
            else:
                outcome = "passed"
            self.counts[outcome] += 1
            self.by_test[f"{module}::{name}"] = outcome

    def of(self, nodeid: str) -> str:
        """The outcome of a test given as pytest's node id (``path/module.py::name``)."""
        path, _, name = nodeid.partition("::")
        return self.by_test.get(f"{Path(path).stem}::{name}", "unknown")


def reduce(values: Sequence[float], how: str) -> str:
    """``worst`` (the maximum), ``median``, or ``both`` as "median / worst"."""
    if not values:
        return "–"
    worst, median = max(values), statistics.median(values)
    if how == "worst":
        return _number(worst)
    if how == "median":
        return _number(median)
    return f"{_number(median)} / {_number(worst)}"


def _number(value: float) -> str:
    return f"{value:g}" if float(value).is_integer() else f"{value:.2f}"


def read_figures(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Figures per fault, in the order the faults first ran."""
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            runs[record["fault"]].append(record)
    return dict(runs)


def numbers(runs: Iterable[dict[str, Any]], key: str) -> list[float]:
    return [float(run[key]) for run in runs if isinstance(run.get(key), int | float)]


def figures_table(figures: dict[str, list[dict[str, Any]]], outcomes: Outcomes) -> list[str]:
    headings = ["fault", "runs", *(heading for _, heading, _ in COLUMNS), "more (worst)"]
    lines = ["| " + " | ".join(headings) + " |", "|" + "---|" * len(headings)]
    shown = {key for key, _, _ in COLUMNS} | IGNORED
    for fault, runs in figures.items():
        verdicts = Counter(outcomes.of(str(run.get("test", ""))) for run in runs)
        flagged = ", ".join(f"{n} {v}" for v, n in sorted(verdicts.items()) if v != "passed")
        cells = [f"{fault} (**{flagged}**)" if flagged else fault, str(len(runs))]
        cells += [reduce(numbers(runs, key), how) for key, _, how in COLUMNS]
        extra = sorted({key for run in runs for key in run} - shown)
        more = [f"{key} {reduce(numbers(runs, key), 'worst')}" for key in extra]
        cells.append(", ".join(more) or "–")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def run_pytest(arguments: Sequence[str], env: dict[str, str]) -> int:
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *arguments]
    print("$", shlex.join(command), flush=True)
    return subprocess.run(command, cwd=REPO_ROOT, env=env, check=False).returncode


def machine() -> str:
    redis = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, check=False
    ).stdout.split()
    version = next((part.split("=", 1)[1] for part in redis if part.startswith("v=")), "?")
    return (
        f"{os.cpu_count()} CPU(s), Python {platform.python_version()}, "
        f"redis-server {version}, {platform.system()} {platform.release()}"
    )


def revision() -> str:
    """The commit the suite ran on (``-dirty`` with uncommitted changes)."""
    described = subprocess.run(
        ["git", "describe", "--always", "--dirty"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    return described.stdout.strip() or "unknown"


def render(
    *,
    command: str,
    repeats: int,
    soak_minutes: float,
    elapsed: float,
    figures: dict[str, list[dict[str, Any]]],
    outcomes: Outcomes,
) -> str:
    full = repeats >= 20 and soak_minutes >= 30
    scope = (
        "the full suite"
        if full
        else f"a reduced run: {repeats} repeat(s) and a {soak_minutes:g}-minute soak "
        "instead of the full 20 repeats and 30 minutes"
    )
    counts = outcomes.counts
    status = ", ".join(f"{counts[k]} {k}" for k in ("passed", "failed", "xfailed") if counts[k])
    lines = [
        "# Reliability: fault injection results",
        "",
        "Generated by `tests/faults/run_report.py`; do not edit by hand, run it again.",
        "",
        f"**This table comes from {scope}.** Command:",
        "",
        "```sh",
        command,
        "```",
        "",
        f"Run on {time.strftime('%Y-%m-%d')} at commit `{revision()}`, {machine()}, "
        f"in {elapsed / 60:.1f} minutes. "
        f"Tests: {status}.",
        "",
        "The full run (each fault 20 times at seeded random moments, a 30-minute soak; "
        "about 80 minutes on two cores):",
        "",
        "```sh",
        "uv run python tests/faults/run_report.py --repeats 20 --soak-minutes 30",
        "```",
        "",
        "The default `pytest` runs every fault once, in short form",
        "(`tests/faults/test_fault_*.py`, `tests/faults/test_bad_input.py`);",
        "`pytest -m slow` runs the repeats and `pytest -m soak` the soak",
        "(`FAULT_SUITE_REPEATS` and `FAULT_SUITE_SOAK_MINUTES` set their size).",
        "",
        "## What every run checks",
        "",
        "Every step of the workload is written to a ledger file outside Redis (see",
        "`tests/faults/README.md`). After the fault heals, each run fails unless:",
        "",
        "* **lost = 0**: every acknowledged enqueue ends completed, failed (dead-lettered)",
        "  or cancelled;",
        "* **double completions = 0**: no task's completion is committed twice, counted",
        "  from the `task.completed` events and, independently, from Redis's commit counter;",
        "* the fault-specific outcome holds (named in each test).",
        "",
        "## Figures per fault",
        "",
        "Median / worst over the runs; one value: the worst (acked: the median). The runs",
        "of a fault are its repeats plus its one run in the default suite. A fault marked",
        "**xfailed** or **failed** includes runs of tests that did not pass: see the bugs below.",
        "",
        *figures_table(figures, outcomes),
        "",
        "* **re-executions**: extra starts of a task (at-least-once delivery after a lease",
        "  was lost); allowed, and bounded by the tasks in flight at the fault.",
        "* **recovery s**: seconds from the fault (from the heal, for outages) to the first",
        "  completion of a task that was in flight. W5: from a blocked task's first start to",
        "  its redelivery. S1: includes starting the new supervisor.",
        "* **restarts**: worker processes registered during the run beyond the first ones.",
        "* **actor restarts**: `worker.restarted` events, which a supervisor publishes for"
        " every restart of any actor kind (workers, heartbeat, reaper, governor); 0 where the"
        " fault ran on actors without a supervisor.",
        "* **peak Redis clients**: `connected_clients`, sampled every 0.2 s (includes the",
        "  test's own observers).",
        "* **more**: fault-specific figures, e.g. `outage_s` (Redis down), `stalled_s`,",
        "  `cut_s` (network cut), `log_lines` and `reconnects` during a network fault,",
        "  `detection_s` (data loss reported), `drain_s` (SIGTERM to exit), `orphans`,",
        "  `seconds_to_dead_letter`, `peak_rss_mb`, `retry_delay_max_s`, and the soak's",
        "  `rss_*_mb`, `fds_*`, `clients_*` (plateau after warm-up vs. the final third).",
        "",
        "## What the suite found",
        "",
        *FINDINGS,
        "",
        "## Known bugs (tests marked `xfail(strict=True)`)",
        "",
    ]
    for reason, tests in outcomes.known_bugs.items():
        lines.append(f"* {reason} ({', '.join(f'`{test}`' for test in sorted(tests))})")
    if not outcomes.known_bugs:
        lines.append("None.")
    failed = [test for test, outcome in outcomes.by_test.items() if outcome == "failed"]
    if failed:
        lines += ["", "## Failed tests", "", *(f"* `{test}`" for test in failed)]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--repeats", type=int, default=20, help="runs of each fault (20)")
    parser.add_argument("--soak-minutes", type=float, default=30.0, help="soak length (30)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="report file")
    args = parser.parse_args(argv)
    invoked = ["uv", "run", "python", "tests/faults/run_report.py"]
    invoked += ["--repeats", str(args.repeats), "--soak-minutes", f"{args.soak_minutes:g}"]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fault-report-") as scratch:
        work = Path(scratch)
        env = {
            **os.environ,
            FIGURES_ENV: str(work / "figures.jsonl"),
            REPEATS_ENV: str(args.repeats),
            SOAK_MINUTES_ENV: f"{args.soak_minutes:g}",
        }
        codes = [
            run_pytest(
                ["tests/faults", "-m", "slow or soak", f"--junitxml={work / 'faults.xml'}"], env
            ),
            # The default suite too: one more run of each fault, and the faults run only there.
            run_pytest(["tests/faults", f"--junitxml={work / 'short.xml'}"], env),
        ]
        outcomes = Outcomes()
        outcomes.read(work / "faults.xml")
        outcomes.read(work / "short.xml")
        report = render(
            command=shlex.join(invoked),
            repeats=args.repeats,
            soak_minutes=args.soak_minutes,
            elapsed=time.monotonic() - started,
            figures=read_figures(work / "figures.jsonl"),
            outcomes=outcomes,
        )
    args.output.write_text(report, encoding="utf-8")
    print(f"wrote {args.output}")
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
