"""Table-driven tests of the pure restart policy: no processes, an explicit clock."""

from typing import Any

import pytest

from actors.exit_codes import ChildExit
from supervisor.restart_policy import (
    Action,
    ChildState,
    Fatal,
    GiveUp,
    RestartPolicy,
    Spawn,
)

W = "worker-1"


def make_policy(
    max_restarts: int = 100, restart_window: float = 60.0, backoff_max: float = 30.0
) -> RestartPolicy:
    return RestartPolicy(max_restarts, restart_window, backoff_max)


def crash_and_measure_delay(policy: RestartPolicy, now: float) -> float:
    """Crash `W` at `now`, return how long until the policy spawns it again."""
    assert policy.exited(W, ChildExit.CRASH, now) == []
    deadline = policy.next_deadline()
    assert deadline is not None
    assert policy.tick(deadline - 0.001) == []
    assert policy.tick(deadline) == [Spawn(W)]
    return deadline - now


@pytest.mark.parametrize(
    ("backoff_max", "expected_delays"),
    [
        (30.0, [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]),
        (5.0, [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]),
        (0.2, [0.2, 0.2, 0.2]),
    ],
)
def test_backoff_doubles_from_half_a_second_up_to_the_cap(
    backoff_max: float, expected_delays: list[float]
) -> None:
    policy = make_policy(backoff_max=backoff_max)
    now = 0.0
    policy.spawned(W, now)
    delays = []
    for _ in expected_delays:
        delays.append(crash_and_measure_delay(policy, now))
        now += delays[-1]
        policy.spawned(W, now)
    assert delays == pytest.approx(expected_delays)


@pytest.mark.parametrize(
    ("uptime", "expected_delay"),
    [(9.9, 4.0), (10.0, 0.5), (600.0, 0.5)],
)
def test_backoff_starts_over_after_a_stable_run(uptime: float, expected_delay: float) -> None:
    policy = make_policy()
    now = 0.0
    policy.spawned(W, now)
    for _ in range(3):  # delays 0.5, 1, 2
        now += crash_and_measure_delay(policy, now)
        policy.spawned(W, now)
    now += uptime
    assert crash_and_measure_delay(policy, now) == pytest.approx(expected_delay)


@pytest.mark.parametrize(
    ("max_restarts", "window", "crash_times", "gives_up_at"),
    [
        (3, 60.0, [0, 1, 2, 3], 3),  # 4th restart within the window exceeds 3
        (3, 60.0, [0, 1, 2], None),  # exactly max_restarts is allowed
        (3, 60.0, [0, 20, 40, 60, 80], None),  # spread beyond the window
        (3, 60.0, [0, 20, 40, 59.9], 3),
        (0, 60.0, [0], 0),
    ],
)
def test_intensity_gives_up_on_the_restart_after_max_restarts_within_the_window(
    max_restarts: int, window: float, crash_times: list[float], gives_up_at: int | None
) -> None:
    names = [f"worker-{i}" for i in range(len(crash_times))]
    policy = make_policy(max_restarts=max_restarts, restart_window=window)
    for name in names:
        policy.spawned(name, 0.0)
    outcomes = [
        policy.exited(name, ChildExit.CRASH, t) for name, t in zip(names, crash_times, strict=True)
    ]
    give_ups = [
        i for i, actions in enumerate(outcomes) if any(isinstance(a, GiveUp) for a in actions)
    ]
    assert give_ups == ([] if gives_up_at is None else [gives_up_at])


def test_after_giving_up_the_policy_only_records_stops() -> None:
    policy = make_policy(max_restarts=0)
    policy.spawned("a", 0.0)
    policy.spawned("b", 0.0)
    [give_up] = policy.exited("a", ChildExit.CRASH, 1.0)
    assert isinstance(give_up, GiveUp)
    assert "max_restarts=0" in give_up.reason
    assert policy.exited("b", ChildExit.CRASH, 1.1) == []
    assert policy.tick(100.0) == []
    assert policy.next_deadline() is None
    assert policy.states() == {"a": ChildState.STOPPED, "b": ChildState.STOPPED}


@pytest.mark.parametrize("code", [ChildExit.CRASH, ChildExit.REDIS_UNAVAILABLE, ChildExit.OK, -9])
def test_unexpected_exits_restart_with_backoff(code: int) -> None:
    policy = make_policy()
    policy.spawned(W, 0.0)
    assert policy.exited(W, code, 5.0) == []
    assert policy.state(W) is ChildState.BACKOFF
    assert policy.next_deadline() == pytest.approx(5.5)


def test_config_error_is_fatal_and_never_restarted() -> None:
    policy = make_policy()
    policy.spawned(W, 0.0)
    [action] = policy.exited(W, ChildExit.CONFIG_ERROR, 0.3)
    assert action == Fatal(W, f"{W} exited with CONFIG_ERROR (78)")
    assert policy.state(W) is ChildState.FATAL
    assert policy.tick(1000.0) == []
    assert policy.next_deadline() is None


