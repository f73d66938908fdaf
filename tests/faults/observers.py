"""Watchers that run beside a fault test in threads: the event stream and Redis's client count.

Both talk to Redis directly (give them the real server's URL, not a proxy's),
survive Redis being killed or paused (they reconnect and count the gaps) and
work from sync and ``async`` tests alike.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from typing import Any, Self

import redis
from redis import exceptions as redis_errors
from redis.backoff import NoBackoff
from redis.retry import Retry

from actors.keys import KeySpace

#: Seconds between reconnect attempts while Redis is down.
RECONNECT_DELAY = 0.1
#: How long ``start`` waits for the first subscription.
START_TIMEOUT = 10.0
_UNREACHABLE = (redis_errors.ConnectionError, redis_errors.TimeoutError)


class _Watcher:
    """A daemon thread running ``_watch`` until ``stop``; a context manager."""

    name = "watcher"

    def __init__(self, url: str) -> None:
        self.url = url
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=self.name, daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(START_TIMEOUT)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _client(self) -> redis.Redis:
        # No retries: an outage must show up as a failed poll now, not stall the thread.
        return redis.Redis.from_url(
            self.url, socket_connect_timeout=1, socket_timeout=2, retry=Retry(NoBackoff(), 0)
        )

    def _watch(self) -> None:
        raise NotImplementedError


class EventRecorder(_Watcher):
    """Records the queue's JSON events (``KeySpace(prefix).events``) while a test runs.

    Usage::

        with EventRecorder(redis_url, key_prefix) as events:   # subscribed on return
            ...run the workload and the fault...
            completions = events.counts("task.completed")   # request id -> count
            registered = events.total("worker.registered")

    Events are keyed by ``request_id`` (task events) or ``worker_id`` (worker
    events). Events published while the subscription was down (Redis killed,
    connection reset) are missed; ``gaps`` counts such interruptions.
    """

    name = "event-recorder"

    def __init__(self, url: str, prefix: str, queue: str = "default") -> None:
        super().__init__(url)
        self.channel = KeySpace(prefix, queue).events
        self.events: list[dict[str, Any]] = []
        self.gaps = 0
        self._subscribed = threading.Event()  # the first subscription succeeded
        self._live = False  # subscribed on the current connection
        self._lock = threading.Lock()

    def start(self) -> Self:
        """Start, and return once subscribed: every event published after this is seen."""
        super().start()
        if not self._subscribed.wait(START_TIMEOUT):
            self.stop()
            raise RuntimeError(f"EventRecorder could not subscribe to {self.channel} at {self.url}")
        return self

    def counts(self, event: str) -> dict[str, int]:
        """How often ``event`` was seen per request id (or worker id)."""
        with self._lock:
            keys = [
                str(e.get("request_id", e.get("worker_id")))
                for e in self.events
                if e["event"] == event
            ]
        return dict(Counter(keys))

    def total(self, event: str) -> int:
        with self._lock:
            return sum(1 for e in self.events if e["event"] == event)

    def _watch(self) -> None:
        while not self._stopping.is_set():
            client = self._client()
            pubsub = client.pubsub()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
            try:
                pubsub.subscribe(self.channel)
                self._listen(pubsub)
            except _UNREACHABLE:
                if self._live:
                    self.gaps += 1
                    self._live = False
                self._stopping.wait(RECONNECT_DELAY)
            finally:
                pubsub.close()
                client.close()

    def _listen(self, pubsub: redis.client.PubSub) -> None:
        while not self._stopping.is_set():
            message = pubsub.get_message(timeout=0.2)
            if message is None:
                continue
            if message["type"] == "subscribe":
                self._live = True
                self._subscribed.set()
            elif message["type"] == "message":
                event = json.loads(message["data"])
                with self._lock:
                    self.events.append(event)


class ConnectionSampler(_Watcher):
    """Polls ``INFO clients`` every ``interval`` seconds and keeps the peak ``connected_clients``.

    Usage::

        with ConnectionSampler(redis_url) as sampler:
            ...
        report.peak_connections = sampler.peak

    The count includes the sampler's own connection (and an ``EventRecorder``'s).
    Polls that fail while Redis is down are counted in ``failures``.
    """

    name = "connection-sampler"

    def __init__(self, url: str, interval: float = 0.2) -> None:
        super().__init__(url)
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self.failures = 0

    def _watch(self) -> None:
        client = self._client()
        try:
            while not self._stopping.is_set():
                try:
                    info: dict[str, Any] = client.info("clients")
                except _UNREACHABLE:
                    self.failures += 1
                else:
                    self.samples += 1
                    self.peak = max(self.peak, int(info["connected_clients"]))
                self._stopping.wait(self.interval)
        finally:
            client.close()
