"""The web dashboard: its JSON API over real HTTP, and its page in a real headless Chromium."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from headless_chromium import Browser, Page, find_chromium
from helpers import wait_for
from supervisor_harness import DRAIN_TIMEOUT, Launcher, config_file, configured, wait_for_workers

from actors.history import EventHistory
from actors.models import ScrapingRequest, TaskStatus
from actors.queue import RedisQueue, TaskManager
from actors.store import Completion
from config.settings import DashboardSettings, EventsSettings, Settings
from supervisor.metrics import MetricsServer, start_metrics_server
from supervisor.redis_server import RedisServer, free_port

TOKEN = "dashboard-test-token-7f3a"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"

# A script that fails until a file exists: a site that is down, then fixed. A
# dead letter of it can be retried and complete (``fail`` would fail again).
FLAKY_MODULE = """
from pathlib import Path

from actors.scripts import script


@script("flaky")
def flaky(parameters):
    if not Path(parameters["fixed"]).exists():
        raise RuntimeError("flaky: the site is still down")
    return {"fixed": True}
"""


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(port: int, path: str, method: str = "GET", auth: str | None = None) -> Reply:
    headers = {} if auth is None else {"Authorization": auth}
    call = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, headers=headers)
    try:
        with urllib.request.urlopen(call, timeout=10) as reply:
            return Reply(reply.status, dict(reply.headers), reply.read())
    except urllib.error.HTTPError as error:
        with error:
            return Reply(error.code, dict(error.headers), error.read())


async def http(port: int, path: str, method: str = "GET", auth: str | None = None) -> Reply:
    """A request from another thread: the server reads Redis on this test's loop."""
    return await asyncio.to_thread(request, port, path, method, auth)


async def serve(queue: RedisQueue, dashboard: DashboardSettings) -> MetricsServer:
    return MetricsServer(queue, asyncio.get_running_loop(), port=0, dashboard=dashboard)


@pytest.fixture
async def guarded(queue: RedisQueue) -> AsyncIterator[MetricsServer]:
    """A dashboard whose actions need TOKEN."""
    server = await serve(queue, DashboardSettings(token=TOKEN))
    yield server
    await asyncio.to_thread(server.close)


@pytest.fixture
async def read_only(queue: RedisQueue) -> AsyncIterator[MetricsServer]:
    """A dashboard with no token configured."""
    server = await serve(queue, DashboardSettings())
    yield server
    await asyncio.to_thread(server.close)


async def dead_letters(queue: RedisQueue, count: int) -> list[str]:
    """``count`` tasks that failed with no retries left: in the dead-letter queue."""
    ids = await queue.enqueue_many(
        [ScrapingRequest(script_name="fail", max_retries=0) for _ in range(count)]
    )
    for lease in (await queue.store.claim("w1", count)).leases:
        await queue.store.fail("w1", lease.request_id, lease.attempt, "boom", permanent=False)
    return ids


def bearer(token: str) -> str:
    return f"Bearer {token}"


async def test_the_page_metrics_and_status_share_the_metrics_port(
    guarded: MetricsServer, queue: RedisQueue
) -> None:
    await dead_letters(queue, 2)
    await queue.enqueue_task(ScrapingRequest(script_name="echo"))

    page = await http(guarded.port, "/")
    metrics = await http(guarded.port, "/metrics")
    overview = await http(guarded.port, "/api/overview")

    assert page.status == 200
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]
    html = page.body.decode()
    assert "<title>scrapeq dashboard</title>" in html
    assert not re.search(r"""(src|href|url)\s*[=(]\s*["']?(https?:)?//""", html)  # no CDN
    assert metrics.status == 200
    assert b"scrapeq_redis_up 1.0" in metrics.body
    state = overview.json()
    assert set(state["status"]) == {
        "queue",
        "workers",
        "backpressure",
        "paused_keys",
        "domains",
        "latency",
        "throughput",
    }
    assert state["status"]["queue"]["dead_letter"] == 2
    assert state["status"]["queue"]["pending"] == 1
    assert len(state["minutes"]) == 60
    assert state["minutes"][-1]["outcomes"]["started"] == 0  # no worker recorded yet
    assert state["actions"] is True


