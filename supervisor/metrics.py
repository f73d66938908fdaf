"""Prometheus ``/metrics``: queue depths, task totals, workers and backpressure, read per scrape.

The collector reads Redis with a *synchronous* client: prometheus-client runs
collectors in its HTTP server's own thread, where no event loop runs, and the
supervisor's async client belongs to the supervisor's loop. All the reads are
one pipelined round trip in :func:`read_queue`, the sync twin of
``TaskManager.queue_stats`` plus worker liveness and backpressure.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis
from prometheus_client import CollectorRegistry, start_wsgi_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from actors.keys import KeySpace
from config.settings import Settings
from supervisor.cli_common import BACKPRESSURE_STATES, backpressure_view

logger = logging.getLogger(__name__)

#: A scrape waits at most this long for Redis, well inside Prometheus' default 10 s timeout.
REDIS_TIMEOUT = 3.0


@dataclass(frozen=True, slots=True)
class QueueReading:
    depths: dict[str, int]  # pending, running, retrying, dead_letter
    totals: dict[str, int]  # completed, failed, cancelled, enqueued
    workers: dict[str, int]  # active, inactive
    backpressure: dict[str, Any]  # state, depth[, rate]
    repaired: int  # task records the reaper's sweep found in no queue set


def read_queue(client: redis.Redis, keys: KeySpace, heartbeat_timeout: float) -> QueueReading:
    """Everything one scrape reports, in one round trip.

    A worker counts as inactive once its last heartbeat (the score in the
    workers set, on the Redis clock) is older than ``heartbeat_timeout``.
    """
    pipe = client.pipeline(transaction=False)
    pipe.time()
    for key in (keys.pending, keys.running, keys.delayed, keys.dead):
        pipe.zcard(key)
    pipe.hgetall(keys.stats)
    pipe.zrange(keys.workers, 0, -1, withscores=True)
    pipe.hgetall(keys.backpressure)
    (seconds, micros), pending, running, retrying, dead, stats, beats, pressure = pipe.execute()
    # A counter damaged from outside reads as absent; the scripts restart it.
    counters = {k.decode(): int(v) for k, v in stats.items() if v.lstrip(b"-").isdigit()}
    cutoff_ms = seconds * 1000 + micros // 1000 - heartbeat_timeout * 1000
    active = sum(1 for _, last_ms in beats if last_ms >= cutoff_ms)
    return QueueReading(
        depths={"pending": pending, "running": running, "retrying": retrying, "dead_letter": dead},
        totals={
            name: counters.get(name, 0) for name in ("completed", "failed", "cancelled", "enqueued")
        },
        workers={"active": active, "inactive": len(beats) - active},
        backpressure=backpressure_view(pressure, pending),
        repaired=counters.get("repaired", 0),
    )


class QueueCollector(Collector):
    """Reads the queue on every scrape; reports ``scrapeq_redis_up 0`` when Redis is down."""

    def __init__(self, client: redis.Redis, keys: KeySpace, heartbeat_timeout: float) -> None:
        self._client = client
        self._keys = keys
        self._heartbeat_timeout = heartbeat_timeout

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("scrapeq_redis_up", "Whether this scrape could read Redis")
        try:
            reading = read_queue(self._client, self._keys, self._heartbeat_timeout)
        except redis.RedisError as exc:
            logger.warning("메트릭 수집 중 Redis 읽기 실패: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        depth = GaugeMetricFamily(
            "scrapeq_queue_depth", "Tasks currently in each state", labels=["state"]
        )
        for state, value in reading.depths.items():
            depth.add_metric([state], value)
        yield depth
        totals = CounterMetricFamily(
            "scrapeq_tasks", "Tasks by outcome since the queue was created", labels=["outcome"]
        )
        for outcome, value in reading.totals.items():
            totals.add_metric([outcome], value)
        yield totals
        yield CounterMetricFamily(
            "scrapeq_tasks_repaired",
            "Task records the reaper found in no queue set and put back",
            value=reading.repaired,
        )
        workers = GaugeMetricFamily(
            "scrapeq_workers", "Known workers by liveness", labels=["status"]
        )
        for status, value in reading.workers.items():
            workers.add_metric([status], value)
        yield workers
        state = reading.backpressure["state"]
        if state in BACKPRESSURE_STATES:
            yield GaugeMetricFamily(
                "scrapeq_backpressure_state",
                "Backpressure: 0 open, 1 throttled, 2 closed",
                value=BACKPRESSURE_STATES.index(state),
            )
        else:
            logger.warning("알 수 없는 백프레셔 상태: %s", state)


class MetricsServer:
    """A ``/metrics`` HTTP server in a daemon thread, with its own registry and Redis client."""

    def __init__(self, settings: Settings, host: str = "0.0.0.0", port: int = 0) -> None:
        """Serve on ``host:port``; port 0 binds a free port (see :attr:`port`)."""
        self._client = redis.Redis.from_url(
            settings.redis.url, socket_connect_timeout=REDIS_TIMEOUT, socket_timeout=REDIS_TIMEOUT
        )
        registry = CollectorRegistry()
        registry.register(
            QueueCollector(
                self._client,
                KeySpace(settings.redis.key_prefix),
                settings.heartbeat.timeout,
            )
        )
        try:
            self._server, self._thread = start_wsgi_server(port, host, registry)
        except OSError:
            self._client.close()
            raise
        self.host = host
        self.port: int = self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self._client.close()


def start_metrics_server(settings: Settings, host: str = "0.0.0.0") -> MetricsServer | None:
    """Serve ``/metrics`` on ``supervisor.metrics_port``; None when that is 0 (off).

    Raises ``OSError`` when the port cannot be bound.
    """
    port = settings.supervisor.metrics_port
    if port == 0:
        return None
    server = MetricsServer(settings, host, port)
    logger.info("메트릭 서버 시작: http://%s:%d/metrics", host, server.port)
    return server
