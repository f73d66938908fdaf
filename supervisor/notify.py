"""The systemd notify protocol (sd_notify(3)) without libsystemd.

`SystemdNotifier` sends ``KEY=VALUE`` datagrams to ``$NOTIFY_SOCKET`` and does
nothing when it is unset, so the supervisor calls it unconditionally.
`ProgressWatchdog` decides when ``WATCHDOG=1`` is deserved: only when the
tree made progress, so a wedged supervisor whose timer still fires is caught.
"""

import logging
import os
import socket
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Self

logger = logging.getLogger(__name__)


class SystemdNotifier:
    """Sends state changes to systemd; every method is a no-op without NOTIFY_SOCKET.

    Sending never raises: a failure is logged once and the message dropped.
    The socket is non-blocking so a stalled manager cannot stall the
    supervisor's event loop.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec = env.get("WATCHDOG_USEC")
        self._watchdog_pid = env.get("WATCHDOG_PID")
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def ready(self) -> None:
        self._send("READY=1")

    def status(self, text: str) -> None:
        # One datagram holds newline-separated assignments; keep the text on one line.
        self._send("STATUS=" + " ".join(text.splitlines()))

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def reloading(self) -> None:
        """Announce a reload; send `ready` again once the new config is in effect."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def extend_start(self, seconds: float) -> None:
        """Ask for ``seconds`` more of start-up time (TimeoutStartSec) from now."""
        self._send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def watchdog_interval(self) -> float | None:
        """The recommended ping period in seconds: half of WatchdogSec, as sd_watchdog_enabled(3).

        None when the watchdog is off or meant for another process.
        """
        if self._watchdog_pid is not None and self._watchdog_pid != str(os.getpid()):
            return None
        try:
            usec = int(self._watchdog_usec or "0")
        except ValueError:
            return None
        return usec / 2_000_000 if usec > 0 else None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _send(self, message: str) -> None:
        if self._address is None:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
            self._sock.sendto(message.encode(), self._address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                logger.warning(
                    "systemd 알림 전송 실패(이후 실패는 기록하지 않음): %s (%s)",
                    message.split("\n", 1)[0],
                    exc,
                )


class ProgressWatchdog:
    """Gates WATCHDOG=1 on progress, so the watchdog is not a free-running timer.

    Feed it a counter that moves while the tree is healthy (e.g. the sum of
    actor heartbeats). Any change counts as progress, so a counter that starts
    over after a reload does not stall it.
    """

    def __init__(self, period: float) -> None:
        if period <= 0:
            raise ValueError(f"period must be > 0, got {period!r}")
        self._period = period
        self._progress: int | None = None
        self._changed_at: float | None = None
        self._pinged_progress: int | None = None
        self._pinged_at: float | None = None

    def observe(self, progress: int, now: float) -> None:
        if progress != self._progress:
            self._progress = progress
            self._changed_at = now

    def should_ping(self, now: float) -> bool:
        """True when progress moved since the last ping and `period` has passed.

        A True answer records the ping, so ask once per ping actually sent.
        """
        if self._progress is None or self._progress == self._pinged_progress:
            return False
        if self._pinged_at is not None and now - self._pinged_at < self._period:
            return False
        self._pinged_progress = self._progress
        self._pinged_at = now
        return True

    def should_ping_in_outage(self, now: float) -> bool:
        """True once per `period` while Redis is unreachable.

        No heartbeat can advance while Redis is away, and restarting the
        supervisor would not bring Redis back: the supervisor's own loop
        running is then the proof of health, so an outage of any length does
        not get the service killed. Progress gates the pings again once
        Redis answers.
        """
        if self._pinged_at is not None and now - self._pinged_at < self._period:
            return False
        self._pinged_at = now
        return True

    def stalled_for(self, now: float) -> float:
        """Seconds since progress last changed (0 before the first observation)."""
        return 0.0 if self._changed_at is None else now - self._changed_at


def _socket_address(value: str) -> str | None:
    """NOTIFY_SOCKET as a socket address: a path, or '@name' for the abstract namespace."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value:
        logger.warning("지원하지 않는 NOTIFY_SOCKET 주소라 systemd 알림을 끕니다: %s", value)
    return None
