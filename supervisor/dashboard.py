"""The web dashboard: one static page at ``/`` and the JSON it polls under ``/api/``.

``GET /api/overview``: the ``status --json`` object, the last hour minute by
minute and whether actions are on; ``GET /api/events`` (``type``, ``task``,
``worker``, ``since``, ``after``): the event history, newest first;
``GET /api/dead-letters`` (``limit``); ``GET /api/tasks/ID``: one task's record.
The actions, ``POST /api/dead-letters/ID/retry``, ``POST /api/dead-letters/retry``
(all) and ``POST /api/dead-letters/purge``, need ``Authorization: Bearer TOKEN``
with ``[dashboard] token``: without one configured they are refused (403),
with a wrong one 401. A cross-site form cannot set that header, so the token
also stands in for a CSRF check.

The metrics server's threads run this app, where no event loop runs: each
read is handed to the supervisor's loop (``run_coroutine_threadsafe``), as a
``/metrics`` scrape's is, and waited for a bounded time. Redis unreachable or
slow is a 503 with a JSON error the page shows; it never takes the server down.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.resources
import json
import logging
import re
from collections.abc import Callable, Coroutine, Iterable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs
from wsgiref.types import StartResponse, WSGIEnvironment

from actors.exceptions import BackpressureException, QueueConnectionException, QueueError
from actors.history import CURSOR
from actors.queue import RedisQueue, TaskManager
from config.settings import DashboardSettings
from supervisor import dashboard_data
from supervisor.dashboard_data import EventQuery

logger = logging.getLogger(__name__)

#: How long an action may take: retrying every dead letter runs one script call per
#: thousand, and an action cut short would leave the operator guessing what was done.
ACTION_TIMEOUT = 10.0
#: Dead letters the page lists by default, and the most one request may ask for.
DEAD_LETTERS_SHOWN = 100
DEAD_LETTERS_MAX = 1000

_ID = r"([A-Za-z0-9_-]{1,64})"  # actors.models.REQUEST_ID_PATTERN
_SECURITY_HEADERS = [
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
]
# The page's script and style are inline; it loads nothing else and talks only to its origin.
_PAGE_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)

Reply = tuple[HTTPStatus, list[tuple[str, str]], bytes]
Params = dict[str, list[str]]
Handler = Callable[..., Reply]


class HttpError(Exception):
    """Ends a request with ``status`` and a JSON ``{"error": message, ...}``."""

    def __init__(
        self,
        status: HTTPStatus,
        message: str,
        headers: Iterable[tuple[str, str]] = (),
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = list(headers)
        self.body = {"error": message, **extra}


def json_reply(status: HTTPStatus, body: Any, headers: Iterable[tuple[str, str]] = ()) -> Reply:
    payload = json.dumps(body, separators=(",", ":"), default=str).encode()
    return status, [("Content-Type", "application/json"), *headers], payload


class Dashboard:
    """The dashboard as a WSGI application, reading through ``queue`` on ``loop``."""

    def __init__(
        self,
        queue: RedisQueue,
        loop: asyncio.AbstractEventLoop,
        settings: DashboardSettings,
        read_timeout: float,
    ) -> None:
        self._queue = queue
        self._loop = loop
        self._token = settings.token.encode()
        self._read_timeout = read_timeout
        self._page = importlib.resources.files(__package__).joinpath("dashboard.html").read_bytes()
        self._redis_down = False
        self._routes: list[tuple[re.Pattern[str], str, Handler]] = [
            (re.compile(pattern), method, handler)
            for pattern, method, handler in (
                (r"/", "GET", self._show_page),
                (r"/api/overview", "GET", self._overview),
                (r"/api/events", "GET", self._events),
                (r"/api/dead-letters", "GET", self._dead_letters),
                (rf"/api/tasks/{_ID}", "GET", self._task),
                (rf"/api/dead-letters/{_ID}/retry", "POST", self._retry_one),
                (r"/api/dead-letters/retry", "POST", self._retry_all),
                (r"/api/dead-letters/purge", "POST", self._purge),
            )
        ]

    @property
    def actions(self) -> bool:
        """Whether a token is configured (else the dashboard is read-only)."""
        return bool(self._token)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO") or "/"
        try:
            status, headers, body = self._dispatch(environ, method, path)
        except HttpError as exc:
            status, headers, body = json_reply(exc.status, exc.body, exc.headers)
        except Exception:  # one broken request must not look like a dead server
            logger.exception("대시보드 요청 처리 중 예외: %s %s", method, path)
            status, headers, body = json_reply(
                HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error (see the log)"}
            )
        start_response(
            f"{status.value} {status.phrase}",
            [*headers, *_SECURITY_HEADERS, ("Content-Length", str(len(body)))],
        )
        return [body]

    def _dispatch(self, environ: WSGIEnvironment, method: str, path: str) -> Reply:
        for pattern, allowed, handler in self._routes:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            if method != allowed:
                raise HttpError(
                    HTTPStatus.METHOD_NOT_ALLOWED, f"use {allowed}", [("Allow", allowed)]
                )
            if allowed == "POST":
                self._authorize(environ)
            return handler(parse_qs(environ.get("QUERY_STRING", "")), *match.groups())
        raise HttpError(HTTPStatus.NOT_FOUND, f"not found: {path}")

    def _authorize(self, environ: WSGIEnvironment) -> None:
        client = environ.get("REMOTE_ADDR", "?")
        if not self._token:
            logger.warning("읽기 전용 대시보드에 대한 작업 요청 거부 (%s)", client)
            raise HttpError(
                HTTPStatus.FORBIDDEN, "the dashboard is read-only: set [dashboard] token"
            )
        scheme, _, given = str(environ.get("HTTP_AUTHORIZATION", "")).partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), self._token
        ):
            logger.warning("대시보드 작업 요청 거부: 토큰이 없거나 틀림 (%s)", client)
            raise HttpError(
                HTTPStatus.UNAUTHORIZED,
                "missing or wrong token",
                [("WWW-Authenticate", 'Bearer realm="scrapeq"')],
            )

    def _await(self, work: Coroutine[Any, Any, Any], timeout: float) -> Any:
        """Run ``work`` on the supervisor's loop; Redis trouble becomes an HttpError."""
        future = asyncio.run_coroutine_threadsafe(work, self._loop)
        try:
            result = future.result(timeout)
        except TimeoutError:
            future.cancel()
            self._note_outage(f"no answer within {timeout:g} s")
            raise HttpError(
                HTTPStatus.SERVICE_UNAVAILABLE, f"Redis did not answer within {timeout:g} s"
            ) from None
        except QueueConnectionException as exc:
            self._note_outage(str(exc))
            raise HttpError(HTTPStatus.SERVICE_UNAVAILABLE, "Redis is unreachable") from None
        except BackpressureException as exc:
            raise HttpError(
                HTTPStatus.TOO_MANY_REQUESTS,
                f"refused by backpressure: {exc}",
                [("Retry-After", f"{max(1, round(exc.retry_after))}")],
                retry_after=exc.retry_after,
            ) from None
        except QueueError as exc:
            raise HttpError(HTTPStatus.BAD_GATEWAY, f"Redis refused the request: {exc}") from None
        if self._redis_down:
            logger.info("대시보드: Redis 읽기 복구")
            self._redis_down = False
        return result

    def _note_outage(self, reason: str) -> None:
        """Log the first failed read of an outage only: every open page polls every second."""
        if not self._redis_down:
            logger.warning("대시보드: Redis 읽기 실패, 페이지에 오류를 보여 줌: %s", reason)
            self._redis_down = True

    def _read(self, work: Coroutine[Any, Any, Any]) -> Any:
        return self._await(work, self._read_timeout)

    def _show_page(self, params: Params) -> Reply:
        headers = [("Content-Type", "text/html; charset=utf-8")]
        return HTTPStatus.OK, [*headers, ("Content-Security-Policy", _PAGE_POLICY)], self._page

    def _overview(self, params: Params) -> Reply:
        body = self._read(dashboard_data.overview(self._queue))
        return json_reply(HTTPStatus.OK, {**body, "actions": self.actions})

    def _events(self, params: Params) -> Reply:
        query = EventQuery(
            task=_text(params, "task"),
            worker=_text(params, "worker"),
            kinds=frozenset(kind for kind in params.get("type", []) if kind),
            since=_number(params, "since"),
            after=_text(params, "after"),
        )
        if query.after is not None and not CURSOR.fullmatch(query.after):
            raise HttpError(HTTPStatus.BAD_REQUEST, "after: expected an event history cursor")
        return json_reply(HTTPStatus.OK, self._read(dashboard_data.events(self._queue, query)))

    def _dead_letters(self, params: Params) -> Reply:
        limit = _number(params, "limit") or DEAD_LETTERS_SHOWN
        if limit != int(limit) or limit > DEAD_LETTERS_MAX:
            raise HttpError(
                HTTPStatus.BAD_REQUEST, f"limit: a whole number up to {DEAD_LETTERS_MAX}"
            )
        body = self._read(dashboard_data.dead_letters(self._queue, int(limit)))
        return json_reply(HTTPStatus.OK, body)

    def _task(self, params: Params, request_id: str) -> Reply:
        record = self._read(dashboard_data.task(self._queue, request_id))
        if record is None:
            raise HttpError(HTTPStatus.NOT_FOUND, f"no such task: {request_id}")
        return json_reply(HTTPStatus.OK, record)

    def _retry_one(self, params: Params, request_id: str) -> Reply:
        manager = TaskManager(self._queue)
        if not self._await(manager.requeue_dead_letter(request_id), ACTION_TIMEOUT):
            raise HttpError(HTTPStatus.NOT_FOUND, f"not in the dead-letter queue: {request_id}")
        logger.info("대시보드에서 데드레터 재등록: %s", request_id)
        return json_reply(HTTPStatus.OK, {"requeued": 1, "request_id": request_id})

    def _retry_all(self, params: Params) -> Reply:
        manager = TaskManager(self._queue)
        count = self._await(manager.requeue_all_dead_letters(), ACTION_TIMEOUT)
        logger.info("대시보드에서 데드레터 %d개 재등록", count)
        return json_reply(HTTPStatus.OK, {"requeued": count})

    def _purge(self, params: Params) -> Reply:
        count = self._await(TaskManager(self._queue).purge_dead_letters(), ACTION_TIMEOUT)
        logger.info("대시보드에서 데드레터 %d개 삭제", count)
        return json_reply(HTTPStatus.OK, {"purged": count})


def _text(params: Params, name: str) -> str | None:
    """The query parameter ``name``; None when absent or empty (the page sends empty filters)."""
    value = params.get(name, [""])[0].strip()
    return value or None


def _number(params: Params, name: str) -> float | None:
    text = _text(params, name)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise HttpError(HTTPStatus.BAD_REQUEST, f"{name}: expected a positive number, got {text!r}")
    return value
