"""A scripts module that sets its worker's wall clock off; list it in one worker's scripts.

Importing it replaces ``time.time`` in that process with one that is
``$FAULT_SUITE_CLOCK_SKEW`` (``CLOCK_SKEW_ENV``) seconds (default 90, may be negative) ahead,
as on a host whose NTP is broken. Leases, retry delays and heartbeats are
measured on the Redis clock, so nothing may change; ``clock`` returns the
worker's skewed time, so a test can check that the skew is really in force.
"""

from __future__ import annotations

import os
import time
from typing import Any

from actors.scripts import script
from faults.workload import CLOCK_SKEW_ENV

OFFSET = float(os.environ.get(CLOCK_SKEW_ENV, "90"))

_real_time = time.time


def _skewed_time() -> float:
    return _real_time() + OFFSET


time.time = _skewed_time


@script("clock")
async def clock(parameters: dict[str, Any]) -> dict[str, Any]:
    return {"time": time.time(), "pid": os.getpid()}
