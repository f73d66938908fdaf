"""An HTTP origin server on loopback with several sites told apart by the Host header.

What a crawl meets on the web, for the politeness tests: ``hidden.test``
enforces a rate it publishes nowhere (a token bucket) and answers 429 with
``Retry-After`` beyond it; ``slow.test`` answers more slowly the more requests
it serves at once; ``ban.test`` answers its first request with an absurd
``Retry-After``; every other host answers at once. The server records every
request as the site saw it: when it arrived, what it answered, and how many
requests of that host were in flight.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self


@dataclass(frozen=True)
class Hit:
    host: str
    arrived: float  # time.time()
    status: int
    retry_after: float  # seconds, 0 when none was sent


class TokenBucket:
    """``rate`` requests per second, bursts of ``burst``: a site's hidden limit."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self._tokens, self._at = burst, time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


class Origin:
    """The server; ``hidden_rate`` is hidden.test's true rate (requests/s)."""

    def __init__(self, hidden_rate: float = 2.0, retry_after: float = 1.0) -> None:
        self.hidden = TokenBucket(hidden_rate, burst=hidden_rate)
        self.retry_after = retry_after
        self.hits: list[Hit] = []
        self.in_flight: dict[str, int] = defaultdict(int)
        self.peak_in_flight: dict[str, int] = defaultdict(int)
        self._banned_once = False
        self._lock = threading.Lock()
        origin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def do_GET(self) -> None:
                origin.serve(self)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host}:{port}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def of(self, host: str) -> list[Hit]:
        with self._lock:
            return [hit for hit in self.hits if hit.host == host]

    def serve(self, handler: BaseHTTPRequestHandler) -> None:
        host = (handler.headers.get("Host") or "").split(":")[0]
        arrived = time.time()
        with self._lock:
            self.in_flight[host] += 1
            self.peak_in_flight[host] = max(self.peak_in_flight[host], self.in_flight[host])
            status, retry_after, delay = self._answer(host)
            self.hits.append(Hit(host, arrived, status, retry_after))
        try:
            time.sleep(delay)
            handler.send_response(status)
            if retry_after:
                handler.send_header("Retry-After", f"{retry_after:g}")
            body = f"{host} {handler.path} {status}\n".encode()
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
        finally:
            with self._lock:
                self.in_flight[host] -= 1

    def _answer(self, host: str) -> tuple[int, float, float]:
        """(status, Retry-After, seconds to take) for one request; called under the lock."""
        if host == "hidden.test":
            return (200, 0.0, 0.0) if self.hidden.take() else (429, self.retry_after, 0.0)
        if host == "slow.test":
            return 200, 0.0, 0.05 * self.in_flight[host]
        if host == "ban.test" and not self._banned_once:
            self._banned_once = True
            return 429, 1_000_000_000.0, 0.0
        return 200, 0.0, 0.0
