"""The systemd notify protocol against a real AF_UNIX datagram socket."""

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.notify import ProgressWatchdog, SystemdNotifier


@pytest.fixture
def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd, announced via NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(2.0)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


@pytest.fixture
def notifier(manager: socket.socket) -> Iterator[SystemdNotifier]:
    with SystemdNotifier() as notifier:
        yield notifier


def receive(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_state_changes_arrive_as_datagrams(
    manager: socket.socket, notifier: SystemdNotifier
) -> None:
    assert notifier.enabled
    notifier.ready()
    notifier.status("워커 4/4 실행 중")
    notifier.watchdog()
    notifier.stopping()
    assert [receive(manager) for _ in range(4)] == [
        "READY=1",
        "STATUS=워커 4/4 실행 중",
        "WATCHDOG=1",
        "STOPPING=1",
    ]


def test_status_text_is_kept_on_one_line(manager: socket.socket, notifier: SystemdNotifier) -> None:
    notifier.status("draining\n3 tasks left")
    assert receive(manager) == "STATUS=draining 3 tasks left"


def test_reloading_carries_the_monotonic_timestamp(
    manager: socket.socket, notifier: SystemdNotifier
) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    reloading, stamp = receive(manager).split("\n")
    assert reloading == "RELOADING=1"
    key, value = stamp.split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_abstract_socket_address_is_supported(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"scrapeq-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2.0)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        with SystemdNotifier() as notifier:
            notifier.ready()
        assert receive(sock) == "READY=1"


@pytest.mark.parametrize("address", [None, "", "vsock:2:9999"])
def test_without_a_usable_notify_socket_every_call_is_a_no_op(
    monkeypatch: pytest.MonkeyPatch, address: str | None
) -> None:
    if address is None:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    else:
        monkeypatch.setenv("NOTIFY_SOCKET", address)
    with SystemdNotifier() as notifier:
        assert not notifier.enabled
        notifier.ready()
        notifier.status("x")
        notifier.watchdog()
        notifier.reloading()
        notifier.stopping()


def test_send_errors_never_raise_and_are_logged_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    with caplog.at_level(logging.WARNING, logger="supervisor.notify"), SystemdNotifier() as n:
        n.ready()
        n.watchdog()
        n.stopping()
    assert len(caplog.records) == 1
    assert "READY=1" in caplog.records[0].getMessage()


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "<own>"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec_for_our_pid(
    environ: dict[str, str], expected: float | None
) -> None:
    environ = {k: str(os.getpid()) if v == "<own>" else v for k, v in environ.items()}
    assert SystemdNotifier(environ).watchdog_interval() == expected


def test_watchdog_pings_only_when_progress_advanced() -> None:
    watchdog = ProgressWatchdog(period=15.0)
    assert not watchdog.should_ping(0.0)  # nothing observed yet
    watchdog.observe(10, 1.0)
    assert watchdog.should_ping(1.0)
    assert not watchdog.should_ping(20.0)  # no progress since that ping
    watchdog.observe(10, 30.0)
    assert not watchdog.should_ping(30.0)
    watchdog.observe(11, 31.0)
    assert watchdog.should_ping(31.0)


def test_watchdog_pings_at_most_once_per_period() -> None:
    watchdog = ProgressWatchdog(period=15.0)
    watchdog.observe(1, 0.0)
    assert watchdog.should_ping(0.0)
    watchdog.observe(2, 5.0)
    assert not watchdog.should_ping(5.0)
    assert watchdog.should_ping(15.0)


def test_watchdog_treats_a_counter_that_starts_over_as_progress() -> None:
    watchdog = ProgressWatchdog(period=1.0)
    watchdog.observe(500, 0.0)
    assert watchdog.should_ping(0.0)
    watchdog.observe(3, 2.0)
    assert watchdog.should_ping(2.0)


def test_watchdog_reports_how_long_progress_stalled() -> None:
    watchdog = ProgressWatchdog(period=1.0)
    assert watchdog.stalled_for(5.0) == 0.0
    watchdog.observe(1, 10.0)
    watchdog.observe(1, 20.0)
    assert watchdog.stalled_for(25.0) == 15.0


def test_watchdog_period_must_be_positive() -> None:
    with pytest.raises(ValueError, match="period"):
        ProgressWatchdog(period=0.0)
