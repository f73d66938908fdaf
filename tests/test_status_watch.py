"""``supervisor status --watch``: the view's layout; the real command on a terminal, a pipe."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import fcntl
import json
import os
import pty
import re
import select
import signal
import socket
import struct
import subprocess
import termios
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_for
from hypothesis import given
from hypothesis import strategies as st
from supervisor_harness import (
    SUPERVISOR,
    Launcher,
    config_file,
    wait_for_workers,
    write_config,
)

from actors.models import ScrapingRequest
from actors.queue import RedisQueue, TaskManager
from actors.telemetry import QueueTelemetry
from config.settings import Settings
from supervisor.watch_view import ELLIPSIS, display_width, elide, render

NOW = 1795886400.0  # a fixed clock for the pure view


def worker(host: str, worker_id: str, pid: int, status: str = "active") -> dict[str, Any]:
    """A worker record as ``status --json`` gives it: vitals are strings, as the hash holds them."""
    return {
        "worker_id": worker_id,
        "status": status,
        "host": host,
        "pid": pid,
        "last_heartbeat": NOW - 0.5,
        "tasks_processed": 530,
        "running": "3",
        "concurrency": "50",
        "rss_bytes": str(120 * 2**20),
        "cpu_percent": "6.5",
    }


def domain(name: str, *, paused_for: float = 0.0, throttled: int = 0) -> dict[str, Any]:
    return {
        "domain": name,
        "in_flight": 2,
        "limit": 2.0,
        "rate": 0.5,
        "learned": 0.5,
        "window": None,
        "throttled_last_minute": throttled,
        "paused_for": paused_for,
    }


def busy_state(
    hosts: tuple[str, ...] = ("node-a", "node-b"), domains: tuple[str, ...] = ("api.example.com",)
) -> dict[str, Any]:
    """A ``status --json`` object of a busy queue: two workers per host, throttled domains."""
    flow = ("started", "completed", "failed", "retried")
    return {
        "queue": {
            "pending": 12,
            "running": 6,
            "retrying": 1,
            "completed": 1042,
            "failed": 7,
            "dead_letter": 7,
            "cancelled": 0,
            "enqueued": 1068,
        },
        "workers": [
            worker(host, f"{host}-1200-worker-{slot}-{slot + 1}", 1201 + slot + 10 * index)
            for index, host in enumerate(hosts)
            for slot in range(2)
        ],
        "backpressure": {"state": "throttled", "depth": 12, "rate": 25.0},
        "paused_keys": {"script:echo": 12.0, **{f"domain:{d}": 30.0 for d in domains}},
        "domains": [domain(d, paused_for=30.0, throttled=4) for d in domains],
        "latency": {
            "queue_wait": {"p50": 0.012, "p95": 0.04, "p99": 0.09},
            "execution": {"p50": 0.25, "p95": 2.5, "p99": 300.0},
        },
        "throughput": {
            **{f"{name}_per_s": 1.25 for name in flow},
            **{f"{name}_per_s_5m": 0.5 for name in flow},
        },
    }


def test_the_view_shows_depths_flow_latency_domains_and_workers_per_host() -> None:
    lines = render(busy_state(), now=NOW)
    text = "\n".join(lines)

    assert all(len(line) <= 80 for line in lines)
    assert "backpressure: throttled (depth 12, 25/s)" in lines[0]
    assert re.search(r"pending 12\s+running 6\s+retrying 1\s+dead letter 7", text)
    assert re.search(r"completed 1042\s+failed 7\s+cancelled 0\s+enqueued 1068", text)
    assert re.search(r"last minute\s+1\.25\s+1\.25\s+1\.25\s+1\.25$", text, re.M)
    assert re.search(r"last 5 min\s+0\.50\s+0\.50\s+0\.50\s+0\.50$", text, re.M)
    assert re.search(r"queue wait\s+12ms\s+40ms\s+90ms$", text, re.M)
    assert re.search(r"execution\s+250ms\s+2\.5s\s+5\.0m$", text, re.M)
    assert re.search(r"api\.example\.com\s+2\s+0\.50\s+2\.00\s+4\s+30s$", text, re.M)
    assert "paused: script:echo 12s" in lines  # domains have their own rows
    assert "workers: 4 active, 0 inactive, on 2 hosts" in lines
    for host in ("node-a", "node-b"):  # added up per host: 2 workers, 3 of 50 tasks each
        assert re.search(rf"^{host}\s+2/2 up\s+6/100\s+1060\s+240M\s+13%$", text, re.M)
    assert re.search(r"^  1200-worker-0-1\s+active\s+1201\s+3/50\s+530\s+120M\s+6\.5%$", text, re.M)


def test_an_inactive_worker_is_listed_but_not_counted_in_its_hosts_load() -> None:
    state = busy_state(hosts=("node-a",))
    state["workers"][1]["status"] = "inactive"

    text = "\n".join(render(state, now=NOW))

    assert re.search(r"^node-a\s+1/2 up\s+3/50\s+1060\s+120M\s+6\.5%$", text, re.M)
    assert re.search(r"^  1200-worker-1-2\s+inactive\s+1202\s", text, re.M)


def test_an_idle_queue_without_workers_or_samples_shows_dashes() -> None:
    state = busy_state(hosts=(), domains=())
    state["paused_keys"] = {}
    state["latency"] = {name: dict.fromkeys(("p50", "p95", "p99")) for name in state["latency"]}

    lines = render(state, now=NOW)

    assert re.search(r"queue wait\s+-\s+-\s+-$", "\n".join(lines), re.M)
    assert "workers: 0 active, 0 inactive, on 0 hosts" in lines
    assert not any(line.startswith("domains:") for line in lines)


def test_long_host_and_domain_names_are_shortened_in_the_middle() -> None:
    host = "worker-17.batch-pool.eu-west-1.compute.internal.example.com"
    site = "a-very-long-subdomain.and-another-one.of-a-site.example.org"

    lines = render(busy_state(hosts=(host,), domains=(site,)), now=NOW)
    (host_row,) = [line for line in lines if "2/2 up" in line]
    (site_row,) = [line for line in lines if "30s" in line]

    assert host_row.startswith("worker-17.")
    assert host_row.split()[0].endswith(".com")  # shortened in the middle: both ends show
    assert ELLIPSIS in host_row
    assert site_row.split()[0].endswith("example.org")
    assert all(len(line) <= 80 for line in lines)


def test_a_short_terminal_shows_the_top_and_says_how_much_is_cut() -> None:
    lines = render(busy_state(), now=NOW, height=10)

    assert len(lines) == 10
    assert lines[0].startswith("scrapeq status")
    assert re.fullmatch(rf"{ELLIPSIS} \d+ more lines: .*", lines[-1])


def test_control_characters_in_names_never_reach_the_terminal() -> None:
    state = busy_state(hosts=("evil\x1b[2Jhost",), domains=("x\x1b]0;pwned\x07.test",))

    text = "\n".join(render(state, now=NOW))

    assert "\x1b" not in text
    assert "\x07" not in text


names = st.text(min_size=0, max_size=120)


@given(
    width=st.integers(min_value=1, max_value=200),
    height=st.none() | st.integers(min_value=1, max_value=60),
    hosts=st.lists(names, max_size=3),
    domains=st.lists(names, max_size=3),
)
def test_no_line_is_ever_wider_than_the_terminal(
    width: int, height: int | None, hosts: list[str], domains: list[str]
) -> None:
    lines = render(busy_state(tuple(hosts), tuple(domains)), now=NOW, width=width, height=height)

    assert all(display_width(line) <= width for line in lines)
    assert height is None or len(lines) <= height


@given(name=names, width=st.integers(min_value=1, max_value=80))
def test_an_elided_name_fits_its_column(name: str, width: int) -> None:
    shown = elide(name, width)

    assert display_width(shown) <= width
    assert shown == name or shown.count(ELLIPSIS) >= 1


# -- the real command ------------------------------------------------------------------

_TOKEN = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])|\x1b.|\r|\n|[^\x1b\r\n]", re.S)


class Screen:
    """Just enough of a VT100 to read what ``status --watch`` draws.

    Text, carriage return and line feed (scrolling at the bottom), cursor
    position (CSI H), erase in line and display (CSI K, J, 2J) and the
    alternate screen (CSI ?1049h/l). Text written past the last column is
    kept in ``overflow`` instead of wrapping, so a line too wide shows up.
    """

    def __init__(self, columns: int, rows: int) -> None:
        self.columns, self.rows = columns, rows
        self.cells = self._blank()
        self.main: list[list[str]] | None = None  # the normal screen, while the alternate shows
        self.row = self.col = 0
        self.overflow = ""
        self.scrolled = 0

    @property
    def alternate(self) -> bool:
        return self.main is not None

    def lines(self) -> list[str]:
        return ["".join(row).rstrip() for row in self.cells]

    def feed(self, text: str) -> None:
        for match in _TOKEN.finditer(text):
            token, params, command = match.group(0), match.group(1), match.group(2)
            if command:
                self._control(params, command)
            elif token == "\r":
                self.col = 0
            elif token == "\n":
                self._line_feed()
            elif not token.startswith("\x1b"):
                self._put(token)

    def _blank(self) -> list[list[str]]:
        return [[" "] * self.columns for _ in range(self.rows)]

    def _put(self, char: str) -> None:
        if self.col >= self.columns:
            self.overflow += char
            return
        self.cells[self.row][self.col] = char
        self.col += 1

    def _line_feed(self) -> None:
        if self.row < self.rows - 1:
            self.row += 1
            return
        self.cells = [*self.cells[1:], [" "] * self.columns]
        self.scrolled += 1

    def _control(self, params: str, command: str) -> None:
        if params == "?1049" and command == "h":
            self.main, self.cells = self.cells, self._blank()
        elif params == "?1049" and command == "l" and self.main is not None:
            self.cells, self.main = self.main, None
        elif command == "H":
            row, _, col = params.partition(";")
            self.row, self.col = int(row or 1) - 1, int(col or 1) - 1
        elif command == "K":
            self.cells[self.row][self.col :] = [" "] * (self.columns - self.col)
        elif command == "J" and params == "2":
            self.cells = self._blank()
        elif command == "J":
            self.cells[self.row][self.col :] = [" "] * (self.columns - self.col)
            self.cells[self.row + 1 :] = self._blank()[self.row + 1 :]


class Terminal:
    """A command running on a pseudo-terminal of a given size; what it writes feeds a Screen."""

    def __init__(self, argv: list[str], columns: int, rows: int, stderr: Path) -> None:
        self.fd, child = pty.openpty()
        fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        with stderr.open("wb") as log:
            self.process = subprocess.Popen(argv, stdin=child, stdout=child, stderr=log)
        os.close(child)
        self.screen = Screen(columns, rows)
        self._decoder = codecs.getincrementaldecoder("utf-8")()

    def read(self, seconds: float) -> None:
        """Feed the screen what the command writes within ``seconds`` (less once it exits)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([self.fd], [], [], left)[0]:
                return
            try:
                data = os.read(self.fd, 65536)
            except OSError:  # EIO: every copy of the other side is closed
                return
            if not data:
                return
            self.screen.feed(self._decoder.decode(data))

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.fd)


