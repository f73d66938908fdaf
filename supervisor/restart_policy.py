"""The restart policy of the process tree, as a pure state machine.

Events go in (`spawned`, `exited`, `stopping`, `forget`, `tick`), actions come
out (`Spawn`, `Fatal`, `GiveUp`). The clock is injected: every event carries
``now`` (seconds on a monotonic clock), so the policy is tested without
processes, sleeps or an event loop.

Per child (supervisord's state machine)::

    STARTING --(up `startsecs`)--> RUNNING
    STARTING / RUNNING --exit--> BACKOFF --(delay elapsed, `tick`)--> STARTING
    STARTING / RUNNING --CONFIG_ERROR--> FATAL       (never restarted)
    STARTING / RUNNING --RECYCLE--> STARTING         (at once, not counted)
    STARTING / RUNNING --`stopping`--> STOPPING --exit--> STOPPED

Any other exit code (a crash, Redis unavailable, a signal, even 0 when the
child was not asked to stop) is a restart with backoff: 0.5 s, 1 s, 2 s, ...
capped at `backoff_max`. A child that stayed up `stable_after` seconds before
exiting starts over at the first delay.

OTP-style intensity covers the whole tree: more than `max_restarts` counted
restarts within `restart_window` seconds yields `GiveUp`; the supervisor then
stops every child and exits non-zero, leaving the next step to its own
supervisor (systemd's ``Restart=on-failure``).
"""

from collections import deque
from dataclasses import dataclass
from enum import StrEnum

from actors.exit_codes import ChildExit


class ChildState(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FATAL = "fatal"


@dataclass(frozen=True, slots=True)
class Spawn:
    """Start the child now, then report it with `RestartPolicy.spawned`."""

    child: str


@dataclass(frozen=True, slots=True)
class Fatal:
    """The child will not be restarted; the supervisor decides what that means."""

    child: str
    reason: str


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Restart intensity exceeded: stop every child and exit non-zero."""

    reason: str


Action = Spawn | Fatal | GiveUp


@dataclass(slots=True)
class _Child:
    state: ChildState
    started_at: float
    delay: float = 0.0
    """The last backoff delay; 0 means the next failure starts at the first delay."""
    due: float = 0.0
    """When a BACKOFF child is to be spawned again."""


class RestartPolicy:
    def __init__(
        self,
        max_restarts: int,
        restart_window: float,
        backoff_max: float,
        *,
        backoff_initial: float = 0.5,
        startsecs: float = 1.0,
        stable_after: float = 10.0,
    ) -> None:
        _require(max_restarts >= 0, "max_restarts", max_restarts, ">= 0")
        _require(restart_window > 0, "restart_window", restart_window, "> 0")
        _require(backoff_max >= 0, "backoff_max", backoff_max, ">= 0")
        _require(backoff_initial > 0, "backoff_initial", backoff_initial, "> 0")
        _require(startsecs >= 0, "startsecs", startsecs, ">= 0")
        _require(stable_after >= 0, "stable_after", stable_after, ">= 0")
        self._max_restarts = max_restarts
        self._window = restart_window
        self._backoff_max = backoff_max
        self._backoff_initial = backoff_initial
        self._startsecs = startsecs
        self._stable_after = stable_after
        self._children: dict[str, _Child] = {}
        self._restarts: deque[float] = deque()
        self._gave_up = False

    def spawned(self, child: str, now: float) -> None:
        """Record that `child` was started at `now`; an unknown name is added."""
        record = self._children.get(child)
        if record is None:
            self._children[child] = _Child(ChildState.STARTING, started_at=now)
        else:
            record.state = ChildState.STARTING
            record.started_at = now

    def stopping(self, child: str) -> None:
        """Mark `child` as being stopped on purpose: its exit is not restarted."""
        record = self._record(child)
        if record.state in (ChildState.STARTING, ChildState.RUNNING):
            record.state = ChildState.STOPPING
        elif record.state is ChildState.BACKOFF:
            record.state = ChildState.STOPPED

    def forget(self, child: str) -> None:
        """Drop `child` entirely (pool shrink); a later exit of it is ignored."""
        self._children.pop(child, None)

    def exited(self, child: str, code: int, now: float) -> list[Action]:
        """Decide what follows the exit of `child` with exit status `code`.

        Returns `Spawn` for a recycle, `Fatal` for a configuration error,
        `GiveUp` when intensity is exceeded, and nothing for an expected stop
        or a backoff restart (that `Spawn` comes from `tick` when it is due).
        Exits of unknown or forgotten children are ignored.
        """
        record = self._children.get(child)
        if record is None or record.state in (ChildState.BACKOFF, ChildState.FATAL):
            return []
        if self._gave_up or record.state in (ChildState.STOPPING, ChildState.STOPPED):
            record.state = ChildState.STOPPED
            return []
        if now - record.started_at >= self._stable_after:
            record.delay = 0.0
        if code == ChildExit.CONFIG_ERROR:
            record.state = ChildState.FATAL
            return [Fatal(child, f"{child} exited with CONFIG_ERROR ({code})")]
        if code == ChildExit.RECYCLE:
            record.state = ChildState.STARTING
            record.started_at = now
            return [Spawn(child)]
        if self._count_restart(now):
            self._gave_up = True
            record.state = ChildState.STOPPED
            return [
                GiveUp(
                    f"{len(self._restarts)} restarts within {self._window:g}s exceed "
                    f"max_restarts={self._max_restarts} (last: {child} exited with {code})"
                )
            ]
        record.delay = (
            min(self._backoff_initial, self._backoff_max)
            if record.delay == 0.0
            else min(record.delay * 2, self._backoff_max)
        )
        record.state = ChildState.BACKOFF
        record.due = now + record.delay
        return []

    def tick(self, now: float) -> list[Action]:
        """Promote children that stayed up `startsecs`; spawn those whose backoff is over."""
        if self._gave_up:
            return []
        due: list[tuple[float, str]] = []
        for name, record in self._children.items():
            if record.state is ChildState.STARTING and now - record.started_at >= self._startsecs:
                record.state = ChildState.RUNNING
            elif record.state is ChildState.BACKOFF and now >= record.due:
                due.append((record.due, name))
        actions: list[Action] = []
        for _, name in sorted(due):
            self.spawned(name, now)
            actions.append(Spawn(name))
        return actions

    def next_deadline(self) -> float | None:
        """The earliest time at which `tick` has something to do, if any."""
        if self._gave_up:
            return None
        deadlines = [
            record.started_at + self._startsecs
            if record.state is ChildState.STARTING
            else record.due
            for record in self._children.values()
            if record.state in (ChildState.STARTING, ChildState.BACKOFF)
        ]
        return min(deadlines, default=None)

    def state(self, child: str) -> ChildState:
        return self._record(child).state

    def states(self) -> dict[str, ChildState]:
        """A snapshot of every known child's state (for STATUS= and `status`)."""
        return {name: record.state for name, record in self._children.items()}

    def _count_restart(self, now: float) -> bool:
        """Record a counted restart at `now`; True when intensity is exceeded."""
        while self._restarts and now - self._restarts[0] >= self._window:
            self._restarts.popleft()
        self._restarts.append(now)
        return len(self._restarts) > self._max_restarts

    def _record(self, child: str) -> _Child:
        try:
            return self._children[child]
        except KeyError:
            raise KeyError(f"child: unknown child {child!r}") from None


def _require(ok: bool, field: str, value: float, bound: str) -> None:
    if not ok:
        raise ValueError(f"{field} must be {bound}, got {value!r}")
