"""The entry point of every actor process.

The supervisor starts each actor with the ``spawn`` start method (never a
fork of a live loop or Redis client): ``actor_main(spec)`` re-validates the
settings it was handed as JSON, builds the actor, runs it on uvloop and exits
with a ``ChildExit`` code.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

import uvloop

from actors.base import Actor
from actors.exit_codes import ChildExit
from actors.governor import Governor
from actors.heartbeat import HeartbeatMonitor
from actors.lifecycle import adopt_orphans, die_with_parent
from actors.reaper import Reaper
from actors.scripts import import_script_modules
from actors.worker import DESCENDANT_GRACE, Worker, end_descendants
from config.settings import ConfigError, Settings
from supervisor.logs import configure_logging

logger = logging.getLogger(__name__)

ACTOR_KINDS: dict[str, type[Actor]] = {
    "worker": Worker,
    "heartbeat": HeartbeatMonitor,
    "reaper": Reaper,
    "governor": Governor,
}


@dataclass(frozen=True, slots=True)
class ActorSpec:
    """Everything a child process needs, picklable for the spawn start method."""

    kind: str
    actor_id: str
    settings_json: str
    parent_pid: int


def configure_child_logging(actor_id: str) -> None:
    """The supervisor's log format and setup (supervisor/logs.py), naming the actor."""
    configure_logging("INFO", source=actor_id)


def run_actor(spec: ActorSpec) -> int:
    """Run one actor to completion; returns its exit code."""
    try:
        settings = Settings.from_json(spec.settings_json)
        if spec.kind == "worker":
            import_script_modules(settings.worker.scripts)
    except (ConfigError, ImportError) as exc:
        logger.error("%s: 설정 오류로 시작할 수 없음: %s", spec.actor_id, exc)
        return ChildExit.CONFIG_ERROR
    actor = ACTOR_KINDS[spec.kind](spec.actor_id, settings, spec.parent_pid)
    if spec.kind != "worker":
        return uvloop.run(actor.main())
    # A worker process ends what its scripts started and left running (a
    # browser, a daemon): it is their subreaper, so even those that left
    # their own parent are its descendants when it exits.
    adopt_orphans()
    try:
        return uvloop.run(actor.main())
    finally:
        end_descendants(DESCENDANT_GRACE)


def actor_main(spec: ActorSpec) -> None:
    """Process target: never returns; exits with the actor's code.

    ``os._exit`` skips joining threads that a timed-out synchronous script may
    still occupy: the process is being replaced anyway.
    """
    die_with_parent(spec.parent_pid)
    configure_child_logging(spec.actor_id)
    try:
        code = run_actor(spec)
    except Exception:
        logger.exception("%s: 예기치 않은 오류로 종료", spec.actor_id)
        code = ChildExit.CRASH
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
