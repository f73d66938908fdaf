"""The peer queues the benchmark compares scrapeq with.

Adapters are imported only when their system runs, so a peer that is not
installed (``uv sync --group peers``) is reported as n/a instead of failing
the whole run, and scrapeq's spawned workers never import the peers.
"""

from __future__ import annotations

import importlib
from typing import Any

from bench.common import Adapter

PEERS: dict[str, str] = {
    "saq": "bench.peers.saq_adapter:SaqAdapter",
    "taskiq": "bench.peers.taskiq_adapter:TaskiqAdapter",
    "dramatiq": "bench.peers.dramatiq_adapter:DramatiqAdapter",
    "huey": "bench.peers.huey_adapter:HueyAdapter",
}


def load_peer(name: str) -> type[Adapter[Any]]:
    """The adapter class of peer ``name``; raises ImportError if it is not installed."""
    module_name, _, class_name = PEERS[name].partition(":")
    adapter: type[Adapter[Any]] = getattr(importlib.import_module(module_name), class_name)
    return adapter
