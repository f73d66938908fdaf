"""When the supervisor may judge workers by heartbeats (supervisor/health.py; no Redis needed)."""

from __future__ import annotations

from actors.backoff import BACKOFF_CAP
from actors.reachability import RedisReachability

INTERVAL, TIMEOUT = 1.0, 10.0


def test_heartbeats_are_judged_from_the_start_when_redis_never_failed() -> None:
    reachability = RedisReachability()

    reachability.answered(took=0.01, now=0.0, interval=INTERVAL)

    assert reachability.may_judge(0.0, TIMEOUT)


def test_after_an_outage_heartbeats_are_judged_only_after_the_timeout_and_backoff_cap() -> None:
    reachability = RedisReachability()
    assert reachability.failed() is True
    assert reachability.failed() is False  # the same outage: logged once

    reachability.answered(took=0.01, now=100.0, interval=INTERVAL)

    assert not reachability.failing
    assert not reachability.may_judge(100.0 + TIMEOUT + BACKOFF_CAP - 0.1, TIMEOUT)
    assert reachability.may_judge(100.0 + TIMEOUT + BACKOFF_CAP, TIMEOUT)


def test_a_check_held_up_longer_than_the_interval_counts_as_an_outage() -> None:
    reachability = RedisReachability()

    reachability.answered(took=INTERVAL + 0.5, now=50.0, interval=INTERVAL)

    assert not reachability.may_judge(50.0 + TIMEOUT, TIMEOUT)
    assert reachability.may_judge(50.0 + TIMEOUT + BACKOFF_CAP, TIMEOUT)