async def test_a_dashboard_without_a_token_refuses_every_action_with_403(
    read_only: MetricsServer, queue: RedisQueue
) -> None:
    (letter,) = await dead_letters(queue, 1)

    refused = [
        await http(read_only.port, path, "POST", bearer("anything"))
        for path in (
            f"/api/dead-letters/{letter}/retry",
            "/api/dead-letters/retry",
            "/api/dead-letters/purge",
        )
    ]
    listed = (await http(read_only.port, "/api/dead-letters")).json()["dead_letters"]
    overview = (await http(read_only.port, "/api/overview")).json()

    assert [reply.status for reply in refused] == [403, 403, 403]
    assert "read-only" in refused[0].json()["error"]
    assert [record["request_id"] for record in listed] == [letter]
    assert overview["actions"] is False
    assert await TaskManager(queue).get_task_status(letter) is TaskStatus.FAILED


async def test_a_missing_or_wrong_token_is_401_and_changes_nothing(
    guarded: MetricsServer, queue: RedisQueue
) -> None:
    (letter,) = await dead_letters(queue, 1)
    path = f"/api/dead-letters/{letter}/retry"

    replies = [
        await http(guarded.port, path, "POST", auth)
        for auth in (None, bearer("wrong"), f"Basic {TOKEN}", bearer(TOKEN[:-1]))
    ]

    assert [reply.status for reply in replies] == [401, 401, 401, 401]
    assert replies[0].headers["WWW-Authenticate"].startswith("Bearer")
    assert (await http(guarded.port, "/api/dead-letters/purge", "POST", bearer("x"))).status == 401
    assert await TaskManager(queue).get_task_status(letter) is TaskStatus.FAILED


async def test_the_token_retries_one_dead_letter_then_all_then_purges(
    guarded: MetricsServer, queue: RedisQueue
) -> None:
    manager = TaskManager(queue)
    first, second, third = await dead_letters(queue, 3)

    one = await http(guarded.port, f"/api/dead-letters/{first}/retry", "POST", bearer(TOKEN))
    again = await http(guarded.port, f"/api/dead-letters/{first}/retry", "POST", bearer(TOKEN))
    everything = await http(guarded.port, "/api/dead-letters/retry", "POST", bearer(TOKEN))
    statuses = [await manager.get_task_status(i) for i in (first, second, third)]
    await dead_letters(queue, 2)
    purged = await http(guarded.port, "/api/dead-letters/purge", "POST", bearer(TOKEN))

    assert (one.status, one.json()) == (200, {"requeued": 1, "request_id": first})
    assert again.status == 404  # no longer a dead letter
    assert (everything.status, everything.json()) == (200, {"requeued": 2})
    assert statuses == [TaskStatus.PENDING] * 3
    assert (purged.status, purged.json()) == (200, {"purged": 2})
    assert await manager.list_dead_letters() == []


async def test_inspect_shows_a_tasks_record_and_unknown_paths_and_methods_are_refused(
    guarded: MetricsServer, queue: RedisQueue
) -> None:
    (letter,) = await dead_letters(queue, 1)

    record = await http(guarded.port, f"/api/tasks/{letter}")
    unknown = await http(guarded.port, "/api/tasks/no-such-task")
    wrong_method = await http(guarded.port, f"/api/tasks/{letter}", "POST", bearer(TOKEN))
    get_an_action = await http(guarded.port, "/api/dead-letters/purge")
    bad_limit = await http(guarded.port, "/api/dead-letters?limit=many")
    nowhere = await http(guarded.port, "/api/nothing")

    assert record.status == 200
    shown = record.json()
    assert shown["request_id"] == letter
    assert shown["status"] == "failed"
    assert shown["request"]["script_name"] == "fail"
    assert shown["history"][0]["error"] == "boom"
    assert unknown.status == 404
    assert (wrong_method.status, wrong_method.headers["Allow"]) == (405, "GET")
    assert (get_an_action.status, get_an_action.headers["Allow"]) == (405, "POST")
    assert bad_limit.status == 400
    assert nowhere.status == 404
    assert await TaskManager(queue).get_task_status(letter) is TaskStatus.FAILED


