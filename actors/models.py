"""The task and response models of the public API.

A ``ScrapingRequest`` that breaks a rule raises :class:`InvalidTaskException`
naming the field, already at construction; nothing reaches Redis.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

# Defined in actors/defaults.py (the settings use them too, without importing
# the models); the ``as`` form re-exports them for mypy --strict.
from actors.defaults import DEFAULT_MAX_RETRIES as DEFAULT_MAX_RETRIES  # noqa: PLC0414
from actors.defaults import DEFAULT_TIMEOUT as DEFAULT_TIMEOUT  # noqa: PLC0414
from actors.exceptions import InvalidTaskException

#: Request ids end up in key names: a safe charset and length only.
REQUEST_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
SCRIPT_NAME_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
MAX_PRIORITY = 1000  # |priority| bound: keeps the queue score exact in a double
FROM_JSON = "from_json"  # validation context flag: the input is parsed JSON
STORED_ID = "stored_id"  # validation context: the id of a stored request (not in its JSON)


class TaskStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    RETRYING = "retrying"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def new_request_id() -> str:
    """A random (version 4) UUID string, as ``str(uuid.uuid4())`` gives.

    Formatted from the random bytes directly: a third of the cost of
    building a ``UUID`` object, which matters when the Gateway builds
    requests by the tens of thousands a second.
    """
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def invalid_from(exc: ValidationError) -> InvalidTaskException:
    """The first validation error as the contract's exception, naming the field."""
    first = exc.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or "request"
    return InvalidTaskException(field, first["msg"])


def ensure_json(value: Any, field: str) -> str:
    """Serialize ``value`` as strict JSON (no NaN, no pickle-only types)."""
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise InvalidTaskException(field, f"is not JSON-serializable: {exc}") from None


#: The longest ``expires_in`` (seconds): one year.
MAX_EXPIRES_IN = 365 * 86400


class ResultTooLarge(InvalidTaskException):
    """A result over ``max_result_bytes``: the task fails for good (a retry returns as much)."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            "data",
            f"result is over max_result_bytes={limit}: "
            "store big data elsewhere and return a reference",
        )


def stored_result(data: Any, limit: int) -> str:
    """The JSON a task's result is stored as: the one check of what a worker reports.

    Raises ``InvalidTaskException`` (field ``data``) for a value that is not
    JSON and ``ResultTooLarge`` for one over ``limit`` bytes.
    """
    data_json = ensure_json(data, "data")
    if len(data_json) > limit and len(data_json.encode()) > limit:  # len() first: cheap
        raise ResultTooLarge(limit)
    return data_json


class ScrapingRequest(BaseModel):
    """One scraping task as the Gateway submits it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: str = Field(default_factory=new_request_id, pattern=REQUEST_ID_PATTERN)
    script_name: str = Field(pattern=SCRIPT_NAME_PATTERN)
    parameters: dict[str, Any] = Field(default_factory=dict)
    script_version: str | None = Field(default=None, max_length=64)
    timeout: float = Field(default=DEFAULT_TIMEOUT, gt=0, le=7 * 86400, allow_inf_nan=False)
    priority: int = Field(default=0, ge=-MAX_PRIORITY, le=MAX_PRIORITY)
    max_retries: int = Field(default=DEFAULT_MAX_RETRIES, ge=0, le=100)
    # At most a year: a caller waits far less, and Redis's clock math stays in range.
    expires_in: float | None = Field(default=None, gt=0, le=MAX_EXPIRES_IN, allow_inf_nan=False)
    rate_key: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.:-]{1,253}$")
    created_at: datetime = Field(default_factory=_utcnow)

    @model_validator(mode="wrap")
    @classmethod
    def _as_invalid_task(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        # InvalidTaskException is no ValueError, so pydantic lets it through as is.
        try:
            return handler(data)
        except ValidationError as exc:
            raise invalid_from(exc) from None

    @field_validator("parameters")
    @classmethod
    def _parameters_are_json(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        # Parsed from JSON (a stored task), the parameters are JSON already.
        if not (info.context and info.context.get(FROM_JSON)):
            ensure_json(value, "parameters")
        return value

    @model_validator(mode="before")
    @classmethod
    def _stored_id(cls, data: Any, info: ValidationInfo) -> Any:
        # A stored request leaves its id out: the record's key holds it.
        if info.context and STORED_ID in info.context and isinstance(data, dict):
            return {**data, "request_id": info.context[STORED_ID]}
        return data

    @classmethod
    def from_stored(cls, raw: bytes, request_id: str) -> ScrapingRequest:
        """Parse a stored task; raises ValidationError (a ValueError) if it is corrupt."""
        return cls.model_validate_json(raw, context={FROM_JSON: True, STORED_ID: request_id})

    def stored_json(self) -> str:
        """The form kept in Redis: no id (the key has it), no field left at its default."""
        return self.model_dump_json(exclude_defaults=True, exclude={"request_id"})


class ScrapingResponse(BaseModel):
    """The outcome of a task, as stored in Redis and returned to waiters."""

    model_config = ConfigDict(extra="ignore")

    request_id: str
    status: TaskStatus
    data: Any = None
    error: str | None = None
    execution_time: float | None = None
    completed_at: datetime | None = None