@contextlib.contextmanager
def terminal(argv: list[str], columns: int, rows: int, stderr: Path) -> Iterator[Terminal]:
    term = Terminal(argv, columns, rows, stderr)
    try:
        yield term
    finally:
        term.close()


def watch_command(config: Path, *options: str) -> list[str]:
    return [str(SUPERVISOR), "--config", str(config), "status", "--watch", *options]


def row_of(lines: list[str], label: str) -> list[str]:
    """The cells of the line that starts with ``label`` (after indentation)."""
    (line,) = [line for line in lines if line.strip().startswith(label)]
    return line.strip().removeprefix(label).split()


@pytest.mark.timeout(120)
async def test_watch_on_an_80x40_terminal_shows_the_workload_and_refreshes_every_second(
    settings: Settings, queue: RedisQueue, launch: Launcher, tmp_path: Path
) -> None:
    config = config_file(tmp_path, settings, 2)
    supervisor = launch(config)
    pids = await wait_for_workers(queue, supervisor, 2)
    echo = [ScrapingRequest(script_name="echo") for _ in range(30)]
    fail = [ScrapingRequest(script_name="fail", max_retries=0) for _ in range(3)]
    await queue.enqueue_many([*echo, *fail])
    telemetry = QueueTelemetry(queue.connection, queue.keys)

    async def recorded() -> bool:  # workers add their counts up about once a second
        stats = await TaskManager(queue).queue_stats()
        totals = await telemetry.totals()
        echoed, failed = totals.get("echo"), totals.get("fail")
        return (
            stats["running"] == 0
            and echoed is not None
            and echoed.outcomes["completed"] == 30
            and failed is not None
            and failed.outcomes["failed"] == 3
        )

    await wait_for(recorded, timeout=30, interval=0.1)
    stderr = tmp_path / "watch.log"
    with terminal(watch_command(config), 80, 40, stderr) as term:

        async def shown() -> bool:
            assert term.process.poll() is None, stderr.read_text()
            await asyncio.to_thread(term.read, 0.1)
            return any("workers: 2 active" in line for line in term.screen.lines())

        await wait_for(shown, timeout=20)
        first = term.screen.lines()

        async def refreshed() -> bool:  # the clock in the first line moved on
            await asyncio.to_thread(term.read, 0.1)
            return term.screen.lines()[0] != first[0]

        await wait_for(refreshed, timeout=5)
        await asyncio.to_thread(term.read, 0.3)
        lines = term.screen.lines()
        assert term.screen.alternate
        term.process.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(term.process.wait, 10) == 0, stderr.read_text()
        await asyncio.to_thread(term.read, 1.0)
        assert not term.screen.alternate  # the operator's screen is given back
    supervisor.send(signal.SIGTERM)
    assert await supervisor.exit_code(15) == 0, supervisor.output()

    assert term.screen.overflow == ""  # no line went past column 80
    assert term.screen.scrolled == 0  # the frame fit 40 rows: drawn in place
    text = "\n".join(lines)
    assert re.search(r"completed 30\s+failed 3\s+cancelled 0\s+enqueued 33", text)
    assert re.search(r"pending 0\s+running 0\s+retrying 0\s+dead letter 3", text)
    started, completed, failed, _ = (float(cell) for cell in row_of(lines, "last minute"))
    assert completed == pytest.approx(30 / 60, abs=0.05)
    assert failed == pytest.approx(3 / 60, abs=0.02)
    assert started == pytest.approx(33 / 60, abs=0.05)
    for label in ("queue wait", "execution"):
        percentiles = row_of(lines, label)
        assert len(percentiles) == 3
        assert all(re.fullmatch(r"[\d.]+(ms|s|m)", value) for value in percentiles), percentiles
    host = socket.gethostname()[:10]  # a long host name is elided after its start
    assert re.search(rf"^{re.escape(host)}\S*\s+2/2 up\s", text, re.M), text
    for pid in pids:
        assert re.search(rf"^  \S+\s+active\s+{pid}\s+0/50\s", text, re.M), text


