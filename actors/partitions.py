"""A partitioned queue: one logical queue over N hash tags (``[redis] partitions``).

Every Lua script touches the keys of one hash tag, so on a Redis Cluster a
queue whose keys share one tag is served by one master, one core. With
``partitions = N`` the queue is N complete key spaces (``KeySpace``), each
with its own tag; a cluster serves each tag's slot on some master, and the
tags are chosen so that the slots lie spread over the slot space: with N
masters splitting the slots evenly (``redis-cli --cluster create``), each
partition lands on a master of its own.

Placement (docs/design.md, "Partitions"): a task that names a domain goes to
the partition of its domain, so every per-domain guarantee (rate limit, 429
pause, circuit breaker, in-flight cap, learned pace) is kept by one
partition's scripts, atomically, exactly as on one queue. A task that names
none goes to the partition of its request id. Both by CRC32, stable across
processes and versions.

Partition 0 is the queue's own tag (``{queue}``), and with ``partitions = 1``
it is the whole queue: today's layout, byte for byte. It is also the home of
what is the queue's rather than a partition's: the worker registry, the
singleton locks, the latency metrics.
"""

from __future__ import annotations

import zlib

from actors.cluster import SLOTS, key_slot
from actors.keys import KeySpace

#: How far a partition tag's search goes before it settles for any slot; the
#: search finds one in a few tries (the slot of a tag is uniform in practice).
TAG_SEARCH = 10_000


def partition_tags(queue: str, count: int) -> list[str]:
    """The hash tags of ``count`` partitions of ``queue``: the queue's name first.

    Partition 0's slot falls in one of ``count`` equal ranges of the slot
    space; partition i takes the first ``<queue>-<k>`` whose slot lies in the
    middle half of the i-th range after it (so a range boundary that a
    cluster draws a few slots off does not matter).
    """
    if count < 1:
        raise ValueError(f"redis.partitions must be at least 1, got {count}")
    tags = [queue]
    width = SLOTS / count
    first = int(key_slot(queue.encode()) // width)
    k = 0
    for index in range(1, count):
        target = (first + index) % count
        low, high = (target + 0.25) * width, (target + 0.75) * width
        while k < TAG_SEARCH and not low <= key_slot(f"{queue}-{k}".encode()) < high:
            k += 1
        tags.append(f"{queue}-{k}")
        k += 1
    return tags


def partition_keys(prefix: str, queue: str, count: int) -> list[KeySpace]:
    """The key spaces of a queue's ``count`` partitions (one, the queue's own, at 1)."""
    if count == 1:
        return [KeySpace(prefix, queue)]
    return [KeySpace(prefix, queue, tag) for tag in partition_tags(queue, count)]


def partition_of(name: str, count: int) -> int:
    """The partition of a domain's rate key, or of a request id (CRC32, stable)."""
    if count == 1:
        return 0
    return zlib.crc32(name.encode()) % count


def place(rate_keys: str, request_id: str, count: int) -> int:
    """The partition of a task: its domain's (its first rate key, when a domain), else its id's."""
    if count == 1:
        return 0
    first = rate_keys.split(" ", 1)[0]
    return partition_of(first if first.startswith("domain:") else request_id, count)
