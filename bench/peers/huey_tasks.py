"""The benchmark's tasks for huey (RedisHuey, results stored).

The consumer loads ``bench.peers.huey_tasks.huey``; the harness builds its own
instance for each private server with :func:`build`. ``BENCH_HUEY_NOTIFY=1``
turns on ``notify_result`` (results pushed to a per-task list, waited on with
BLPOP) for the round-trip workload.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from huey import RedisHuey  # type: ignore[import-untyped]

URL_ENV = "BENCH_REDIS_URL"
NOTIFY_ENV = "BENCH_HUEY_NOTIFY"
#: Never reachable: a consumer started without the harness's URL fails loudly.
UNSET_URL = "redis://127.0.0.1:1/0"


def noop(i: int) -> int:
    return i


def sleep(seconds: float) -> float:
    time.sleep(seconds)  # huey runs tasks in threads or processes
    return seconds


@dataclass(frozen=True)
class HueyApp:
    huey: Any
    noop: Any
    sleep: Any


def build(url: str, *, notify: bool = False) -> HueyApp:
    app = RedisHuey("bench", url=url, notify_result=notify)
    return HueyApp(app, app.task(name="bench.noop")(noop), app.task(name="bench.sleep")(sleep))


huey = build(os.environ.get(URL_ENV, UNSET_URL), notify=os.environ.get(NOTIFY_ENV) == "1").huey
