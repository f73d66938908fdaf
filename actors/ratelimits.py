"""Which rate keys a task counts against.

Every task counts against ``script:<name>``; a task with a ``rate_key`` or a
``parameters["url"]`` also counts against ``domain:<rate_key or url host>``
(a ``rate_key`` may also be given as ``domain:<host>``).
Whether a key is limited is decided in Redis (the ``limits`` hash that
``set_limits.lua`` publishes), so a reload applies to tasks already queued.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from actors.models import ScrapingRequest
from config.settings import PolitenessSettings

_HOST = re.compile(r"^[A-Za-z0-9_.:-]{1,253}$")


def domain_key(request: ScrapingRequest) -> str | None:
    """``domain:<host>`` for the request, or None if it names no site."""
    if request.rate_key:
        key = request.rate_key
        return key if key.startswith("domain:") else f"domain:{key}"
    url = request.parameters.get("url")
    if not isinstance(url, str):
        return None
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return None
    if host is None or not _HOST.match(host):
        return None
    return f"domain:{host}"


def rate_keys(request: ScrapingRequest) -> str:
    """The task's rate keys, space separated, the domain first."""
    domain = domain_key(request)
    script = f"script:{request.script_name}"
    return f"{domain} {script}" if domain else script


def politeness_fields(politeness: PolitenessSettings) -> dict[str, str]:
    """``[politeness]`` as the fields of the politeness hash the scripts read."""
    caps = {f"cap:{key}": str(cap) for key, cap in politeness.in_flight.items()}
    active = (
        politeness.adaptive
        or politeness.max_in_flight_per_domain > 0
        or any(politeness.in_flight.values())
    )
    return {
        "active": "1" if active else "0",
        "cap": str(politeness.max_in_flight_per_domain),
        "capped": "1" if caps else "0",
        "window": str(politeness.initial_window),
        **caps,
        "adaptive": "1" if politeness.adaptive else "0",
        "start_rate": repr(politeness.start_rate),
        "min_rate": repr(politeness.min_rate),
        "max_retry_after_ms": str(int(politeness.max_retry_after * 1000)),
    }
