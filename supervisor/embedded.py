"""Decide whether ``supervisor start`` runs its own Redis, and start it at the configured URL."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from urllib.parse import urlsplit

from actors.endpoint import EndpointError, RedisEndpoint
from supervisor.redis_server import Address, RedisServer, open_connection

logger = logging.getLogger(__name__)

_PROBE_TIMEOUT = 0.5


def parse_address(url: str) -> Address:
    """The ``(host, port)`` or unix socket path a Redis URL points at (actors/endpoint.py)."""
    try:
        endpoint = RedisEndpoint.parse(url)
    except EndpointError as exc:
        raise ValueError(f"redis.url: {exc}") from None
    return Path(endpoint.path) if endpoint.path is not None else (endpoint.host, endpoint.port)


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


def should_start_embedded(mode: str, url: str, state_dir: Path) -> bool:
    """Apply ``[redis] embedded``: never, always, or auto (loopback URL with nothing there).

    ``auto`` never starts a server on an address where another Redis has
    served this state directory before (see :func:`remember_external`): that
    Redis is merely down, and an empty one of ours in its place would hide
    its data; the supervisor waits for it instead.
    """
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
    marker = _external_marker(state_dir)
    if marker.is_file() and marker.read_text().strip() == _address_text(address):
        logger.warning(
            "설정된 Redis(%s)가 응답하지 않지만 전에 이 주소에서 동작했으므로 "
            "내장 Redis를 시작하지 않고 복구를 기다립니다",
            _address_text(address),
        )
        return False
    logger.info("로컬 Redis가 없어 내장 Redis를 시작합니다")
    return True


def remember_external(url: str, state_dir: Path) -> None:
    """Record that a Redis not started by us serves ``url`` (``auto`` then never replaces it)."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        _external_marker(state_dir).write_text(_address_text(parse_address(url)) + "\n")
    except OSError as exc:
        logger.warning("외부 Redis 주소를 상태 디렉터리에 기록하지 못했습니다: %s", exc)


def _external_marker(state_dir: Path) -> Path:
    return state_dir / "external-redis"


def _address_text(address: Address) -> str:
    return str(address) if isinstance(address, Path) else f"{address[0]}:{address[1]}"


def start_embedded(url: str, state_dir: Path) -> RedisServer:
    """Start a RedisServer at exactly the URL's address, persisting under state_dir/redis.

    A password in the URL becomes ``requirepass``, so clients built from the same URL
    authenticate; only the default user exists.
    """
    if urlsplit(url).scheme == "rediss":
        raise ValueError("redis.url: the embedded Redis cannot serve TLS (rediss://)")
    endpoint = RedisEndpoint.parse(url)
    if endpoint.username not in (None, "", "default"):
        raise ValueError("redis.url: the embedded Redis has only the default user")
    password = endpoint.password
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