@pytest.fixture
async def waiting_tasks(settings: Settings, queue: RedisQueue, tmp_path: Path) -> Path:
    """Three echo tasks nobody runs; the config file that reaches them."""
    await queue.enqueue_many([ScrapingRequest(script_name="echo") for _ in range(3)])
    return write_config(tmp_path / "scrapeq.toml", settings)


@contextlib.asynccontextmanager
async def piped_watch(config: Path, *options: str) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await asyncio.create_subprocess_exec(
        *watch_command(config, *options),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.communicate()


async def watched_for(process: asyncio.subprocess.Process, seconds: float) -> str:
    """Everything the command prints from its first line until SIGINT ``seconds`` later."""
    assert process.stdout is not None
    first = await asyncio.wait_for(process.stdout.readline(), 20)
    await asyncio.sleep(seconds)
    process.send_signal(signal.SIGINT)
    rest, errors = await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == 0, errors.decode()
    return (first + rest).decode()


async def test_watch_into_a_pipe_prints_plain_frames_without_escape_codes(
    waiting_tasks: Path,
) -> None:
    async with piped_watch(waiting_tasks) as process:
        out = await watched_for(process, 1.5)

    frames = re.split(r"\n(?=scrapeq status )", out)
    assert "\x1b" not in out
    assert len(frames) >= 2  # one a second
    assert all(display_width(line) <= 80 for line in out.splitlines())
    for frame in frames:
        assert frame.startswith("scrapeq status ")
        assert re.search(r"pending 3\s+running 0", frame)


async def test_watch_json_into_a_pipe_prints_one_object_per_line(waiting_tasks: Path) -> None:
    async with piped_watch(waiting_tasks, "--json") as process:
        out = await watched_for(process, 1.5)

    states = [json.loads(line) for line in out.splitlines()]
    assert len(states) >= 2
    assert all(state["queue"]["pending"] == 3 for state in states)
