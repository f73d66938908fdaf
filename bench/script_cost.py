"""What a Lua script costs Redis per call, alone and pipelined: the floor under a lone enqueue.

Run ``python -m bench.script_cost`` (``--calls``, ``--repeats``). It starts a
private redis-server without persistence and times, by Redis's own
``INFO commandstats`` (µs of server time per EVALSHA, so no client time),
scripts of 0, 4, 8 and 12 ``redis.call('TIME')``, and the real enqueue
script with one small task. Each runs ``--calls`` times as lone calls (one
round trip each, as a sequential ``enqueue_task`` sends them) and again
pipelined 100 at a time (as concurrent callers or ``enqueue_many`` do).
Medians over the repeats.

The gap between the two columns is what a lone call pays for arriving on an
idle server; the slope over the TIME scripts is the cost of one
``redis.call`` inside a script.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import redis

from actors.keys import KeySpace
from actors.models import ScrapingRequest
from actors.store import EnqueueItem, enqueue_call, script_source
from bench.common import private_redis

PIPELINE = 100
TIME_CALLS = (0, 4, 8, 12)

#: The number of KEYS, then the KEYS and ARGV of one call.
Call = tuple[int, list[str | int]]
#: name -> (source, a function giving call number i)
Workload = dict[str, tuple[str, Callable[[int], Call]]]


def workloads() -> Workload:
    keys = KeySpace("bench", "default")
    payload = ScrapingRequest(script_name="echo").stored_json()

    def enqueue_args(i: int) -> Call:
        item = EnqueueItem(f"t{i}", payload, 0, 3, 0, "script:echo")
        enqueue_keys, args = enqueue_call(keys, [item], high_watermark=10**9, stale_ms=5000)
        return len(enqueue_keys), [*enqueue_keys, *keys.script_context(), *args]

    out: Workload = {
        f"{n} x redis.call('TIME')": (
            f"for _ = 1, {n} do redis.call('TIME') end return 1",
            lambda i: (0, []),
        )
        for n in TIME_CALLS
    }
    out["enqueue, one task (12 commands)"] = (script_source("enqueue"), enqueue_args)
    return out


def server_us_per_call(client: redis.Redis) -> float:
    stats = client.info("commandstats")["cmdstat_evalsha"]
    return float(stats["usec_per_call"])


def measure(
    client: redis.Redis, source: str, call: Callable[[int], Call], calls: int
) -> tuple[float, float]:
    """(lone, pipelined) server µs per call."""
    sha = client.script_load(source)
    client.flushall()
    client.config_resetstat()
    for i in range(calls):
        numkeys, keys_and_args = call(i)
        client.evalsha(sha, numkeys, *keys_and_args)
    lone = server_us_per_call(client)
    client.flushall()
    client.config_resetstat()
    for start in range(0, calls, PIPELINE):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(calls, start + PIPELINE)):
            numkeys, keys_and_args = call(i)
            pipe.evalsha(sha, numkeys, *keys_and_args)
        pipe.execute()
    return lone, server_us_per_call(client)


def run(url: str, calls: int, repeats: int) -> dict[str, tuple[list[float], list[float]]]:
    client = redis.Redis.from_url(url)
    results: dict[str, tuple[list[float], list[float]]] = {}
    try:
        for _ in range(repeats):
            for name, (source, call) in workloads().items():  # alternating, A B C A B C
                lone, piped = measure(client, source, call, calls)
                runs = results.setdefault(name, ([], []))
                runs[0].append(lone)
                runs[1].append(piped)
    finally:
        client.close()
    return results


def print_table(results: dict[str, tuple[list[float], list[float]]]) -> None:
    print(f"{'script':<34} | {'lone µs/call':>12} | {'pipelined µs/call':>17}")
    print("-" * 70)
    for name, (lone, piped) in results.items():
        print(f"{name:<34} | {statistics.median(lone):>12.1f} | {statistics.median(piped):>17.1f}")
    print("(Redis server time per EVALSHA from INFO commandstats; medians of the repeats)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=3000, help="calls per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all scripts")
    args = parser.parse_args()
    with private_redis() as url:
        results = run(url, args.calls, args.repeats)
    print_table(results)


if __name__ == "__main__":
    main()
