"""Which config changes wait for a restart on reload, and which actors a change replaces."""

from __future__ import annotations

from config.settings import Settings
from supervisor.reload import keep_restart_only, replaces

KINDS = ("worker", "heartbeat", "reaper", "governor")


def test_a_new_dashboard_token_waits_for_a_restart_and_replaces_no_actor() -> None:
    old = Settings()
    loaded = Settings.model_validate({"dashboard": {"token": "s3cret", "enabled": False}})

    kept, waiting = keep_restart_only(old, loaded)

    assert sorted(waiting) == ["dashboard.enabled", "dashboard.token"]
    assert kept.dashboard == old.dashboard
    assert not any(replaces(old, loaded, kind) for kind in KINDS)


def test_new_history_bounds_replace_only_the_reaper() -> None:
    old = Settings()
    new = Settings.model_validate({"events": {"history": 10, "history_max_age": 60}})

    assert [kind for kind in KINDS if replaces(old, new, kind)] == ["reaper"]
