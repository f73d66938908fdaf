"""Worker scripts that misbehave on purpose: list in ``[worker] scripts`` next to the ledger ones.

* ``leak``: keeps ``mb`` MiB (default 64) alive in this worker for good, as a
  leaking scraper would; the worker's ``max_memory_mb`` watchdog must recycle it.
* ``spawn``: starts ``sleep 300`` in a session of its own (as a daemon or a
  browser would) and returns its pid; the worker must end it when it exits.
* ``not-json``: returns a value JSON cannot encode (a set); the task must fail
  with a clear error, the worker must carry on.

Both write ``started`` / ``side_effect`` ledger lines like ``faults.ledger_scripts``
(``ledger`` and ``id`` parameters), so the checker counts their executions.
"""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any

from actors.scripts import current_attempt, script
from faults.ledger import append_record

MIB = 1024 * 1024

#: What ``leak`` holds on to: it is never released while the process lives.
_hoard: list[bytearray] = []


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


@script("leak")
async def leak(parameters: dict[str, Any]) -> dict[str, Any]:
    _record(parameters, "started")
    # Written, not just reserved: untouched pages would not count in the RSS.
    _hoard.append(bytearray(b"\x01") * (int(parameters.get("mb", 64)) * MIB))
    _record(parameters, "side_effect")
    return {"id": parameters["id"], "pid": os.getpid(), "held_mb": sum(map(len, _hoard)) // MIB}


@script("not-json")
async def not_json(parameters: dict[str, Any]) -> set[str]:
    _record(parameters, "started")
    return {"a set is not JSON"}


@script("spawn")
def spawn(parameters: dict[str, Any]) -> dict[str, int]:
    child = subprocess.Popen(["sleep", "300"], start_new_session=True)
    return {"pid": child.pid}
