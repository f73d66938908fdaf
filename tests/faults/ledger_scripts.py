"""Scripts for fault tests that write what they do to the ledger: list in ``[worker] scripts``.

Every script takes ``ledger`` (the ledger file) and ``id`` (the task id, by
convention its request id), appends ``started`` before its work and
``side_effect`` after it (the stand-in for a scrape's write to a sink), and
returns ``{"id", "pid"}``. Build requests with ``faults.ledger.ledger_request``.

* ``ledger``: ``seconds`` (default 0) of ``asyncio.sleep``.
* ``ledger-crash``: as ``ledger``, but hard-exits the worker (``os._exit(1)``)
  right after ``started`` on attempts up to ``crash_times`` (default 1).
* ``ledger-block``: blocks the worker's event loop with ``time.sleep(seconds)``:
  no heartbeat, no lease renewal, nothing else runs in that process meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from actors.scripts import current_attempt, script
from faults.ledger import append_record


def _record(parameters: dict[str, Any], kind: str) -> None:
    append_record(
        parameters["ledger"],
        {
            "kind": kind,
            "id": parameters["id"],
            "pid": os.getpid(),
            "attempt": current_attempt(),
            "t": time.time(),
        },
    )


def _finish(parameters: dict[str, Any]) -> dict[str, Any]:
    _record(parameters, "side_effect")
    return {"id": parameters["id"], "pid": os.getpid()}


@script("ledger")
async def ledger(parameters: dict[str, Any]) -> dict[str, Any]:
    _record(parameters, "started")
    await asyncio.sleep(float(parameters.get("seconds", 0)))
    return _finish(parameters)


@script("ledger-crash")
async def ledger_crash(parameters: dict[str, Any]) -> dict[str, Any]:
    _record(parameters, "started")
    if current_attempt() <= int(parameters.get("crash_times", 1)):
        os._exit(1)
    await asyncio.sleep(float(parameters.get("seconds", 0)))
    return _finish(parameters)


@script("ledger-block")
async def ledger_block(parameters: dict[str, Any]) -> dict[str, Any]:
    _record(parameters, "started")
    time.sleep(float(parameters["seconds"]))  # noqa: ASYNC251 -- the fault: a blocked event loop
    return _finish(parameters)
