"""The Redis commands each role needs: the least-privilege ACL in one place.

Two roles share a queue: a worker host (``supervisor start``: workers,
reaper, governor, heartbeat, the CLI) and a producer (a Gateway that only
enqueues, waits, reads status and cancels). Redis checks ACL rights inside
Lua scripts too, so a role needs every command its scripts call.
``deploy/redis.conf`` has the two ``user`` lines built from these lists (a
test keeps them equal) and docs/deploy.md explains them.

Names are Redis's ACL names: a subcommand as ``COMMAND|SUB``.
"""

from __future__ import annotations

#: Rights probe.lua can try from inside a script (it runs each with harmless arguments).
PRODUCER_PROBED = (
    "EXISTS",
    "HEXISTS",
    "HGET",
    "HMGET",
    "HGETALL",
    "HSET",
    "HINCRBY",
    "INCRBY",
    "ZADD",
    "ZCARD",
    "ZREM",
    "PEXPIRE",
    "PUBLISH",
    "PUBSUB|NUMSUB",
    "PUBSUB|NUMPAT",
    "TIME",
    "XADD",  # the event history (docs/events.md): enqueue keeps its events
)
WORKER_HOST_PROBED = (
    *PRODUCER_PROBED,
    "DEL",
    "GET",
    "SET",
    "TYPE",
    "PTTL",
    "PERSIST",
    "HSETNX",
    "HDEL",
    "ZRANGE",
    "ZRANGEBYSCORE",
    "ZSCORE",
    "ZPOPMIN",
    "SCAN",
    "XTRIM",
    "XRANGE",
    "XREVRANGE",
)
#: Rights every role needs that a script cannot try: connecting, loading and
#: running the scripts (proven by running the probe), subscribing (a refused
#: SUBSCRIBE is logged by the subscription).
CONNECTION = (
    "AUTH",
    "HELLO",
    "PING",
    "SELECT",
    "EVALSHA",
    "SCRIPT|LOAD",
    "SUBSCRIBE",
    "UNSUBSCRIBE",
)
#: Rights the worker host's CLI needs that a script cannot try: ``events``
#: follows the history with a blocking read.
FOLLOWING = ("XREAD",)
#: Used when granted, tolerated when refused: the start-up checks (eviction
#: policy, restart detection) and the master's ROLE behind Sentinels.
OPTIONAL = ("INFO", "CONFIG|GET", "ROLE")

PRODUCER = (*CONNECTION, *PRODUCER_PROBED)
WORKER_HOST = (*CONNECTION, *FOLLOWING, *WORKER_HOST_PROBED, *OPTIONAL)


def acl_rule(user: str, commands: tuple[str, ...], key_prefix: str) -> str:
    """The ``ACL SETUSER`` rule (without the password) granting ``commands`` on the queue's
    keys and channels only: ``<key_prefix>:*``."""
    grants = " ".join(f"+{command.lower()}" for command in commands)
    return f"user {user} on resetkeys ~{key_prefix}:* resetchannels &{key_prefix}:* -@all {grants}"
