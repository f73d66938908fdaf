"""``supervisor dlq list | retry | purge``: the dead-letter queue."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from actors.exit_codes import CliExit
from actors.queue import RedisQueue, TaskManager
from config.settings import Settings
from supervisor.cli_common import Subcommands, eprint, positive_int, print_json, print_table

logger = logging.getLogger(__name__)

#: Longest error text the ``dlq list`` table shows; ``task ID`` shows all of it.
ERROR_WIDTH = 80


def register(commands: Subcommands, common: argparse.ArgumentParser) -> None:
    dlq = commands.add_parser(
        "dlq",
        parents=[common],
        help="list, retry or purge dead-lettered tasks",
        description="Tasks that failed permanently (retries spent, unknown script, "
        "invalid record) wait in the dead-letter queue until retried or purged.",
    )
    actions = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")

    listing = actions.add_parser("list", parents=[common], help="show dead letters, newest first")
    listing.add_argument("--json", action="store_true", help="print a JSON array of task records")
    listing.add_argument(
        "--limit", type=positive_int, default=100, metavar="N", help="show at most N (default 100)"
    )
    listing.set_defaults(handler=list_dead_letters)

    retry = actions.add_parser(
        "retry",
        parents=[common],
        help="requeue dead letters with a fresh set of attempts",
        description="Requeue one dead letter (exit 1 if ID is not in the dead-letter "
        "queue) or, with --all, every one.",
    )
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("request_id", metavar="ID", nargs="?", help="the task to requeue")
    which.add_argument("--all", action="store_true", help="requeue every dead letter")
    retry.add_argument(
        "--json",
        action="store_true",
        help='print one JSON object: {"requeued": N}, plus "request_id" when ID is given',
    )
    retry.set_defaults(handler=retry_dead_letters)

    purge = actions.add_parser(
        "purge",
        parents=[common],
        help="delete every dead letter",
        description="Delete every dead-lettered task and its record, without asking.",
    )
    purge.add_argument("--json", action="store_true", help='print one JSON object: {"purged": N}')
    purge.set_defaults(handler=purge_dead_letters)


async def list_dead_letters(args: argparse.Namespace, settings: Settings) -> int:
    async with RedisQueue(settings) as queue:
        letters = await TaskManager(queue).list_dead_letters(args.limit)
    if args.json:
        print_json(letters)
    elif letters:
        print_table(["request_id", "script", "attempt", "error"], [_row(r) for r in letters])
    else:
        print("dead-letter queue is empty")
    return CliExit.OK


def _row(record: dict[str, Any]) -> list[Any]:
    request = record.get("request")
    script = request.get("script_name") if isinstance(request, dict) else None
    error = str(record.get("error", "")).replace("\n", " ")
    if len(error) > ERROR_WIDTH:
        error = error[: ERROR_WIDTH - 3] + "..."
    return [record["request_id"], script, record.get("attempt"), error]


async def retry_dead_letters(args: argparse.Namespace, settings: Settings) -> int:
    async with RedisQueue(settings) as queue:
        manager = TaskManager(queue)
        if args.all:
            count = await manager.requeue_all_dead_letters()
            logger.info("데드레터 %d개 재등록", count)
            if args.json:
                print_json({"requeued": count})
            else:
                print(f"requeued {count}")
            return CliExit.OK
        if not await manager.requeue_dead_letter(args.request_id):
            logger.warning("데드레터 큐에 없는 작업: %s", args.request_id)
            eprint(f"not in the dead-letter queue: {args.request_id}")
            return CliExit.TASK_FAILED
    logger.info("데드레터 재등록: %s", args.request_id)
    if args.json:
        print_json({"requeued": 1, "request_id": args.request_id})
    else:
        print(f"requeued {args.request_id}")
    return CliExit.OK


async def purge_dead_letters(args: argparse.Namespace, settings: Settings) -> int:
    async with RedisQueue(settings) as queue:
        count = await TaskManager(queue).purge_dead_letters()
    logger.info("데드레터 %d개 삭제", count)
    if args.json:
        print_json({"purged": count})
    else:
        print(f"purged {count}")
    return CliExit.OK
