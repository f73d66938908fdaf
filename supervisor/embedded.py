"""Decide whether ``supervisor start`` runs its own Redis, and start it at the configured URL."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from supervisor.redis_server import Address, RedisServer, open_connection

logger = logging.getLogger(__name__)

_PROBE_TIMEOUT = 0.5
_DEFAULT_PORT = 6379


def parse_address(url: str) -> Address:
    """The ``(host, port)`` or unix socket path a Redis URL points at."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError("redis.url: a unix:// URL needs an absolute socket path")
        return Path(parts.path)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"redis.url: unsupported scheme {parts.scheme!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("redis.url: the port is not a number in 0-65535") from None
    return (parts.hostname or "127.0.0.1", port or _DEFAULT_PORT)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def something_listens(address: Address, timeout: float = _PROBE_TIMEOUT) -> bool:
    """True when anything accepts a connection at ``address``.

    Accepting counts, even without a PING reply: a paused or still-loading Redis accepts
    but does not answer, and a second server could not bind that address anyway.
    """
    try:
        with open_connection(address, timeout):
            return True
    except OSError:
        return False


def should_start_embedded(mode: str, url: str) -> bool:
    """Apply ``[redis] embedded``: never, always, or auto (loopback URL with nothing there)."""
    if mode == "never":
        return False
    if mode == "always":
        return True
    if mode != "auto":
        raise ValueError(f"redis.embedded: expected 'auto', 'always' or 'never', got {mode!r}")
    if urlsplit(url).scheme == "rediss":
        logger.info("TLS(rediss://) 주소이므로 내장 Redis를 시작하지 않습니다")
        return False
    address = parse_address(url)
    if isinstance(address, tuple) and not is_loopback(address[0]):
        return False
    if something_listens(address):
        logger.info("이미 Redis가 응답하고 있어 내장 Redis를 시작하지 않습니다")
        return False
    logger.info("로컬 Redis가 없어 내장 Redis를 시작합니다")
    return True


def start_embedded(url: str, state_dir: Path) -> RedisServer:
    """Start a RedisServer at exactly the URL's address, persisting under state_dir/redis.

    A password in the URL becomes ``requirepass``, so clients built from the same URL
    authenticate; only the default user exists.
    """
    parts = urlsplit(url)
    if parts.scheme == "rediss":
        raise ValueError("redis.url: the embedded Redis cannot serve TLS (rediss://)")
    if parts.username not in (None, "", "default"):
        raise ValueError("redis.url: the embedded Redis has only the default user")
    query_password = parse_qs(parts.query).get("password", [None])[0]
    password = unquote(parts.password) if parts.password else query_password
    address = parse_address(url)
    directory = state_dir / "redis"
    if isinstance(address, Path):
        server = RedisServer(directory, unix_socket=address, password=password)
    else:
        host, port = address
        bind = "127.0.0.1" if host.lower() == "localhost" else host
        server = RedisServer(directory, host=bind, port=port, password=password)
    server.start()
    return server
