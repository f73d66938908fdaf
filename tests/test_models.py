"""The request/response models, the key schema and the exception tree (no Redis needed)."""

from __future__ import annotations

import json
import math
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from actors.exceptions import (
    BackpressureException,
    DuplicateTaskException,
    InvalidTaskException,
    QueueConnectionException,
    QueueError,
    RateLimited,
    TaskTimeoutException,
)
from actors.keys import KeySpace
from actors.models import ScrapingRequest, ScrapingResponse, TaskStatus, ensure_json

# -- ScrapingRequest -------------------------------------------------------------


def test_request_defaults_follow_the_contract() -> None:
    request = ScrapingRequest(script_name="echo")

    assert str(uuid.UUID(request.request_id)) == request.request_id
    assert uuid.UUID(request.request_id).version == 4
    assert uuid.UUID(request.request_id).variant == uuid.RFC_4122
    assert request.parameters == {}
    assert request.script_version is None
    assert request.timeout == 300
    assert request.priority == 0
    assert request.max_retries == 3
    assert request.expires_in is None
    assert request.rate_key is None
    assert request.created_at.tzinfo is not None


def test_each_request_gets_its_own_id() -> None:
    ids = {ScrapingRequest(script_name="echo").request_id for _ in range(100)}

    assert len(ids) == 100


@pytest.mark.parametrize("request_id", ["a", "A-b_9", "x" * 64])
def test_request_id_of_the_safe_charset_is_accepted(request_id: str) -> None:
    assert ScrapingRequest(request_id=request_id, script_name="echo").request_id == request_id


@pytest.mark.parametrize(
    "request_id",
    ["a:b", "a*", "a b", "", "x" * 65, "x" * 10_240, "a{b}", "é"],
    ids=["colon", "star", "space", "empty", "65-chars", "10-KB", "braces", "non-ascii"],
)
def test_request_id_outside_the_safe_charset_is_rejected_naming_request_id(
    request_id: str,
) -> None:
    with pytest.raises(InvalidTaskException) as caught:
        ScrapingRequest(request_id=request_id, script_name="echo")

    assert caught.value.field == "request_id"
    assert str(caught.value).startswith("request_id:")


@pytest.mark.parametrize(
    "parameters",
    [{"x": math.nan}, {"x": math.inf}, {"x": [1, -math.inf]}, {"x": {1, 2}}, {"x": b"raw"}],
    ids=["nan", "inf", "nested-inf", "set", "bytes"],
)
def test_parameters_that_are_not_strict_json_are_rejected(parameters: dict[str, Any]) -> None:
    with pytest.raises(InvalidTaskException) as caught:
        ScrapingRequest(script_name="echo", parameters=parameters)

    assert caught.value.field == "parameters"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("priority", 1001),
        ("priority", -1001),
        ("max_retries", -1),
        ("max_retries", 101),
        ("timeout", 0),
        ("timeout", math.inf),
        ("timeout", math.nan),
        ("expires_in", 0),
        ("expires_in", math.inf),
        ("expires_in", 1.7e308),  # x 1000 overflowed to inf: OverflowError at enqueue
        ("expires_in", 365 * 86400 + 1),
        ("script_name", "has space"),
        ("script_version", "v" * 65),
        ("rate_key", "bad key"),
    ],
)
def test_out_of_range_field_is_rejected_naming_it(field: str, value: Any) -> None:
    with pytest.raises(InvalidTaskException) as caught:
        ScrapingRequest(**{"script_name": "echo", field: value})

    assert caught.value.field == field


def test_unknown_field_is_rejected_naming_it() -> None:
    with pytest.raises(InvalidTaskException) as caught:
        ScrapingRequest(**{"script_name": "echo", "colour": "red"})

    assert caught.value.field == "colour"


def test_missing_script_name_is_rejected_naming_it() -> None:
    with pytest.raises(InvalidTaskException) as caught:
        ScrapingRequest(**{})

    assert caught.value.field == "script_name"


def test_request_is_immutable() -> None:
    request = ScrapingRequest(script_name="echo")

    with pytest.raises(ValidationError):
        request.priority = 5  # type: ignore[misc]


def test_request_survives_a_json_round_trip_unchanged() -> None:
    request = ScrapingRequest(
        script_name="fetch.page",
        parameters={"url": "https://example.com/ü", "n": [1, 2.5, None, True]},
        script_version="2",
        timeout=12.5,
        priority=-3,
        max_retries=0,
        expires_in=60,
        rate_key="domain:example.com",
    )

    assert ScrapingRequest.model_validate_json(request.model_dump_json()) == request


# -- ScrapingResponse and TaskStatus --------------------------------------------


