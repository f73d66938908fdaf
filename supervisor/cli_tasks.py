"""``supervisor submit`` and ``supervisor task``: put one task in, look one task up."""

from __future__ import annotations

import argparse
import json
import logging
import math
from typing import Any

from actors.exceptions import TaskTimeoutException
from actors.exit_codes import CliExit
from actors.models import ScrapingRequest, ScrapingResponse, TaskStatus
from actors.queue import RedisQueue, TaskManager
from config.settings import Settings
from supervisor.cli_common import Subcommands, eprint, format_time, print_json

logger = logging.getLogger(__name__)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_value(text: str) -> Any:
    """A ``-p`` value: JSON when it parses as JSON (``3``, ``true``, ``"x"``), else the text."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError:
        return text


def parse_param(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, parse_value(value)


def parse_params(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def register(commands: Subcommands, common: argparse.ArgumentParser) -> None:
    submit = commands.add_parser(
        "submit",
        parents=[common],
        help="enqueue a task",
        description="Enqueue a task for SCRIPT and print its request id. With --wait, "
        "also wait for the task to finish and print its response; the exit status is "
        "0 when it completed, 1 when it failed or was cancelled, 3 when the wait timed out.",
    )
    submit.add_argument("script", metavar="SCRIPT", help="name of a registered script")
    submit.add_argument(
        "-p",
        dest="param",
        metavar="KEY=VALUE",
        type=parse_param,
        action="append",
        default=[],
        help="a parameter; VALUE is parsed as JSON when it is JSON (3, true, null, "
        "'\"3\"'), else taken as a string; repeatable, and wins over --params",
    )
    submit.add_argument(
        "--params",
        type=parse_params,
        default={},
        metavar="JSON",
        help="parameters as a JSON object",
    )
    submit.add_argument("--priority", type=int, help="higher runs first (default 0)")
    submit.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help="seconds one attempt may run (default: tasks.default_timeout)",
    )
    submit.add_argument(
        "--max-retries",
        type=int,
        metavar="N",
        help="retries after a failure (default: tasks.max_retries)",
    )
    submit.add_argument("--wait", action="store_true", help="wait for the response and print it")
    submit.add_argument(
        "--wait-timeout",
        type=float,
        metavar="S",
        help="with --wait: give up after S seconds, exit 3 (default: wait as long as it takes)",
    )
    submit.add_argument("--json", action="store_true", help="print JSON to stdout")
    submit.set_defaults(handler=submit_task)

    task = commands.add_parser(
        "task",
        parents=[common],
        help="show one task",
        description="Show the status, attempts, errors and response of one task. "
        "Exit status 1 when no task has that id (or its record has expired).",
    )
    task.add_argument("request_id", metavar="REQUEST_ID")
    task.add_argument("--json", action="store_true", help="print the task record as JSON")
    task.set_defaults(handler=show_task)


async def submit_task(args: argparse.Namespace, settings: Settings) -> int:
    options: dict[str, Any] = {
        name: getattr(args, name)
        for name in ("priority", "timeout", "max_retries")
        if getattr(args, name) is not None
    }
    request = ScrapingRequest(
        script_name=args.script, parameters=args.params | dict(args.param), **options
    )
    async with RedisQueue(settings) as queue:
        request_id = await queue.enqueue_task(request)
        logger.info("작업 제출됨: %s (%s)", request_id, request.script_name)
        if not args.wait:
            if args.json:
                print_json({"request_id": request_id})
            else:
                print(request_id)
            return CliExit.OK
        if not args.json:
            print(request_id, flush=True)
        timeout = math.inf if args.wait_timeout is None else args.wait_timeout
        try:
            response = await queue.wait_for_response(request_id, timeout)
        except TaskTimeoutException as exc:
            logger.warning("작업 %s 응답 대기 시간 초과", request_id)
            eprint(f"error: {exc}")
            return CliExit.TIMEOUT
    if args.json:
        print_json(response.model_dump(mode="json"))
    else:
        print_response(response)
    return CliExit.OK if response.status is TaskStatus.COMPLETED else CliExit.TASK_FAILED


def print_response(response: ScrapingResponse) -> None:
    print(f"status: {response.status}")
    if response.execution_time is not None:
        print(f"execution_time: {response.execution_time:.3f}s")
    if response.error is not None:
        print(f"error: {response.error}")
    print(f"data: {json.dumps(response.data, ensure_ascii=False)}")


async def show_task(args: argparse.Namespace, settings: Settings) -> int:
    async with RedisQueue(settings) as queue:
        record = await TaskManager(queue).get_task(args.request_id)
    if record is None:
        logger.warning("작업을 찾을 수 없음: %s", args.request_id)
        eprint(f"task not found: {args.request_id}")
        return CliExit.TASK_FAILED
    record = {"request_id": args.request_id, **record}
    if args.json:
        print_json(record)
    else:
        print_record(record)
    return CliExit.OK


def print_record(record: dict[str, Any]) -> None:
    """The fields an operator looks at first, then the response and failure history."""
    print(f"request_id: {record['request_id']}")
    request = record.get("request")
    if isinstance(request, dict):
        print(f"script: {request.get('script_name')}")
        print(f"parameters: {json.dumps(request.get('parameters'), ensure_ascii=False)}")
    print(f"status: {record.get('status')}")
    print(f"attempt: {record.get('attempt')} (max_retries {record.get('max_retries')})")
    for name in ("enqueued_at", "started_at", "finished_at"):
        if str(record.get(name, "")).isdigit():
            print(f"{name}: {format_time(int(record[name]) / 1000)}")
    for name in ("worker", "error"):
        if record.get(name):
            print(f"{name}: {record[name]}")
    if "response" in record:
        print(f"response: {json.dumps(record['response'], ensure_ascii=False)}")
    history = record.get("history")
    if isinstance(history, list) and history:
        print("history:")
        for entry in history:
            at = format_time(entry["at"]) if isinstance(entry.get("at"), int | float) else "?"
            worker, error = entry.get("worker"), entry.get("error")
            print(f"  attempt {entry.get('attempt')} at {at} on {worker}: {error}")
