"""The actor base class: one process, one uvloop loop, one Redis client.

Lifecycle: ``main()`` connects, calls ``on_start``, runs ``run`` until asked to
stop, then ``on_stop``, and returns a ``ChildExit`` code for the supervisor.
Signal handlers only record: SIGTERM sets ``stop_requested`` (drain: finish
gracefully), SIGUSR1 also sets ``aborting`` (stop at once, handing work back;
the kernel sends it too when the supervisor dies).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from types import FrameType

from actors.exceptions import QueueConnectionException
from actors.exit_codes import ChildExit
from actors.lifecycle import exit_soon
from actors.queue import RedisQueue
from config.settings import Settings

logger = logging.getLogger(__name__)

#: How often an actor checks that its supervisor still lives.
PARENT_CHECK_INTERVAL = 0.5


class Actor:
    """Base of every actor process; subclasses implement ``run``."""

    kind = "actor"

    def __init__(self, actor_id: str, settings: Settings, parent_pid: int) -> None:
        self.actor_id = actor_id
        self.settings = settings
        self.parent_pid = parent_pid
        self.queue = RedisQueue(settings)
        self.stop_requested = asyncio.Event()  # drain or abort
        self.aborting = asyncio.Event()  # abort: hand back at once
        self.exit_code = ChildExit.OK

    def request_stop(self, *, abort: bool = False) -> None:
        if abort:
            self.aborting.set()
        self.stop_requested.set()

    async def main(self) -> int:
        self._install_signal_handlers()
        try:
            await self.queue.connect()
        except QueueConnectionException as exc:
            logger.error("%s: Redis에 연결할 수 없음: %s", self.actor_id, exc)
            return ChildExit.REDIS_UNAVAILABLE
        watch = asyncio.create_task(self._watch_parent())
        try:
            await self.on_start()
            await self.run()
        finally:
            watch.cancel()
            await self.on_stop()
            await self.queue.close()
        return self.exit_code

    async def on_start(self) -> None:
        """Called once connected, before ``run``."""

    async def run(self) -> None:
        raise NotImplementedError

    async def on_stop(self) -> None:
        """Called after ``run`` returns or fails, before the client closes."""

    async def sleep_unless_stopping(self, seconds: float) -> None:
        """Sleep, but return early once the actor is asked to stop."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.stop_requested.wait()

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)

        def on_abort(signum: int, frame: FrameType | None) -> None:
            # A plain handler, not the loop's: it runs even while a script
            # blocks the loop, and arms a hard exit in case the loop never
            # gets back to the graceful path.
            exit_soon(ChildExit.OK)
            # After the loop has ended (the process is already on its way
            # out, e.g. ending its scripts' processes) there is nothing to stop.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(lambda: self.request_stop(abort=True))

        signal.signal(signal.SIGUSR1, on_abort)

    async def _watch_parent(self) -> None:
        while True:
            await asyncio.sleep(PARENT_CHECK_INTERVAL)
            if os.getppid() != self.parent_pid:
                logger.error("%s: 감독 프로세스가 사라짐, 즉시 종료", self.actor_id)
                exit_soon(ChildExit.OK)
                self.request_stop(abort=True)
                return
