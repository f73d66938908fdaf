"""Prometheus ``/metrics``: queue depths, task totals, latency, workers and backpressure.

prometheus-client runs collectors in its HTTP server's own thread, where no
event loop runs. A scrape hands :func:`read_queue` to the supervisor's loop
(``run_coroutine_threadsafe``) and waits for it there, so ``/metrics`` reads
Redis through the supervisor's own connection and the very code ``supervisor
status`` uses (``TaskManager.queue_stats``), not a client of its own.

Every host runs ``supervisor start`` with an endpoint of its own. What is read
from Redis describes the whole queue, so it is exported by one endpoint only:
the one whose supervisor holds the exporter lease (``metrics_lock``, taken and
renewed by its scrapes; another takes over within ``EXPORTER_LEASE`` of its
last). Each endpoint says whether it is the one (``scrapeq_queue_exporter``).
What belongs to one process (``scrapeq_restarts_total``, ``scrapeq_redis_up``)
every endpoint exports: Prometheus sums those.

The same server answers the web dashboard at ``/`` (supervisor/dashboard.py)
unless ``[dashboard] enabled = false``; ``/metrics`` is always served.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from prometheus_client import CollectorRegistry, Counter, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from actors.exceptions import QueueError
from actors.queue import RedisQueue, TaskManager, WorkerMonitor
from actors.telemetry import LATENCY_BUCKETS, QueueTelemetry, ScriptTotals
from config.settings import DashboardSettings, Settings
from supervisor.cli_common import BACKPRESSURE_STATES, backpressure_view
from supervisor.dashboard import Dashboard

logger = logging.getLogger(__name__)

#: A scrape waits at most this long for Redis, well inside Prometheus' default 10 s timeout.
REDIS_TIMEOUT = 3.0

#: Domains ``scrapeq_domain_rate`` reports at most (its label set stays bounded).
DOMAIN_LABELS = 10
#: The reasons ``scrapeq_domain_throttled_total`` counts (RateLimited.reason).
THROTTLE_REASONS = ("rate_limited", "unavailable")
#: The monotonic totals reported as ``scrapeq_tasks_total{outcome}``.
OUTCOMES = ("completed", "failed", "cancelled", "enqueued")
#: How long an endpoint stays the one that exports the queue's metrics after its last scrape.
EXPORTER_LEASE = 60.0

#: Actor restarts by this supervisor, by kind (worker, heartbeat, reaper, governor).
RESTARTS = Counter(
    "scrapeq_restarts", "Actor processes this supervisor restarted", ["actor"], registry=None
)


@dataclass(frozen=True, slots=True)
class QueueReading:
    depths: dict[str, int]  # pending, running, retrying, dead_letter
    totals: dict[str, int]  # completed, failed, cancelled, enqueued
    workers: dict[str, int]  # active, inactive
    backpressure: dict[str, Any]  # state, depth[, rate]
    repaired: int  # task records the reaper's sweep found in no queue set
    domain_rates: dict[str, float]  # the rate in force of the domains reported (bounded)
    throttled: dict[str, int]  # 429/503 answers by reason, since the queue was created
    scripts: dict[str, ScriptTotals]  # latency buckets and outcomes per script
    paused: int  # rate keys paused now (a 429/503's Retry-After, an open circuit breaker)
    gated: int  # pending tasks waiting at a rate-limited key's gate


async def read_queue(queue: RedisQueue, exporter_id: str) -> QueueReading | None:
    """Everything one scrape reports, or None when another endpoint exports the queue.

    A worker is inactive once its heartbeat is overdue.
    """
    if not await queue.store.hold_lock(queue.keys.metrics_lock, exporter_id, EXPORTER_LEASE):
        return None
    manager = TaskManager(queue)
    stats, pressure, workers, domains, throttled, scripts = await asyncio.gather(
        manager.queue_stats(),
        manager.backpressure_fields(),
        WorkerMonitor(queue).liveness(),
        manager.domains(),
        manager.throttled(THROTTLE_REASONS),
        QueueTelemetry(queue.connection, queue.keys).totals(),
    )
    paused = await manager.paused_keys()
    # A bounded label set: the busiest domains first, then those held lowest.
    limited = [d for d in domains if d["rate"] is not None]
    limited.sort(key=lambda d: (-d["in_flight"], d["rate"]))
    return QueueReading(
        depths={name: stats[name] for name in ("pending", "running", "retrying", "dead_letter")},
        totals={name: stats[name] for name in OUTCOMES},
        workers=workers,
        backpressure=backpressure_view(pressure, stats["pending"]),
        repaired=stats["repaired"],
        domain_rates={d["domain"]: d["rate"] for d in limited[:DOMAIN_LABELS]},
        throttled=throttled,
        scripts=scripts,
        paused=len(paused),
        gated=stats["gated"],
    )


class QueueCollector(Collector):
    """Reads the queue on every scrape; reports ``scrapeq_redis_up 0`` when Redis is down."""

    def __init__(self, queue: RedisQueue, loop: asyncio.AbstractEventLoop) -> None:
        self._queue = queue
        self._loop = loop
        self._exporter_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("scrapeq_redis_up", "Whether this scrape could read Redis")
        future = asyncio.run_coroutine_threadsafe(
            read_queue(self._queue, self._exporter_id), self._loop
        )
        try:
            reading = future.result(REDIS_TIMEOUT)
        except (QueueError, concurrent.futures.TimeoutError) as exc:
            future.cancel()
            logger.warning("메트릭 수집 중 Redis 읽기 실패: %s", str(exc) or "시간 초과")
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield GaugeMetricFamily(
            "scrapeq_queue_exporter",
            "1 on the one endpoint that exports the queue-wide metrics, else 0",
            value=0 if reading is None else 1,
        )
        if reading is not None:
            yield from self._queue_families(reading)

    def _queue_families(self, reading: QueueReading) -> Iterator[Metric]:
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
        rates = GaugeMetricFamily(
            "scrapeq_domain_rate",
            f"Tasks/s in force (learned or configured) of up to {DOMAIN_LABELS} domains",
            labels=["domain"],
        )
        for domain, rate in reading.domain_rates.items():
            rates.add_metric([domain], rate)
        yield rates
        throttled = CounterMetricFamily(
            "scrapeq_domain_throttled",
            "HTTP 429 (rate_limited) and 503 (unavailable) answers scripts reported",
            labels=["reason"],
        )
        for reason, value in reading.throttled.items():
            throttled.add_metric([reason], value)
        yield throttled
        yield GaugeMetricFamily(
            "scrapeq_paused_keys",
            "Rate keys paused now (a 429/503's Retry-After, an open circuit breaker)",
            value=reading.paused,
        )
        yield GaugeMetricFamily(
            "scrapeq_gated_tasks",
            "Pending tasks waiting for a rate-limited or capped key (in its gate)",
            value=reading.gated,
        )
        workers = GaugeMetricFamily(
            "scrapeq_workers", "Known workers by liveness", labels=["status"]
        )
        for status, value in reading.workers.items():
            workers.add_metric([status], value)
        yield workers
        yield from _latency_families(reading.scripts)
        state = reading.backpressure["state"]
        if state in BACKPRESSURE_STATES:
            yield GaugeMetricFamily(
                "scrapeq_backpressure_state",
                "Backpressure: 0 open, 1 throttled, 2 closed",
                value=BACKPRESSURE_STATES.index(state),
            )
        else:
            logger.warning("알 수 없는 백프레셔 상태: %s", state)


def _latency_families(scripts: dict[str, ScriptTotals]) -> Iterator[Metric]:
    """The latency histograms and outcome counters per script, from the counts in Redis."""
    bounds = [f"{le:g}" for le in LATENCY_BUCKETS] + ["+Inf"]
    wait = HistogramMetricFamily(
        "scrapeq_queue_wait_seconds",
        "Time from ready (enqueued, retry due, handed back) to started, per start",
        labels=["script"],
    )
    duration = HistogramMetricFamily(
        "scrapeq_task_duration_seconds",
        "Execution time of each attempt that ended (completed or failed)",
        labels=["script"],
    )
    outcomes = CounterMetricFamily(
        "scrapeq_script_tasks",
        "Attempts per script by outcome: started, completed, failed (for good), retried",
        labels=["script", "outcome"],
    )
    for script, totals in sorted(scripts.items()):
        for family, counts, total in (
            (wait, totals.wait, totals.wait_sum),
            (duration, totals.execution, totals.execution_sum),
        ):
            family.add_metric(
                [script], list(zip(bounds, itertools.accumulate(counts), strict=True)), total
            )
        for outcome, value in totals.outcomes.items():
            outcomes.add_metric([script, outcome], value)
    yield wait
    yield duration
    yield outcomes


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    """A thread per request, so a slow Redis read holds up no other client."""

    daemon_threads = True  # fire and forget: nothing joins request threads at close


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Requests are not logged: a scrape every few seconds and every page's polls."""