async def test_events_are_filtered_by_type_task_and_worker_then_followed_from_the_cursor(
    guarded: MetricsServer, queue: RedisQueue
) -> None:
    await queue.store.keep_history(EventsSettings())
    first, second = await queue.enqueue_many(
        [ScrapingRequest(script_name="echo") for _ in range(2)]
    )
    (lease_one,) = (await queue.store.claim("w1", 1)).leases
    await queue.store.claim("w2", 1)
    await queue.store.complete("w1", [Completion(first, lease_one.attempt, "1", 0.01)])

    async def events(query: str) -> dict[str, Any]:
        reply = await http(guarded.port, f"/api/events?{query}")
        assert reply.status == 200, reply.body
        result: dict[str, Any] = reply.json()
        return result

    def seen(answer: dict[str, Any]) -> list[tuple[str, str]]:
        return [(e["event"], e.get("request_id", "")) for e in answer["events"]]

    everything = await events("")
    newest = await EventHistory(queue.connection, queue.partitions).last_id()
    by_task = await events(f"task={second}")
    by_type = await events("type=task.completed")
    by_worker = await events("worker=w2&type=task.started")
    recent = await events("since=300&type=task.enqueued")
    third = await queue.enqueue_task(ScrapingRequest(script_name="echo"))
    followed = await events(f"after={everything['cursor']}")
    nothing_new = await events(f"after={followed['cursor']}")

    assert everything["kept"] is True
    assert everything["cursor"] == newest
    assert seen(everything) == [  # newest first
        ("task.completed", first),
        ("task.started", second),
        ("task.started", first),
        ("task.enqueued", second),
        ("task.enqueued", first),
    ]
    assert seen(by_task) == [("task.started", second), ("task.enqueued", second)]
    assert seen(by_type) == [("task.completed", first)]
    assert seen(by_worker) == [("task.started", second)]
    assert seen(recent) == [("task.enqueued", second), ("task.enqueued", first)]
    assert seen(followed) == [("task.enqueued", third)]
    assert seen(nothing_new) == []
    assert nothing_new["cursor"] == followed["cursor"]


async def test_a_disabled_dashboard_serves_no_page_but_still_serves_metrics(
    settings: Settings, queue: RedisQueue
) -> None:
    settings = configured(
        settings, supervisor={"metrics_port": free_port()}, dashboard={"enabled": False}
    )
    server = start_metrics_server(settings, queue)
    assert server is not None
    try:
        page = await http(server.port, "/")
        api = await http(server.port, "/api/overview")
        metrics = await http(server.port, "/metrics")
    finally:
        await asyncio.to_thread(server.close)

    assert (page.status, api.status) == (404, 404)
    assert metrics.status == 200
    assert b"scrapeq_redis_up 1.0" in metrics.body


async def test_redis_not_answering_is_a_503_json_error_and_the_server_carries_on(
    guarded: MetricsServer, redis_server: RedisServer
) -> None:
    redis_server.pause()
    try:
        page = await http(guarded.port, "/")
        stalled = await http(guarded.port, "/api/overview")
        letters = await http(guarded.port, "/api/dead-letters")
    finally:
        redis_server.resume()

    async def answers() -> bool:
        return (await http(guarded.port, "/api/overview")).status == 200

    assert page.status == 200  # the page itself needs no Redis: it shows the error
    assert stalled.status == 503
    assert "Redis" in stalled.json()["error"]
    assert letters.status == 503
    await wait_for(answers, timeout=15, interval=0.2, message="the dashboard reads Redis again")


def test_the_token_is_kept_out_of_the_settings_repr() -> None:
    settings = Settings(dashboard={"token": TOKEN})

    assert settings.dashboard.token == TOKEN
    assert TOKEN not in repr(settings)
    assert TOKEN not in str(settings.dashboard)


# ---- in a real browser -----------------------------------------------------------------------


@pytest.fixture
def chromium() -> str:
    binary = find_chromium()
    if binary is None:
        pytest.skip("no Chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)")
    return binary


@pytest.fixture
async def browser(chromium: str, tmp_path: Path) -> AsyncIterator[Browser]:
    async with Browser.launched(chromium, tmp_path / "profile", tmp_path / "chromium.log") as b:
        yield b


async def live_page(browser: Browser, port: int) -> Page:
    page = await browser.new_page()
    await page.goto(f"http://127.0.0.1:{port}/")
    await page.wait_until("document.body.dataset.state === 'live'")
    return page


def rows(selector: str, attribute: str) -> str:
    """JS: the ``attribute`` (a data-* name) of every element ``selector`` matches."""
    return f"[...document.querySelectorAll({json.dumps(selector)})].map(n => n.dataset.{attribute})"


def keep_artifact(png: bytes, tmp_path: Path, name: str) -> None:
    """Into the test's tmp dir, and a copy under test-artifacts/ in the repo."""
    shot = tmp_path / name
    shot.write_bytes(png)
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / name)


async def save_screenshot(page: Page, tmp_path: Path, name: str) -> None:
    await asyncio.to_thread(keep_artifact, await page.screenshot(), tmp_path, name)