def test_response_reads_the_stored_json_shape() -> None:
    stored = (
        '{"request_id":"r1","status":"completed","data":{"a":1},"error":null,'
        '"execution_time":0.25,"completed_at":1700000000.5,"extra":"ignored"}'
    )

    response = ScrapingResponse.model_validate_json(stored)

    assert response.status is TaskStatus.COMPLETED
    assert response.data == {"a": 1}
    assert response.execution_time == 0.25
    assert response.completed_at == datetime.fromtimestamp(1700000000.5, UTC)


def test_response_defaults_are_empty() -> None:
    response = ScrapingResponse(request_id="r1", status=TaskStatus.FAILED)

    assert (response.data, response.error, response.execution_time, response.completed_at) == (
        None,
        None,
        None,
        None,
    )


def test_task_status_values_are_the_contracts() -> None:
    assert {status.value for status in TaskStatus} == {
        "pending",
        "running",
        "retrying",
        "completed",
        "failed",
        "cancelled",
    }


def test_only_completed_failed_and_cancelled_are_terminal() -> None:
    terminal = {status for status in TaskStatus if status.is_terminal}

    assert terminal == {TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED}


# -- ensure_json -----------------------------------------------------------------


def test_ensure_json_is_compact_and_keeps_unicode() -> None:
    assert ensure_json({"a": [1, "é"]}, "data") == '{"a":[1,"é"]}'


def test_ensure_json_names_the_field_it_rejects() -> None:
    with pytest.raises(InvalidTaskException) as caught:
        ensure_json({"when": datetime.now(UTC)}, "data")

    assert caught.value.field == "data"


def test_ensure_json_output_is_parseable_by_strict_json() -> None:
    text = ensure_json({"x": 1.5e300, "y": -0.0}, "data")

    assert json.loads(text) == {"x": 1.5e300, "y": -0.0}


# -- KeySpace ------------------------------------------------------------------------


def test_every_key_of_a_queue_shares_one_cluster_hash_tag() -> None:
    keys = KeySpace("scraping", "default")
    names = [
        keys.pending,
        keys.running,
        keys.delayed,
        keys.dead,
        keys.seq,
        keys.stats,
        keys.workers,
        keys.reaper_lock,
        keys.governor_lock,
        keys.task("r1"),
        keys.worker("w1"),
    ]

    assert all(name.startswith("scraping:{default}:") for name in names)
    assert len(set(names)) == len(names)


def test_channels_and_per_id_keys_are_distinct_per_id() -> None:
    keys = KeySpace("p")

    assert keys.task("a") != keys.task("b")
    assert keys.done("a") == keys.done_prefix + "a"
    assert keys.worker("w") == keys.worker_prefix + "w"
    assert len({keys.events, keys.wake, keys.done("a")}) == 3


def test_script_context_is_the_shared_argv_prefix() -> None:
    keys = KeySpace("p")

    assert keys.script_context() == [keys.task_prefix, keys.events, keys.done_prefix, keys.wake]


def test_two_queues_or_prefixes_never_share_a_key() -> None:
    assert KeySpace("p", "a").pending != KeySpace("p", "b").pending
    assert KeySpace("p1").pending != KeySpace("p2").pending


@pytest.mark.parametrize(
    ("prefix", "queue", "field"),
    [
        ("a{b", "default", "redis.key_prefix"),
        ("p", "q:1", "queue"),
        ("", "default", "redis.key_prefix"),
    ],
)
def test_key_space_rejects_names_that_would_break_the_hash_tag(
    prefix: str, queue: str, field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        KeySpace(prefix, queue)


# -- exceptions -------------------------------------------------------------------


def test_every_queue_error_derives_from_one_base() -> None:
    errors: list[Exception] = [
        QueueConnectionException("down"),
        InvalidTaskException("parameters", "too big"),
        DuplicateTaskException("r1"),
        BackpressureException(2.5),
        TaskTimeoutException("r1", 3.0),
    ]

    assert all(isinstance(error, QueueError) for error in errors)


def test_duplicate_task_is_an_invalid_task_naming_request_id() -> None:
    error = DuplicateTaskException("r1")

    assert isinstance(error, InvalidTaskException)
    assert error.field == "request_id"
    assert error.request_id == "r1"
    assert "r1" in str(error)


def test_exceptions_carry_their_numbers() -> None:
    assert BackpressureException(2.5).retry_after == 2.5
    assert "2.50" in str(BackpressureException(2.5))
    timeout = TaskTimeoutException("r1", 3.0)
    assert (timeout.request_id, timeout.timeout) == ("r1", 3.0)
    assert RateLimited(7.0).retry_after == 7.0