def _routed(metrics: WSGIApplication, dashboard: Dashboard | None) -> WSGIApplication:
    """``/metrics`` to prometheus-client, everything else to the dashboard (404 without one)."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/metrics":
            return metrics(environ, start_response)
        if dashboard is not None:
            return dashboard(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: only /metrics is served here ([dashboard] enabled = false)\n"]

    return app


def _bind(host: str, port: int, app: WSGIApplication) -> WSGIServer:
    """A server on ``host:port`` in the address's own family (an IPv6 host needs AF_INET6)."""
    family, *_, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    server_class = type("_BoundServer", (_ThreadingServer,), {"address_family": family})
    return make_server(str(address[0]), port, app, server_class, _QuietHandler)


class MetricsServer:
    """``/metrics`` and the dashboard over HTTP in a daemon thread, reading on ``loop``."""

    def __init__(
        self,
        queue: RedisQueue,
        loop: asyncio.AbstractEventLoop,
        host: str = "127.0.0.1",
        port: int = 0,
        dashboard: DashboardSettings | None = None,
    ) -> None:
        """Serve on ``host:port``; port 0 binds a free port (see :attr:`port`).

        ``dashboard``: serve the dashboard with these settings; None = ``/metrics`` only.
        """
        registry = CollectorRegistry()
        registry.register(QueueCollector(queue, loop))
        registry.register(RESTARTS)
        self.dashboard = (
            None if dashboard is None else Dashboard(queue, loop, dashboard, REDIS_TIMEOUT)
        )
        self._server = _bind(host, port, _routed(make_wsgi_app(registry), self.dashboard))
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )
        self._thread.start()
        self.host = host
        self.port: int = self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def start_metrics_server(settings: Settings, queue: RedisQueue) -> MetricsServer | None:
    """Serve ``/metrics`` and the dashboard on ``metrics_host:metrics_port``; None if port 0.

    The dashboard is left out when ``[dashboard] enabled = false``. Call it on
    the loop that ``queue`` belongs to. Raises ``OSError`` when the port cannot
    be bound.
    """
    host, port = settings.supervisor.metrics_host, settings.supervisor.metrics_port
    if port == 0:
        return None
    dashboard = settings.dashboard if settings.dashboard.enabled else None
    server = MetricsServer(queue, asyncio.get_running_loop(), host, port, dashboard)
    address = f"[{host}]" if ":" in host else host
    logger.info("메트릭 서버 시작: http://%s:%d/metrics", address, server.port)
    if server.dashboard is not None:
        mode = "작업 허용 (토큰 필요)" if server.dashboard.actions else "읽기 전용"
        logger.info("대시보드 시작: http://%s:%d/ (%s)", address, server.port, mode)
    return server