def test_recycle_restarts_at_once_and_does_not_count_toward_intensity() -> None:
    policy = make_policy(max_restarts=1, restart_window=60.0)
    policy.spawned(W, 0.0)
    for i in range(1, 20):
        assert policy.exited(W, ChildExit.RECYCLE, float(i)) == [Spawn(W)]
        assert policy.state(W) is ChildState.STARTING
        policy.spawned(W, float(i))
    assert policy.exited(W, ChildExit.CRASH, 20.0) == []  # first counted restart


def test_recycle_does_not_reset_backoff_of_a_flapping_child() -> None:
    policy = make_policy()
    policy.spawned(W, 0.0)
    now = crash_and_measure_delay(policy, 0.0)  # 0.5
    policy.spawned(W, now)
    assert policy.exited(W, ChildExit.RECYCLE, now + 1) == [Spawn(W)]
    policy.spawned(W, now + 1)
    assert crash_and_measure_delay(policy, now + 2) == pytest.approx(1.0)


@pytest.mark.parametrize("code", [ChildExit.OK, ChildExit.CRASH, ChildExit.CONFIG_ERROR, -15])
def test_a_child_stopped_on_purpose_is_not_restarted(code: int) -> None:
    policy = make_policy(max_restarts=0)
    policy.spawned(W, 0.0)
    policy.stopping(W)
    assert policy.state(W) is ChildState.STOPPING
    assert policy.exited(W, code, 1.0) == []
    assert policy.state(W) is ChildState.STOPPED
    assert policy.tick(100.0) == []


def test_stopping_a_child_in_backoff_cancels_its_restart() -> None:
    policy = make_policy()
    policy.spawned(W, 0.0)
    policy.exited(W, ChildExit.CRASH, 1.0)
    policy.stopping(W)
    assert policy.state(W) is ChildState.STOPPED
    assert policy.tick(100.0) == []


def test_a_stopped_child_spawned_again_is_supervised_again() -> None:
    policy = make_policy()
    policy.spawned(W, 0.0)
    policy.stopping(W)
    policy.exited(W, ChildExit.OK, 1.0)
    policy.spawned(W, 2.0)
    assert policy.exited(W, ChildExit.CRASH, 3.0) == []
    assert policy.state(W) is ChildState.BACKOFF


def test_a_forgotten_child_is_ignored() -> None:
    policy = make_policy()
    policy.spawned(W, 0.0)
    policy.exited(W, ChildExit.CRASH, 1.0)
    policy.forget(W)
    assert policy.tick(100.0) == []
    assert policy.exited(W, ChildExit.CRASH, 101.0) == []
    assert policy.states() == {}
    with pytest.raises(KeyError, match="worker-1"):
        policy.state(W)


def test_a_child_becomes_running_after_startsecs() -> None:
    policy = RestartPolicy(10, 60.0, 30.0, startsecs=2.0)
    policy.spawned(W, 10.0)
    assert policy.next_deadline() == pytest.approx(12.0)
    policy.tick(11.9)
    assert policy.state(W) is ChildState.STARTING
    policy.tick(12.0)
    assert policy.state(W) is ChildState.RUNNING
    assert policy.next_deadline() is None


def test_tick_spawns_due_children_in_due_order_and_each_only_once() -> None:
    policy = make_policy()
    for name in ("c", "b", "a"):
        policy.spawned(name, 0.0)
    policy.exited("c", ChildExit.CRASH, 0.0)  # due 0.5
    policy.exited("b", ChildExit.CRASH, 0.1)  # due 0.6
    policy.exited("a", ChildExit.CRASH, 0.9)  # due 1.4
    actions: list[Action] = policy.tick(1.0)
    assert actions == [Spawn("c"), Spawn("b")]
    assert policy.tick(1.0) == []
    assert policy.next_deadline() == pytest.approx(1.4)


def test_duplicate_exit_reports_are_ignored() -> None:
    policy = make_policy(max_restarts=1)
    policy.spawned(W, 0.0)
    assert policy.exited(W, ChildExit.CRASH, 1.0) == []
    assert policy.exited(W, ChildExit.CRASH, 1.0) == []
    assert policy.next_deadline() == pytest.approx(1.5)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_restarts": -1}, "max_restarts"),
        ({"restart_window": 0.0}, "restart_window"),
        ({"backoff_max": -1.0}, "backoff_max"),
        ({"backoff_initial": 0.0}, "backoff_initial"),
        ({"startsecs": -1.0}, "startsecs"),
        ({"stable_after": -1.0}, "stable_after"),
    ],
)
def test_invalid_settings_are_rejected_naming_the_field(kwargs: dict[str, Any], field: str) -> None:
    args: dict[str, Any] = {"max_restarts": 1, "restart_window": 1.0, "backoff_max": 1.0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
        RestartPolicy(**args)
