"""Checks of the Redis server the queue lives in: at start, and on every health tick.

* An evicting ``maxmemory-policy`` silently drops task keys under memory
  pressure, so the supervisor refuses to start on one (`check_eviction_policy`).
* A Redis restarted without persistence comes back empty, and an empty queue
  looks perfectly healthy. `EpochGuard` keeps a random marker key in Redis and
  reports loudly when it disappears (and when the server's ``run_id`` changes).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence

from actors.calls import Calls
from actors.connection import translated_errors
from actors.exceptions import ScriptError
from actors.keys import KeySpace

logger = logging.getLogger(__name__)


class EvictionPolicyError(Exception):
    """The server may evict keys; the queue would lose tasks."""


class ServerVersionError(Exception):
    """The server is older than the scripts need."""


#: The scripts use ZADD LT/GT and ZRANGE REV (Redis 6.2).
MIN_VERSION = (6, 2)


def too_old(version: str) -> bool:
    """Whether a server of ``version`` ("7.0.15", "6.0.16", "255.255.255") lacks what we use."""
    parts = [int(part) if part.isdigit() else 0 for part in version.split(".")[:2]]
    return tuple(parts + [0] * (2 - len(parts))) < MIN_VERSION


async def check_server_version(connection: Calls) -> str:
    """Raise `ServerVersionError` for a Redis older than 6.2; returns the version.

    Asks ``HELLO`` (no protocol switch), which an ACL rarely refuses, unlike ``INFO``.
    A server without ``HELLO`` is older than 6.0.
    """
    try:
        with translated_errors():
            reply = await connection.execute("HELLO")
    except ScriptError as exc:
        if "unknown command" in str(exc).lower():
            raise ServerVersionError(
                "Redis is older than 6.0 (no HELLO); scrapeq needs Redis 6.2 or newer"
            ) from None
        logger.warning("Redis 버전을 확인할 수 없어 검사를 건너뜁니다: %s", exc)
        return "unknown"
    fields = dict(zip(reply[::2], reply[1::2], strict=False))
    version = str(fields.get(b"version", b"0").decode())
    if too_old(version):
        raise ServerVersionError(
            f"Redis {version} is too old: scrapeq needs Redis "
            f"{'.'.join(map(str, MIN_VERSION))} or newer (ZADD LT, ZRANGE REV)"
        )
    return version


async def check_eviction_policy(connection: Calls) -> None:
    """Raise `EvictionPolicyError` unless ``maxmemory-policy`` is ``noeviction``.

    A server that does not let us read its config (an ACL without ``CONFIG``,
    a managed service that renamed the command) is logged and accepted.
    """
    try:
        with translated_errors():
            reply = await connection.execute("CONFIG", "GET", "maxmemory-policy")
    except ScriptError as exc:  # a refusal (no permission, renamed command)
        logger.warning("Redis maxmemory-policy를 확인할 수 없어 검사를 건너뜁니다: %s", exc)
        return
    # One parameter asked for: [name, value], or [] when the server hides it.
    raw = reply[1] if len(reply) == 2 else None
    if raw is None:
        logger.warning("Redis가 maxmemory-policy 값을 알려주지 않아 검사를 건너뜁니다")
        return
    policy = raw.decode()
    if policy != "noeviction":
        raise EvictionPolicyError(
            f"maxmemory-policy is {policy!r}: Redis may evict task keys and lose tasks; "
            "set 'maxmemory-policy noeviction' on the server"
        )


class EpochGuard:
    """Detects a Redis that came back without its data.

    `establish` creates ``<base>epoch`` (in every partition) with a random
    value unless it exists (another supervisor of the same queue may have made
    it) and remembers the value and the server's ``run_id``. `check` compares
    both again.
    """

    def __init__(self, connection: Calls, partitions: Sequence[KeySpace]) -> None:
        """One epoch key per partition: on a Redis Cluster each may be on another master."""
        self._connection = connection
        self._keys = [keys.epoch for keys in partitions]
        self._epochs: dict[str, bytes] = {}
        self._run_ids: dict[str, str] = {}

    async def establish(self) -> None:
        for key in self._keys:
            self._epochs[key] = await self._ensure_epoch(key)
            self._run_ids[key] = await self._server_run_id(key)
        logger.info(
            "Redis 세대 키 확인 (run_id=%s)", ", ".join(sorted(set(self._run_ids.values())))
        )

    async def check(self) -> bool:
        """True when the data is the data we started with; logs and repairs otherwise.

        Raises ``QueueConnectionException`` when Redis cannot be reached.
        """
        intact = True
        for key in self._keys:
            intact = await self._check(key) and intact
        return intact

    async def _check(self, key: str) -> bool:
        with translated_errors():
            current = await self._connection.execute("GET", key)
        run_id = await self._server_run_id(key)
        if run_id != self._run_ids.get(key):
            logger.warning(
                "Redis 서버가 재시작되었습니다 (run_id %s → %s)", self._run_ids.get(key), run_id
            )
            self._run_ids[key] = run_id
        if current is not None and current == self._epochs.get(key):
            return True
        if current is None:
            logger.error(
                "!!! Redis 데이터 유실 감지: 세대 키 %s 가 사라졌습니다. Redis가 영속성 없이 "
                "재시작되었거나 데이터가 삭제되었습니다. 대기 중·실행 중이던 작업이 "
                "사라졌을 수 있습니다. Redis의 appendonly 설정을 확인하세요 !!!",
                key,
            )
        else:
            logger.error(
                "!!! Redis 데이터 교체 감지: 세대 키 %s 의 값이 바뀌었습니다. 다른 곳에서 "
                "데이터 유실을 먼저 감지했거나 다른 데이터셋으로 바뀌었습니다 !!!",
                key,
            )
        self._epochs[key] = await self._ensure_epoch(key)
        return False

    async def _ensure_epoch(self, key: str) -> bytes:
        """The epoch in Redis: ours if there was none, else the one already there."""
        candidate = uuid.uuid4().hex.encode()
        with translated_errors():
            while True:  # repeats only if the key is deleted between SET NX and GET
                if await self._connection.execute("SET", key, candidate, "NX"):
                    return candidate
                value = await self._connection.execute("GET", key)
                if isinstance(value, bytes):
                    return value

    async def _server_run_id(self, key: str) -> str:
        """The ``run_id`` of the server holding ``key``; "" where an ACL refuses ``INFO``
        (restarts then go unnoticed by this check, while lost data is still caught by
        the epoch key)."""
        try:
            with translated_errors():
                info: bytes = await self._connection.execute_at(key, "INFO", "server")
        except ScriptError as exc:
            if key not in self._run_ids:
                logger.warning("Redis INFO가 거부되어 재시작 감지(run_id)를 건너뜁니다: %s", exc)
            return ""
        return info_field(info, "run_id")


def info_field(info: bytes, name: str) -> str:
    """One field of an INFO reply (``name:value`` lines), "" if absent."""
    prefix = f"{name}:".encode()
    for line in info.splitlines():
        if line.startswith(prefix):
            return line[len(prefix) :].decode().strip()
    return ""