@pytest.mark.timeout(180)
async def test_the_page_shows_a_known_workload_and_retries_a_dead_letter_to_completion(
    browser: Browser, settings: Settings, queue: RedisQueue, launch: Launcher, tmp_path: Path
) -> None:
    manager = TaskManager(queue)
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "dashboard_flaky.py").write_text(FLAKY_MODULE, encoding="utf-8")
    port = free_port()
    settings = configured(
        settings,
        supervisor={"metrics_port": port},
        dashboard={"token": TOKEN},
        worker={"scripts": ["dashboard_flaky"]},
    )
    supervisor = launch(config_file(tmp_path, settings, 2), env={"PYTHONPATH": str(modules)})
    await wait_for_workers(queue, supervisor, 2)
    fixed = tmp_path / "site-fixed"
    flaky = [
        ScrapingRequest(script_name="flaky", parameters={"fixed": str(fixed)}, max_retries=0)
        for _ in range(3)
    ]
    await queue.enqueue_many([*(ScrapingRequest(script_name="echo") for _ in range(20)), *flaky])

    async def settled() -> bool:
        stats = await manager.queue_stats()
        return (stats["completed"], stats["dead_letter"], stats["running"]) == (20, 3, 0)

    await wait_for(settled, timeout=30)
    page = await live_page(browser, port)

    await page.wait_until(  # the workers add their latency counts up about once a second
        "document.getElementById('latency-execution-p50').textContent !== '-'"
    )
    shown = {
        name: await page.text(f"#{name}")
        for name in (
            "count-completed",
            "count-failed",
            "count-dead_letter",
            "dead-total",
            "workers-active",
            "backpressure-state",
        )
    }
    letters = await page.evaluate(rows("#dead-letters tr[data-request-id]", "requestId"))
    assert shown == {
        "count-completed": "20",
        "count-failed": "3",
        "count-dead_letter": "3",
        "dead-total": "3",
        "workers-active": "2",
        "backpressure-state": "open",
    }
    assert sorted(letters) == sorted(r.request_id for r in flaky)
    assert await page.evaluate("document.querySelectorAll('#chart-throughput path').length") == 4
    assert await page.evaluate("document.getElementById('retry-all').hidden") is False

    target = flaky[0].request_id
    fixed.touch()  # the site is back: the next attempt succeeds
    await page.type("#token", TOKEN)
    await page.click(f'#dead-letters tr[data-request-id="{target}"] button.retry')
    await page.wait_until(f"document.getElementById('notice').textContent === 'requeued {target}'")
    await page.wait_until(
        "document.getElementById('count-completed').textContent === '21'"
        " && document.getElementById('dead-total').textContent === '2'"
    )
    await page.type("#event-filters input[name=task]", target)
    await page.wait_until(f"{rows('#events tr[data-event]', 'event')}.includes('task.completed')")
    events = await page.evaluate(rows("#events tr[data-event]", "event"))
    remaining = await page.evaluate(rows("#dead-letters tr[data-request-id]", "requestId"))
    await save_screenshot(page, tmp_path, "dashboard.png")
    errors = page.script_errors()
    response = await manager.get_response(target)
    supervisor.send(signal.SIGTERM)
    assert await supervisor.exit_code(DRAIN_TIMEOUT + 10) == 0, supervisor.output()

    assert events[0] == "task.completed"  # newest first, the retry's run last
    assert events.count("task.failed") == 1
    assert target not in remaining
    assert len(remaining) == 2
    assert await manager.get_task_status(target) is TaskStatus.COMPLETED
    assert response is not None
    assert response.data == {"fixed": True}
    assert errors == []
    assert TOKEN not in supervisor.output()  # a secret: never logged


async def test_a_read_only_page_offers_no_actions_and_says_when_redis_stops_answering(
    browser: Browser,
    read_only: MetricsServer,
    queue: RedisQueue,
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    await dead_letters(queue, 1)
    page = await live_page(browser, read_only.port)

    await page.wait_until("document.querySelectorAll('#dead-letters tr[data-request-id]').length")
    hidden = await page.evaluate(
        "['token-box', 'retry-all', 'purge', 'read-only']"
        ".map(id => document.getElementById(id).hidden)"
    )
    retry_buttons = await page.evaluate("document.querySelectorAll('button.retry').length")
    redis_server.pause()
    try:
        banner = await page.wait_until(
            "document.body.dataset.state === 'error' && document.getElementById('banner').innerText"
        )
        await save_screenshot(page, tmp_path, "dashboard-redis-down.png")
    finally:
        redis_server.resume()
    await page.wait_until("document.body.dataset.state === 'live'")

    assert hidden == [True, True, True, False]
    assert retry_buttons == 0
    assert banner.startswith("Redis is unavailable")
    assert page.script_errors() == []
