"""``supervisor start``: embedded Redis, start-up checks, metrics, then the process tree.

Order matters. The embedded redis-server is started here in the main thread
(its parent-death signal is tied to the thread that forks it) before the
event loop, and stopped last, after every actor has drained and handed its
tasks back.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import uvloop

from actors.backoff import jittered
from actors.endpoint import redacted
from actors.exceptions import (
    PartitionLayoutMismatch,
    QueueConnectionException,
    RedisRightsMissing,
)
from actors.exit_codes import CliExit
from actors.queue import RedisQueue
from actors.rights import WORKER_HOST_PROBED
from config.settings import Settings
from supervisor.embedded import remember_external, should_start_embedded, start_embedded
from supervisor.logs import configure_logging
from supervisor.metrics import MetricsServer, start_metrics_server
from supervisor.notify import SystemdNotifier
from supervisor.process_backend import SpawnBackend
from supervisor.redis_checks import (
    EpochGuard,
    EvictionPolicyError,
    ServerVersionError,
    check_eviction_policy,
    check_server_version,
)
from supervisor.redis_server import RedisServer, RedisServerError
from supervisor.signals import SignalCommands
from supervisor.tree import ProcessTree

logger = logging.getLogger(__name__)

#: The longest wait between two tries to reach Redis at start-up (seconds).
START_WAIT_CAP = 10.0
#: While waiting for Redis at start-up, one log line this often (seconds).
START_WAIT_LOG_EVERY = 30.0


def run_supervisor(settings: Settings, config_path: Path | None) -> int:
    """Run the supervisor in the foreground until drained; returns its exit status.

    ``config_path`` is the file SIGHUP re-reads (None: defaults and env only).
    Must be called from the main thread.
    """
    if not logging.getLogger().handlers:  # the CLI has configured it already
        configure_logging()
    try:
        embedded = _start_embedded(settings)
    except ValueError as exc:
        logger.error("내장 Redis 설정 오류: %s", exc)
        return CliExit.USAGE
    except RedisServerError as exc:
        logger.error("내장 Redis를 시작할 수 없습니다: %s", exc)
        return CliExit.REDIS_UNREACHABLE
    try:
        return uvloop.run(_serve(settings, config_path, own_redis=embedded is not None))
    finally:
        if embedded is not None:
            embedded.stop()


def _start_embedded(settings: Settings) -> RedisServer | None:
    if settings.redis.sentinel:  # the Sentinels say where Redis is: never one of ours
        return None
    state_dir = settings.supervisor.state_dir
    if not should_start_embedded(settings.redis.embedded, settings.redis.url, state_dir):
        return None
    return start_embedded(settings.redis.url, settings.supervisor.state_dir)


def _start_metrics(settings: Settings, queue: RedisQueue) -> MetricsServer | None:
    """The /metrics server; a port that cannot be bound is logged, not fatal."""
    try:
        return start_metrics_server(settings, queue)
    except OSError as exc:
        logger.error(
            "메트릭 포트 %d 를 열 수 없어 메트릭 없이 계속합니다: %s",
            settings.supervisor.metrics_port,
            exc,
        )
        return None


def _loader(config_path: Path | None) -> Settings:
    return Settings.from_file(config_path) if config_path is not None else Settings()


async def _serve(settings: Settings, config_path: Path | None, *, own_redis: bool) -> int:
    with SignalCommands() as signals:
        return await _connect_and_supervise(settings, config_path, signals, own_redis)


async def _connect_and_supervise(
    settings: Settings, config_path: Path | None, signals: SignalCommands, own_redis: bool
) -> int:
    url = redacted(settings.redis.url)
    queue = RedisQueue(settings, rights=WORKER_HOST_PROBED, adopt_layout=True)
    metrics = None
    with SystemdNotifier() as notifier:
        try:
            epoch = await _wait_for_redis(queue, settings, notifier, signals, url)
            if epoch is None or signals.stop_requested:
                logger.info("시작 중에 종료 신호를 받아 액터를 시작하지 않고 종료합니다")
                return CliExit.OK
            if settings.redis.embedded == "auto" and not own_redis and not settings.redis.sentinel:
                # Someone else's Redis serves this address: never replace it with ours.
                remember_external(settings.redis.url, settings.supervisor.state_dir)
            metrics = _start_metrics(settings, queue)
            tree = ProcessTree(
                settings,
                queue,
                SpawnBackend(),
                epoch,
                load_settings=lambda: _loader(config_path),
                notifier=notifier,
            )
            signals.forward_to(tree.command)
            return await tree.run()
        except RedisRightsMissing as exc:
            logger.error(
                "Redis 사용자에게 필요한 권한이 없어 시작하지 않습니다: %s (docs/deploy.md 참고)",
                ", ".join(exc.missing),
            )
            return CliExit.USAGE
        except (EvictionPolicyError, ServerVersionError) as exc:
            logger.error("Redis(%s) 설정 때문에 시작을 거부합니다: %s", url, exc)
            return CliExit.USAGE
        except PartitionLayoutMismatch as exc:
            logger.error(
                "파티션 수를 바꿀 수 없어 시작하지 않습니다: 없어질 파티션에 작업 %d건이 남아 "
                "있습니다. 대기열을 비운 뒤 다시 시작하세요: %s",
                exc.stranded,
                exc,
            )
            return CliExit.USAGE
        finally:
            if metrics is not None:
                await asyncio.to_thread(metrics.close)
            await queue.close()


async def _wait_for_redis(
    queue: RedisQueue,
    settings: Settings,
    notifier: SystemdNotifier,
    signals: SignalCommands,
    url: str,
) -> EpochGuard | None:
    """Connect to Redis and check it, however long it takes to answer.

    A Redis that cannot be reached is retried with capped, jittered backoff
    (a restart of the service would only meet the same outage, and systemd's
    start limit would leave it failed); a Korean log line every 30 s and the
    systemd STATUS= say so, and the start-up timeout is extended while
    waiting. Returns None when a stop signal ends the wait. A Redis that
    answers but is unusable (an evicting policy, too old, an ACL without a
    needed right) raises: waiting would not fix it.
    """
    loop = asyncio.get_running_loop()
    started = last_log = loop.time()
    failures = 0
    while True:
        try:
            return await _connect_and_check(queue, settings, url)
        except (RedisRightsMissing, PartitionLayoutMismatch):
            raise
        except QueueConnectionException as exc:
            await queue.close()
            failures += 1
            waited = loop.time() - started
            if failures == 1 or loop.time() - last_log >= START_WAIT_LOG_EVERY:
                last_log = loop.time()
                logger.warning(
                    "Redis(%s)에 연결할 수 없어 기다리는 중 (%.0f초째, 계속 재시도): %s",
                    url,
                    waited,
                    exc,
                )
            notifier.status(f"Redis 연결 대기 중 ({waited:.0f}초째): {url}")
            notifier.extend_start(START_WAIT_CAP * 3)
            notifier.watchdog()  # our own loop is alive; only Redis is away
            resume_at = loop.time() + jittered(failures, 0.5, START_WAIT_CAP)
            while loop.time() < resume_at:
                if signals.stop_requested:
                    return None
                await asyncio.sleep(min(0.2, resume_at - loop.time()))


async def _connect_and_check(queue: RedisQueue, settings: Settings, url: str) -> EpochGuard:
    """Connect (rights checked), check the server, publish the limits; the epoch guard."""
    await queue.connect()  # raises RedisRightsMissing for an ACL without a right we need
    version = await check_server_version(queue.connection)
    logger.info("Redis %s 연결됨: %s", version, url)
    await check_eviction_policy(queue.connection)
    epoch = EpochGuard(queue.connection, queue.partitions)
    await epoch.establish()
    await queue.publish_settings(settings)
    return epoch
