"""Redis instructions per dispatched task, counted by valgrind: what the box's noise cannot move.

Run ``python -m bench.instructions`` (``--tasks``, ``--setups``); it needs
``valgrind`` on PATH. For each set-up of bench/ratelimit_overhead.py (default:
``breaker``, politeness off, and ``polite``, politeness on over 100 domains
that never reach their cap), it starts a redis-server under
``valgrind --tool=callgrind`` with counting off, enqueues ``--tasks`` tasks,
turns counting on for the dispatch alone (two claim loops claiming 64 at a
time and completing what they claimed, as a worker does), and prints the
instructions Redis executed per task and each set-up's ratio to the first.

Instruction counts repeat to within about 1% run to run, where wall-clock and
CPU time on a shared box move by half: use this to tell what a change to the
scripts costs, and bench/run.py for what a system achieves. Valgrind runs the
server about 50 times slower, so 20,000 tasks take about a minute a set-up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from bench.ratelimit_overhead import SETUPS, measure
from supervisor.redis_server import find_redis_server

#: How long a redis-server under valgrind may take to answer its first PING.
START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def count(setup: str, tasks: int, folder: Path) -> int:
    """Instructions redis-server executed while ``setup`` dispatched ``tasks`` tasks."""
    port = free_port()
    out = folder / f"callgrind.{setup}"
    server = subprocess.Popen(
        [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out}",
            str(find_redis_server()),
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(folder),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        admin = redis.Redis(port=port)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                admin.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("redis-server under valgrind did not start") from None
                time.sleep(0.2)

        def watch(on: bool) -> None:
            subprocess.run(
                ["callgrind_control", "-i", "on" if on else "off", str(server.pid)],
                check=True,
                capture_output=True,
            )

        asyncio.run(measure(f"redis://127.0.0.1:{port}/0", setup, tasks, 2, watch))
        with contextlib.suppress(redis.ConnectionError):  # SHUTDOWN closes its connection
            admin.shutdown(nosave=True)
    except BaseException:
        server.kill()
        raise
    finally:
        server.wait(timeout=60)  # valgrind writes its counts as the server exits
    totals = re.search(r"^totals: (\d+)", out.read_text(), re.MULTILINE)
    if totals is None:
        raise RuntimeError(f"{out}: no totals line")
    return int(totals.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tasks", type=int, default=20_000, help="tasks per set-up")
    parser.add_argument(
        "--setups",
        default="breaker,polite",
        help=f"comma-separated, the first is the baseline (of: {', '.join(SETUPS)})",
    )
    args = parser.parse_args()
    setups = args.setups.split(",")
    if not shutil.which("valgrind"):
        raise SystemExit("bench.instructions: valgrind is not on PATH")
    per_task: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="scrapeq-instructions-") as folder:
        for setup in setups:
            per_task[setup] = count(setup, args.tasks, Path(folder)) / args.tasks
            print(f"{setup:>8}: {per_task[setup]:,.0f} Redis instructions per task", flush=True)
    baseline = per_task[setups[0]]
    print(f"\n{'set-up':>8} | {'instructions/task':>17} | × {setups[0]}")
    for setup in setups:
        print(f"{setup:>8} | {per_task[setup]:>17,.0f} | {per_task[setup] / baseline:.2f}")


if __name__ == "__main__":
    main()
