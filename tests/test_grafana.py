"""deploy/grafana-dashboard.json and docs/deploy.md's alert rules query what /metrics serves.

Each query's metric names and exact label values are checked against a real
scrape of ``MetricsServer`` after a little workload, so a renamed metric or a
misspelt label shows up here, not as an empty panel or a silent alert.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from actors.models import ScrapingRequest
from actors.queue import RedisQueue, WorkerMonitor
from actors.telemetry import TelemetryBatch
from supervisor.metrics import MetricsServer

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
DEPLOY_GUIDE = ROOT / "docs" / "deploy.md"

METRIC = re.compile(r"\bscrapeq_[A-Za-z0-9_]+")
SELECTOR = re.compile(r"\b(scrapeq_[A-Za-z0-9_]+)\{([^}]*)\}")
#: An exact matcher with a fixed value (``state="dead_letter"``); regexes and variables are not.
EXACT = re.compile(r'\b([A-Za-z_]\w*)\s*=\s*"([^"$]*)"')
#: Labels Prometheus adds to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})
#: The sample names a family of each type has (a counter ``x`` is served as ``x_total``).
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}

Served = dict[str, set[tuple[str, str]]]  # sample name -> every (label, value) it carries


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def dashboard_queries(board: dict[str, Any]) -> list[str]:
    """Every panel target's ``expr`` and every template variable's query."""
    exprs = [target["expr"] for panel in board["panels"] for target in panel["targets"]]
    return exprs + [v["definition"] for v in board["templating"]["list"] if "definition" in v]


def alert_rules() -> str:
    """The Prometheus rules YAML block of the deploy guide's Monitoring section."""
    monitoring = DEPLOY_GUIDE.read_text(encoding="utf-8").split("\n## Monitoring\n", 1)[1]
    (rules,) = [
        block for block in re.findall(r"```yaml\n(.*?)```", monitoring, re.S) if "groups:" in block
    ]
    return rules


def balanced(expr: str) -> bool:
    depth: list[str] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    for char in re.sub(r'"[^"]*"', '""', expr):  # brackets inside label values do not count
        if char in "([{":
            depth.append(char)
        elif char in pairs and (not depth or depth.pop() != pairs[char]):
            return False
    return not depth


def test_the_dashboard_is_an_importable_grafana_model() -> None:
    board = dashboard()
    variables = {variable["name"] for variable in board["templating"]["list"]}
    panels = board["panels"]

    assert board["title"] == "scrapeq"
    assert board["uid"]
    assert isinstance(board["schemaVersion"], int)
    assert panels
    assert len({panel["id"] for panel in panels}) == len(panels)
    for panel in panels:
        position = panel["gridPos"]
        assert panel["title"]
        assert panel["type"] in {"stat", "timeseries", "state-timeline"}, panel["title"]
        assert position["x"] + position["w"] <= 24, panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(set(refs)) == len(refs), panel["title"]
        for target in panel["targets"]:
            assert METRIC.search(target["expr"]), target["expr"]
            assert balanced(target["expr"]), target["expr"]
            used = set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval"}
            assert used <= variables, target["expr"]
    assert {"datasource", "job"} <= variables


@pytest.fixture
async def served(queue: RedisQueue) -> Served:
    """What /metrics serves once a task of a script was claimed, timed and counted."""
    url = {"url": "http://a.test/"}
    await queue.enqueue_many([ScrapingRequest(script_name="echo", parameters=url) for _ in "ab"])
    claimed = await queue.store.claim("w1", 2)
    await WorkerMonitor(queue).register_worker("w1")
    batch = TelemetryBatch()
    for _ in claimed.leases:
        batch.started("echo", 0.02)
        batch.ended("echo", 0.3)
        batch.outcome("echo", "completed")
    await queue.store.record_metrics(*batch.take().fields())
    server = MetricsServer(queue, asyncio.get_running_loop(), host="127.0.0.1", port=0)
    try:
        text = await asyncio.to_thread(fetch, server.port)
    finally:
        await asyncio.to_thread(server.close)
    return samples_of(text)


def fetch(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return reply.read().decode()  # type: ignore[no-any-return]


def samples_of(text: str) -> Served:
    """Every sample name with its label pairs, and the names of families with no sample yet.

    A family declared before its first sample (``scrapeq_restarts_total``
    before any restart) is served all the same: its TYPE line names it.
    """
    served: Served = {}
    for family in text_string_to_metric_families(text):
        for suffix in SUFFIXES.get(family.type, ("",)):
            served.setdefault(family.name + suffix, set())
        for sample in family.samples:
            served.setdefault(sample.name, set()).update(sample.labels.items())
    return served


def unserved(queries: Iterable[str], served: Served) -> list[str]:
    """The metric names, and the exact label values, that ``queries`` select and nothing serves."""
    missing = []
    for query in queries:
        missing += [name for name in METRIC.findall(query) if name not in served]
        for name, matchers in SELECTOR.findall(query):
            for label, value in EXACT.findall(matchers):
                if label not in TARGET_LABELS and (label, value) not in served.get(name, set()):
                    missing.append(f'{name}{{{label}="{value}"}}')
    return missing


async def test_every_metric_and_label_the_dashboard_queries_is_served(served: Served) -> None:
    queries = dashboard_queries(dashboard())
    charted = {name.removesuffix("_bucket") for q in queries for name in METRIC.findall(q)}

    assert unserved(queries, served) == []
    for family in ("scrapeq_queue_wait_seconds", "scrapeq_task_duration_seconds"):
        assert family in charted  # the latency percentiles are there
    assert ("outcome", "completed") in served["scrapeq_script_tasks_total"]  # the workload shows


async def test_every_metric_and_label_the_alert_rules_use_is_served(served: Served) -> None:
    rules = alert_rules()
    queries = re.findall(r"^\s*expr:\s*(.+)$", rules, re.M)

    assert len(queries) == rules.count("- alert:")  # one expression per rule, on its line
    assert all(balanced(query) for query in queries)
    assert unserved(queries, served) == []
