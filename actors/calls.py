"""What every user of a calls connection needs of it, on one Redis or a Cluster.

:class:`~actors.multiplexed.MultiplexedConnection` (one server, found
directly or through Sentinel) and :class:`~actors.cluster.ClusterConnection`
(a command goes to the master of its key's slot) both are one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol


class Calls(Protocol):
    """Scripts, reads and operator commands, pipelined; retried over broken connections."""

    @property
    def reconnects(self) -> int:
        """Outages calls rode out (connections reopened); judges of heartbeats watch it."""
        ...

    async def execute(self, *args: Any) -> Any:
        """One command (on a cluster: on the master of its key's slot, or any master)."""
        ...

    async def execute_at(self, key: Any, *args: Any) -> Any:
        """One command on the server of ``key`` although it names no key (SCAN, WAIT)."""
        ...

    async def execute_many(self, *commands: Sequence[Any]) -> list[Any]:
        """Commands pipelined; replies in the caller's order."""
        ...

    async def evalsha(self, sha: str, source: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """A script by its SHA (loaded from ``source`` where the server lacks it)."""
        ...

    async def close(self) -> None: ...
