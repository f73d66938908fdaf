"""The ``supervisor`` command line: parsing, settings, and errors turned into exit codes.

Each subcommand lives in a ``cli_*`` module and returns its exit status; the
contract's exceptions are mapped to the contract's exit codes here, once, and
any other exception to one line on stderr and ``CliExit.INTERNAL``.
See docs/cli.md.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from actors.endpoint import redacted
from actors.exceptions import (
    BackpressureException,
    InvalidTaskException,
    NotReplicatedException,
    PartitionLayoutMismatch,
    QueueConnectionException,
    QueueError,
    TaskTimeoutException,
)
from actors.exit_codes import CliExit
from config.settings import CONFIG_ENV, ConfigError, Settings
from supervisor import cli_dlq, cli_status, cli_tasks
from supervisor.cli_common import Handler, eprint, package_version
from supervisor.logs import configure_logging, escape_controls

logger = logging.getLogger(__name__)

#: Commands that follow the queue until interrupted; Ctrl-C ends them with exit 0.
_FOLLOWING = frozenset({"events", "status"})

#: The stderr log level without ``--log-level``: routine commands print only
#: warnings and errors; ``start`` logs what it does, its log is what operators read.
DEFAULT_LOG_LEVEL = "WARNING"
START_LOG_LEVEL = "INFO"


def default_log_level(command: str | None) -> str:
    """The log level of ``command`` when ``--log-level`` is not given."""
    return START_LOG_LEVEL if command == "start" else DEFAULT_LOG_LEVEL


def build_parser() -> argparse.ArgumentParser:
    # The global options are accepted before and after the subcommand. The
    # copies on the subcommands default to SUPPRESS so that an option given
    # before the subcommand is not overwritten by the subcommand's default.
    common = argparse.ArgumentParser(add_help=False)
    _add_global_options(common, suppress=True)
    parser = argparse.ArgumentParser(
        prog="supervisor",
        description="Run and operate a scrapeq task queue.",
        epilog="Exit status: 0 ok, 1 task failed or not found, 2 usage or config error, "
        "3 timeout, 4 rejected by backpressure, 5 Redis unreachable, "
        f"{CliExit.INTERNAL} unexpected internal error.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    _add_global_options(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    start = commands.add_parser(
        "start",
        parents=[common],
        help="run the supervisor in the foreground",
        description="Run the supervisor and its actor processes in the foreground. "
        "SIGTERM/SIGINT drain and exit 0 (a second one stops at once), SIGHUP reloads "
        "the config file, SIGTTIN/SIGTTOU add/remove a worker process.",
    )
    start.set_defaults(handler=None)
    cli_tasks.register(commands, common)
    cli_status.register(commands, common)
    cli_dlq.register(commands, common)
    return parser


def _add_global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        default=argparse.SUPPRESS if suppress else None,
        help=f"TOML config file (default: ${CONFIG_ENV}, else built-in defaults)",
    )
    parser.add_argument(
        "--log-level",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        type=str.upper,
        # None (not given) lets run() pick the command's default level.
        default=argparse.SUPPRESS if suppress else None,
        help=f"stderr log level (default {DEFAULT_LOG_LEVEL}; {START_LOG_LEVEL} for start)",
    )


def load_settings(config: Path | None) -> tuple[Settings, Path | None]:
    """The settings and the file they came from (``--config``, else ``$SUPERVISOR_CONFIG``)."""
    path = config or (Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None)
    return (Settings.from_file(path) if path else Settings()), path


def run(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit status (see ``CliExit``)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else CliExit.USAGE
    configure_logging(args.log_level or default_log_level(args.command))
    try:
        settings, config_path = load_settings(args.config)
    except ConfigError as exc:
        return report(exc, None)
    except Exception as exc:  # any other error: one line, not a traceback
        return report_unexpected(exc, None, args.command)
    handler: Handler | None = args.handler
    try:
        if handler is None:
            from supervisor.app import run_supervisor  # noqa: PLC0415 -- only `start` needs it

            return run_supervisor(settings, config_path)
        return asyncio.run(handler(args, settings))
    except KeyboardInterrupt:
        return CliExit.OK if args.command in _FOLLOWING else 130
    except BrokenPipeError:
        # The reader went away (`supervisor status | head`): not an error of the
        # command. Later writes (at exit, Python flushes stdout) go nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return CliExit.OK
    except (ConfigError, QueueError) as exc:
        return report(exc, settings, args.command)
    except Exception as exc:  # any other error: one line, not a traceback
        return report_unexpected(exc, settings, args.command)


def report(
    exc: ConfigError | QueueError, settings: Settings | None, command: str | None = None
) -> int:
    """Explain ``exc`` on stderr (a Korean log line and an English message); its exit status.

    A ``QueueError`` the contract maps to no exit status (``ScriptError``, a
    subclass added later) is reported as unexpected (``report_unexpected``).
    """
    if isinstance(exc, ConfigError):
        logger.error("설정 오류: %s", exc)
        eprint(f"error: configuration: {exc}")
        return CliExit.USAGE
    if isinstance(exc, PartitionLayoutMismatch):
        logger.error("파티션 수가 Redis의 대기열과 다름: %s", exc)
        eprint(f"error: configuration: {exc}")
        return CliExit.USAGE
    if isinstance(exc, InvalidTaskException):
        logger.error("잘못된 작업 (%s): %s", exc.field, exc)
        eprint(f"error: invalid task: {exc}")
        return CliExit.USAGE
    if isinstance(exc, BackpressureException):
        logger.warning("백프레셔로 거부됨, %.2f초 후 재시도", exc.retry_after)
        eprint(f"error: rejected by backpressure: {exc}")
        return CliExit.BACKPRESSURE
    if isinstance(exc, TaskTimeoutException):
        logger.warning("응답 대기 시간 초과: %s", exc.request_id)
        eprint(f"error: {exc}")
        return CliExit.TIMEOUT
    if isinstance(exc, NotReplicatedException):
        logger.error(
            "복제본 확인 부족 (%d/%d): 장애 조치 시 유실될 수 있음", exc.acknowledged, exc.wanted
        )
        eprint(f"error: not replicated: {exc}")
        return CliExit.REDIS_UNREACHABLE
    if isinstance(exc, QueueConnectionException):
        url = redacted(settings.redis.url) if settings else "the configured URL"
        logger.error("Redis 에 연결할 수 없음: %s", url)
        eprint(f"error: cannot reach Redis at {url}: {exc}")
        return CliExit.REDIS_UNREACHABLE
    return report_unexpected(exc, settings, command)


def report_unexpected(
    exc: Exception, settings: Settings | None = None, command: str | None = None
) -> int:
    """Explain an error no exit status is mapped to, in one stderr line; ``CliExit.INTERNAL``.

    The traceback goes to the log at DEBUG (``--log-level DEBUG`` shows it),
    except for ``start``: its log is the operators' record of a crash, so
    there it is logged at ERROR. The Redis URL's secrets are masked in the line.
    """
    what = f"unexpected {type(exc).__name__}"
    message = escape_controls(str(exc))
    if settings is not None:
        message = _mask_secrets(message, settings.redis.url)
    level = logging.ERROR if command == "start" else logging.DEBUG
    logger.log(level, "예기치 않은 오류 (%s): %s", type(exc).__name__, message, exc_info=exc)
    detail = f"{what}: {message}" if message else what
    hint = "" if level == logging.ERROR else " (--log-level DEBUG shows the traceback)"
    eprint(f"error: {detail}{hint}")
    return CliExit.INTERNAL


def _mask_secrets(text: str, url: str) -> str:
    """``text`` with the URL, and each password it carries, masked (``***``)."""
    try:
        parts = urlsplit(url)
        secrets = [parts.password or ""] + [
            value
            for name, value in parse_qsl(parts.query, keep_blank_values=True)
            if name in ("password", "ssl_password")
        ]
        text = text.replace(url, redacted(url))
    except ValueError:  # a URL urlsplit cannot read: mask it whole
        return text.replace(url, "***")
    for secret in {variant for raw in secrets for variant in (raw, unquote(raw))}:
        if secret:
            text = text.replace(secret, "***")
    return text


def main() -> None:
    """Console-script entry point: ``supervisor ...`` exits with the command's status."""
    sys.exit(run())


if __name__ == "__main__":
    main()
