"""What a RELOAD may change while the tree runs, and which actors a change replaces."""

from __future__ import annotations

from typing import Any

from config.settings import Settings

# Keys read only at start: they name the Redis the whole tree talks to, the
# state directory, the metrics listener and dashboard, and the restart
# policy's parameters.
_RESTART_ONLY: dict[str, tuple[str, ...]] = {
    "dashboard": ("enabled", "token"),
    "redis": (
        "url",
        "embedded",
        "key_prefix",
        "sentinel",
        "master_name",
        "cluster",
        "partitions",
        "durable_enqueue",
        "durable_timeout",
    ),
    "supervisor": (
        "state_dir",
        "metrics_port",
        "metrics_host",
        "max_restarts",
        "restart_window",
        "restart_backoff_max",
    ),
}


def keep_restart_only(old: Settings, loaded: Settings) -> tuple[Settings, list[str]]:
    """``loaded`` with the restart-only keys of ``old``; also the keys whose change waits."""
    waiting: list[str] = []
    sections: dict[str, Any] = {}
    for section, keys in _RESTART_ONLY.items():
        kept = {key: getattr(getattr(old, section), key) for key in keys}
        new_part = getattr(loaded, section)
        waiting += [f"{section}.{key}" for key in keys if getattr(new_part, key) != kept[key]]
        sections[section] = new_part.model_copy(update=kept)
    return loaded.model_copy(update=sections), waiting


def replaces(old: Settings, new: Settings, kind: str) -> bool:
    """Whether going from ``old`` to ``new`` means replacing a running actor of ``kind``."""
    return _child_view(old, kind) != _child_view(new, kind)


def _child_view(settings: Settings, kind: str) -> dict[str, Any]:
    """What a running child of ``kind`` uses of the settings.

    Rate limits and the circuit breaker reach every host through Redis
    (``set_limits``), only the governor reads the watermarks, only the reaper
    the event history's bounds, and no child the dashboard's keys.
    """
    exclude: dict[str, Any] = {
        "worker": {"processes"},
        "rate_limits": True,
        "circuit_breaker": True,
        "dashboard": True,
    }
    if kind != "governor":
        exclude["backpressure"] = True
    if kind != "reaper":
        exclude["events"] = True
    return settings.model_dump(mode="json", exclude=exclude)
