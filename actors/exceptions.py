"""The exception tree of the public API.

Every error the queue raises derives from :class:`QueueError`, so a caller can
catch one base; the names below are part of the public contract.
"""

from __future__ import annotations


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


class RateLimited(Exception):
    """Raised by a script that met HTTP 429 / Retry-After.

    The task goes back to the queue without burning an attempt, and its rate
    key pauses for ``retry_after`` seconds on every host.
    """

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"rate limited; retry after {retry_after:.2f}s")
        self.retry_after = retry_after
