"""The Redis Cluster connection (actors/cluster.py) against a real three-master cluster.

Each command must reach the master of its key's slot, follow the cluster
when a slot moves (MOVED, ASK) without losing or doubling a write, and fail
with the single-server connection's errors, after bounded retries, only for
the slots of a master that stopped answering.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from cluster_topology import (
    PASSWORD,
    ClusterTopology,
    cluster_support_missing,
    started_cluster,
)

from actors import redis_errors
from actors.cluster import (
    ClusterConfigError,
    ClusterConnection,
    key_slot,
    node_endpoint,
    routing_key,
)
from actors.connection import open_calls, translated_errors
from actors.endpoint import RedisEndpoint
from actors.exceptions import QueueConnectionException
from config.settings import ConfigError, Settings
from supervisor.redis_server import RedisServer

SCRIPT = "redis.call('SET', KEYS[1], ARGV[1]) return redis.call('GET', KEYS[1])"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterTopology]:
    reason = cluster_support_missing()
    if reason is not None:
        pytest.skip(reason)
    with started_cluster(tmp_path_factory.mktemp("cluster")) as topology:
        yield topology


@pytest.fixture
async def connection(cluster: ClusterTopology) -> AsyncIterator[ClusterConnection]:
    conn = ClusterConnection(RedisEndpoint.parse(cluster.url), retries=2)
    yield conn
    await conn.close()


def address(server: RedisServer) -> tuple[str, int]:
    return (server.host, server.port)


def tags_on(cluster: ClusterTopology, server: RedisServer, prefix: str, count: int) -> list[str]:
    """``count`` hash tags (starting with ``prefix``) whose slot ``server`` serves."""
    found: list[str] = []
    for index in range(100_000):
        tag = f"{prefix}-{index}"
        if cluster.owner(f"{{{tag}}}") is server:
            found.append(tag)
            if len(found) == count:
                return found
    raise AssertionError(f"no {count} tags on {server.port}")


def tricky_keys() -> list[bytes]:
    """Plain keys, hash tags, empty tags, several braces, and random bytes full of braces."""
    fixed = [
        b"",
        b"plain",
        b"scraping:{default}:pending",
        b"{user1000}.following",
        b"{}",
        b"{}{a}",
        b"a{}b",
        b"{{a}}",
        b"a{b}{c}",
        b"a}b{c}",
        b"a{b",
        b"}{",
        b"{",
        b"}",
        "caf\u00e9:{\u00fcber}".encode(),
        b"\xff\x00{\x80}",
        b"123456789",
    ]
    rng = random.Random(15)
    alphabet = b"ab{}:\x00\xff"
    sizes = [rng.randrange(1, 12) for _ in range(200)]
    return fixed + [bytes(rng.choice(alphabet) for _ in range(size)) for size in sizes]


def test_crc16_is_the_specifications_crc16_xmodem() -> None:
    assert key_slot(b"123456789") == 0x31C3  # the specification's check value


def test_key_slot_matches_cluster_keyslot_of_a_real_node(cluster: ClusterTopology) -> None:
    keys = tricky_keys()
    with cluster.client(cluster.masters[0]) as client:
        expected = [int(client.execute_command("CLUSTER", "KEYSLOT", key)) for key in keys]

    assert [key_slot(key) for key in keys] == expected


@pytest.mark.parametrize(
    ("command", "key"),
    [
        (("GET", "k"), "k"),
        (("EVALSHA", "sha", 2, "k1", "k2", "a"), "k1"),
        (("EVALSHA", "sha", 0, "a"), None),
        (("XREAD", "COUNT", 10, "BLOCK", 5, "STREAMS", "s", "0-0"), "s"),
        (("OBJECT", "ENCODING", "k"), "k"),
        (("PING",), None),
        (("TIME",), None),
        (("SCRIPT", "LOAD", "return 1"), None),
        (("CONFIG", "GET", "maxmemory-policy"), None),
        (("PUBLISH", "channel", "m"), None),
    ],
)
def test_each_command_is_routed_by_the_key_it_names(
    command: tuple[object, ...], key: str | None
) -> None:
    assert routing_key(command) == key


async def test_commands_reach_the_master_that_serves_each_slot(
    cluster: ClusterTopology, connection: ClusterConnection, key_prefix: str
) -> None:
    keys = [f"{{{key_prefix}-{i % 60}}}:k{i}" for i in range(270)]
    keys += [f"{key_prefix}:plain{i}" for i in range(30)]
    await asyncio.gather(*(connection.execute("SET", key, f"v-{key}") for key in keys))

    through_cluster = await connection.execute_many(*(("GET", key) for key in keys))
    owners = {key: cluster.owner(key) for key in keys}
    direct = []
    for key in keys:
        with cluster.client(owners[key]) as client:
            direct.append(client.get(key))

    assert through_cluster == [f"v-{key}".encode() for key in keys]
    assert direct == through_cluster
    assert {owner.port for owner in owners.values()} == {s.port for s in cluster.masters}
    assert all(connection.node_of(key) == address(owners[key]) for key in keys)


async def test_execute_many_over_several_nodes_answers_in_the_callers_order(
    cluster: ClusterTopology, connection: ClusterConnection, key_prefix: str
) -> None:
    a, b, c = (tags_on(cluster, server, key_prefix, 1)[0] for server in cluster.masters)
    replies = await connection.execute_many(
        ("SET", f"{{{a}}}:s", "one"),
        ("INCRBY", f"{{{b}}}:n", 5),
        ("RPUSH", f"{{{c}}}:l", "x", "y"),
        ("GET", f"{{{a}}}:s"),
        ("INCRBY", f"{{{b}}}:n", 2),
        ("LRANGE", f"{{{c}}}:l", 0, -1),
        ("GET", f"{{{c}}}:missing"),
        ("PING",),
    )

    assert replies == [b"OK", 5, 2, b"one", 7, [b"x", b"y"], None, b"PONG"]


async def test_evalsha_runs_on_the_slots_master_and_loads_the_script_only_there(
    cluster: ClusterTopology, connection: ClusterConnection, key_prefix: str
) -> None:
    sha = hashlib.sha1(SCRIPT.encode()).hexdigest()
    first, *others = cluster.masters
    key = f"{{{tags_on(cluster, first, key_prefix, 1)[0]}}}:script"
    for server in cluster.masters:
        with cluster.client(server) as client:
            client.script_flush()

    # NOSCRIPT on the slot's master: loaded there, run there, and nowhere else.
    assert await connection.evalsha(sha, SCRIPT, [key], ["value"]) == b"value"

    with cluster.client(first) as client:
        assert client.get(key) == b"value"
        assert client.script_exists(sha) == [True]
    for server in others:
        with cluster.client(server) as client:
            assert client.script_exists(sha) == [False]
    # Every master loads it when a key of its own comes.
    for server in others:
        other_key = f"{{{tags_on(cluster, server, key_prefix, 1)[0]}}}:script"
        assert (
            await connection.evalsha(sha, SCRIPT, [other_key], [server.port])
            == str(server.port).encode()
        )
        with cluster.client(server) as client:
            assert client.get(other_key) == str(server.port).encode()
            assert client.script_exists(sha) == [True]


async def migrate_slot(
    cluster: ClusterTopology, slot: int, source: RedisServer, target: RedisServer
) -> None:
    """Move ``slot`` by hand as ``redis-cli --cluster reshard`` does, in batches of 10 keys."""
    clients = {server.port: cluster.async_client(server) for server in cluster.masters}
    src, dst = clients[source.port], clients[target.port]
    try:
        source_id = await src.execute_command("CLUSTER", "MYID")
        target_id = await dst.execute_command("CLUSTER", "MYID")
        await dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        await src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        while keys := await src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 10):
            await src.execute_command(
                "MIGRATE", target.host, target.port, "", 0, 5000, "AUTH", PASSWORD, "KEYS", *keys
            )
            await asyncio.sleep(0.01)  # let the writers in between batches
        # The target first, then the source, then the rest (as redis-cli does).
        others = [c for port, c in clients.items() if port not in (source.port, target.port)]
        for client in (dst, src, *others):
            await client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
    finally:
        for client in clients.values():
            await client.aclose()


async def test_a_slot_moved_under_load_keeps_every_acknowledged_write_exactly_once(
    cluster: ClusterTopology, connection: ClusterConnection, key_prefix: str
) -> None:
    source, target = cluster.masters[0], cluster.masters[1]
    tag = tags_on(cluster, source, key_prefix, 1)[0]
    slot = key_slot(tag.encode())
    log, counter = f"{{{tag}}}:log", f"{{{tag}}}:n"
    # Keys already in the slot, so the migration takes many batches.
    await connection.execute_many(*(("SET", f"{{{tag}}}:old:{i}", i) for i in range(400)))
    acked: dict[int, list[int]] = {writer: [] for writer in range(4)}
    failures: list[BaseException] = []
    moving = asyncio.Event()
    moved = asyncio.Event()
    during = 0

    async def write(writer: int) -> None:
        nonlocal during
        i = 0
        after = 0
        while after < 50:  # keep writing for a while after the move
            try:
                await connection.execute_many(
                    ("RPUSH", log, f"{writer}:{i}"),
                    ("SET", f"{{{tag}}}:w:{writer}:{i}", i),
                    ("INCR", counter),
                )
            except redis_errors.RedisError as exc:
                failures.append(exc)
                return
            acked[writer].append(i)
            i += 1
            during += moving.is_set() and not moved.is_set()
            after += moved.is_set()

    writers = [asyncio.create_task(write(writer)) for writer in range(4)]
    await asyncio.sleep(0.1)
    moving.set()
    await migrate_slot(cluster, slot, source, target)
    moved.set()
    await asyncio.gather(*writers)

    total = sum(len(ids) for ids in acked.values())
    with cluster.client(target) as client:
        entries = [entry.decode() for entry in client.lrange(log, 0, -1)]
        count = int(client.get(counter))
        in_slot = int(client.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot))
        written = sum(
            client.exists(f"{{{tag}}}:w:{writer}:{i}") for writer, ids in acked.items() for i in ids
        )
    with cluster.client(source) as client:
        left_behind = int(client.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot))

    assert failures == []
    assert during > 0, "no write was made while the slot was migrating"
    for writer, ids in acked.items():
        assert [e for e in entries if e.startswith(f"{writer}:")] == [f"{writer}:{i}" for i in ids]
    assert len(entries) == total
    assert count == total
    assert written == total
    assert in_slot == 400 + total + 2  # old keys, one per write, the log and the counter
    assert left_behind == 0
    assert connection.node_of(log) == address(target)


async def test_a_stopped_master_fails_only_its_own_slots_after_bounded_retries(
    cluster: ClusterTopology, key_prefix: str
) -> None:
    conn = ClusterConnection(
        RedisEndpoint.parse(cluster.url),
        retries=1,
        connect_timeout=0.5,
        call_timeout=0.5,
        backoff_base=0.05,
        backoff_cap=0.1,
    )
    # The victim serves slot 0, where keyless commands go first.
    victim = cluster.serving(0)
    others = [server for server in cluster.masters if server is not victim]
    lost = f"{{{tags_on(cluster, victim, key_prefix, 1)[0]}}}:k"
    alive = [f"{{{tags_on(cluster, server, key_prefix, 1)[0]}}}:k" for server in others]
    await conn.execute_many(*(("SET", key, "v") for key in [lost, *alive]))
    reconnects = conn.reconnects
    victim.pause()
    try:
        started = time.monotonic()
        with pytest.raises((redis_errors.ConnectionError, redis_errors.TimeoutError)):
            await conn.execute("GET", lost)
        took = time.monotonic() - started
        with pytest.raises(QueueConnectionException), translated_errors():
            await conn.execute("SET", lost, "w")

        assert await conn.execute_many(*(("GET", key) for key in alive)) == [b"v", b"v"]
        assert await conn.execute("PING") == b"PONG"  # keyless calls moved to a live master
        assert took < 2 * 0.5 + 2.0  # two tries of 0.5 s, a backoff, a map read
        assert conn.reconnects > reconnects
    finally:
        victim.resume()
        await conn.close()
        await asyncio.to_thread(cluster.wait_healthy)


async def test_close_ends_the_connection_to_every_node(cluster: ClusterTopology) -> None:
    conn = ClusterConnection(RedisEndpoint.parse(cluster.url), retries=0)
    keys = [f"{{{tags_on(cluster, server, 'close', 1)[0]}}}" for server in cluster.masters]
    await conn.execute_many(*(("GET", key) for key in keys))

    def clients(server: RedisServer) -> int:
        with cluster.client(server) as client:
            return int(client.info("clients")["connected_clients"])

    before = [clients(server) for server in cluster.masters]
    await conn.close()
    await asyncio.sleep(0.2)

    assert [clients(server) for server in cluster.masters] == [n - 1 for n in before]
    with pytest.raises(redis_errors.ConnectionError, match="closed"):
        await conn.execute("GET", keys[0])


async def test_a_seed_that_is_no_cluster_node_is_named_in_the_error(redis_url: str) -> None:
    conn = ClusterConnection(RedisEndpoint.parse(redis_url), retries=0)
    try:
        with pytest.raises(redis_errors.ResponseError, match="cluster"):
            await conn.execute("GET", "k")
    finally:
        await conn.close()


def test_sentinel_with_a_cluster_is_refused_naming_the_setting(cluster: ClusterTopology) -> None:
    endpoint = RedisEndpoint.parse(cluster.url).with_sentinels(["127.0.0.1:26379"], "mymaster")

    with pytest.raises(ClusterConfigError, match=r"^redis\.sentinel: ") as refused:
        ClusterConnection(endpoint, retries=0)
    assert refused.value.field == "redis.sentinel"
    assert isinstance(refused.value, ValueError)
    with pytest.raises(
        ConfigError, match=r"redis\.cluster cannot be combined with redis\.sentinel"
    ):
        Settings.model_validate(
            {"redis": {"url": cluster.url, "cluster": True, "sentinel": ["127.0.0.1:26379"]}}
        )


def test_a_cluster_setting_opens_calls_that_span_the_cluster(cluster: ClusterTopology) -> None:
    settings = Settings.model_validate(
        {"redis": {"url": cluster.url, "embedded": "never", "cluster": True}}
    )

    assert isinstance(open_calls(settings), ClusterConnection)


@pytest.mark.parametrize(
    ("url", "field"),
    [("redis://127.0.0.1:7000/1", "redis.url"), ("unix:///tmp/redis.sock", "redis.url")],
)
def test_a_database_or_a_unix_socket_is_refused_for_a_cluster(url: str, field: str) -> None:
    with pytest.raises(ClusterConfigError) as refused:
        ClusterConnection(RedisEndpoint.parse(url), retries=0)
    assert refused.value.field == field


def test_every_node_is_reached_with_the_seeds_credentials_and_tls(tmp_path: Path) -> None:
    seed = RedisEndpoint.parse(
        f"rediss://scrapeq:s3cret@seed.example:7000/0?ssl_ca_certs={tmp_path}/ca.pem"
        "&ssl_check_hostname=false&ssl_min_version=TLSv1_3"
    )

    node = node_endpoint(seed, "10.0.0.2", 7001)

    assert (node.host, node.port) == ("10.0.0.2", 7001)
    assert (node.username, node.password, node.tls, node.db) == (
        seed.username,
        seed.password,
        seed.tls,
        0,
    )
