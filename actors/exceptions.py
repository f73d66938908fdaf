"""The exception tree of the public API.

Every error the queue raises derives from :class:`QueueError`, so a caller can
catch one base; the names below are part of the public contract.
"""

from __future__ import annotations

import contextlib
import email.utils
import time


class QueueError(Exception):
    """Base of every error raised by scrapeq's queue API."""


class QueueConnectionException(QueueError):
    """Redis could not be reached (after the client's retries)."""


class ScriptError(QueueError):
    """Redis refused an operation for another reason (e.g. a corrupt record)."""


class InvalidTaskException(QueueError):
    """A request or result breaks a limit; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class RedisRightsMissing(QueueConnectionException):
    """Redis answers, but its ACL refuses commands scrapeq needs (``missing``, by name).

    Waiting does not help: an operator must grant them (docs/deploy.md).
    """

    def __init__(self, missing: list[str]) -> None:
        super().__init__(
            f"the Redis user may not run {', '.join(missing)}: "
            "grant them (docs/deploy.md, 'ACL users')"
        )
        self.missing = missing


class NotReplicatedException(QueueConnectionException):
    """A durable write (``[redis] durable_enqueue``) reached fewer replicas than asked in time.

    It is on the master, and runs unless a failover comes first: retrying the
    very same enqueue is safe (the same id with the same request counts as
    stored) and waits for the replicas again.
    """

    def __init__(self, wanted: int, acknowledged: int, timeout: float) -> None:
        super().__init__(
            f"only {acknowledged} of {wanted} replicas acknowledged the write within "
            f"{timeout:g} s ([redis] durable_enqueue): a failover now could lose it; retry"
        )
        self.wanted = wanted
        self.acknowledged = acknowledged


class PartitionLayoutMismatch(QueueError):
    """``[redis] partitions`` differs from the layout the queue has in Redis.

    A client with another count would place tasks where no worker looks and
    miss tasks where they are; ``supervisor start`` changes the layout only
    while the partitions it would drop hold no task (``stranded`` = 0).
    """

    def __init__(self, configured: int, stored: int, stranded: int = 0) -> None:
        detail = f"; {stranded} tasks are still in the partitions it would drop" if stranded else ""
        super().__init__(
            f"redis.partitions is {configured}, but the queue in Redis is laid out over "
            f"{stored} partition(s){detail} (docs/deploy.md, 'Changing partitions')"
        )
        self.configured, self.stored, self.stranded = configured, stored, stranded


class DuplicateTaskException(InvalidTaskException):
    """A different task with the same request_id already exists."""

    def __init__(self, request_id: str) -> None:
        super().__init__("request_id", f"a different task with id {request_id!r} already exists")
        self.request_id = request_id


class BackpressureException(QueueError):
    """The queue refused an enqueue; retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: float, reason: str = "queue is closed by backpressure") -> None:
        super().__init__(f"{reason}; retry after {retry_after:.2f}s")
        self.retry_after = retry_after
        self.reason = reason


class TaskTimeoutException(QueueError):
    """No response arrived within the wait's timeout."""

    def __init__(self, request_id: str, timeout: float) -> None:
        super().__init__(f"no response for task {request_id!r} within {timeout}s")
        self.request_id = request_id
        self.timeout = timeout


#: Seconds a site is left alone when it answers 429/503 without a usable Retry-After.
DEFAULT_RETRY_AFTER = 1.0


class RateLimited(Exception):
    """Raised by a script that met HTTP 429 (or 503) / Retry-After.

    The task goes back to the queue without burning an attempt, and its rate
    key pauses for ``retry_after`` seconds on every host (clamped to
    ``[politeness] max_retry_after``). ``status`` is the HTTP status the site
    answered: 503 counts as ``unavailable``, anything else as ``rate_limited``;
    both slow the domain down (docs/rate-limits.md).
    """

    def __init__(self, retry_after: float, status: int = 429) -> None:
        super().__init__(f"rate limited (HTTP {status}); retry after {retry_after:.2f}s")
        self.retry_after = retry_after
        self.status = status

    @classmethod
    def from_header(cls, retry_after: str | None, status: int = 429) -> RateLimited:
        """From an HTTP ``Retry-After`` value: delay-seconds or an HTTP date.

        A missing or unreadable value waits ``DEFAULT_RETRY_AFTER`` seconds;
        a date in the past waits none.
        """
        seconds = DEFAULT_RETRY_AFTER
        if retry_after is not None:
            text = retry_after.strip()
            try:
                seconds = max(0.0, float(text))
            except ValueError:
                with contextlib.suppress(TypeError, ValueError, IndexError):
                    when = email.utils.parsedate_to_datetime(text)
                    seconds = max(0.0, when.timestamp() - time.time())
        return cls(seconds, status)

    @property
    def reason(self) -> str:
        """The throttle reason counted in metrics: ``unavailable`` or ``rate_limited``."""
        return "unavailable" if self.status == 503 else "rate_limited"
