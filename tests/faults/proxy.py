"""A TCP proxy in front of Redis whose behaviour a test switches while clients use it.

Network faults without netem or iptables: clients connect to the proxy instead
of Redis, and the test flips the proxy between ``pass``, ``delay``, ``blackhole``
and ``reset``. The proxy runs its own event loop in a background thread, so a
synchronous test and an ``async`` test drive it the same way, and a mode switch
has taken effect when ``set_mode`` returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Literal, Self, TypeVar
from urllib.parse import urlsplit

_T = TypeVar("_T")

Mode = Literal["pass", "delay", "blackhole", "reset"]
MODES: tuple[Mode, ...] = ("pass", "delay", "blackhole", "reset")

#: Bytes read from one side per chunk.
CHUNK = 65536
#: How long a call from the test thread waits for the proxy's loop to act.
CONTROL_TIMEOUT = 10.0
_LINGER_RST = struct.pack("ii", 1, 0)


@dataclass(eq=False)
class _Link:
    """One client connection and, once opened, its upstream connection to Redis."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None

    def close(self, *, rst: bool) -> None:
        """Close both sides; with ``rst`` the peers get a TCP RST instead of a FIN."""
        for writer in (self.client, self.upstream):
            if writer is None or writer.transport.is_closing():
                continue
            if rst:
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                writer.transport.abort()
            else:
                writer.close()


class Proxy:
    """A switchable TCP proxy to ``host:port`` on a free loopback port.

    Usage::

        with Proxy.for_url(redis_url) as proxy:
            settings = settings_with_url(proxy.url)   # clients go through the proxy
            proxy.set_mode("delay", 0.2)              # +200 ms per chunk, each direction
            proxy.set_mode("blackhole")               # hold every byte, both ways
            proxy.set_mode("reset")                   # RST all connections, and new ones
            proxy.set_mode("pass")                    # heal: held bytes flow on
            proxy.accepted                            # connections accepted so far

    Modes:

    * ``pass``: forward both directions.
    * ``delay``: every chunk is forwarded ``seconds`` after it was read (pure
      latency: chunks are pipelined, not serialised).
    * ``blackhole``: accept new connections and keep every socket open, but
      forward nothing either way (a partition or half-open peer: clients see
      timeouts, not errors). Bytes sent meanwhile are held, as TCP would
      retransmit them, and flow on after ``pass``.
    * ``reset``: close every current connection with an RST (``SO_LINGER 0``)
      on both sides, and reset each new one at once while the mode lasts.

    ``accepted`` counts every connection accepted (reconnect storms show up
    here), ``active`` the ones open now, ``peak_active`` the most at once.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.mode: Mode = "pass"
        self.delay = 0.0
        self.accepted = 0
        self.peak_active = 0
        self._port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="fault-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._flowing: asyncio.Event | None = None
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[Any]] = set()

    @classmethod
    def for_url(cls, url: str) -> Proxy:
        """A proxy to the host and port of a ``redis://`` URL."""
        parts = urlsplit(url)
        if parts.scheme != "redis" or parts.port is None:
            raise ValueError(f"url must be redis://HOST:PORT/..., got {url!r}")
        return cls(parts.hostname or "127.0.0.1", parts.port)

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("Proxy is not started: call start() first")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def active(self) -> int:
        return len(self._links)

    def start(self) -> Self:
        self._thread.start()
        self._port = self._call(self._open())
        return self

    def set_mode(self, mode: Mode, seconds: float = 0.0) -> None:
        """Switch mode; ``seconds`` is the added latency of ``delay`` (and only of it)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if (mode == "delay") != (seconds > 0):
            raise ValueError(f"seconds must be > 0 exactly for mode 'delay', got {seconds!r}")
        self._call(self._apply(mode, seconds))

    def stop(self) -> None:
        """Close every connection and the listener, then end the loop thread."""
        if self._thread.is_alive():
            self._call(self._shutdown())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(CONTROL_TIMEOUT)
        if not self._loop.is_closed() and not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the proxy's own thread --------------------------------------------------

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _call(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(CONTROL_TIMEOUT)

    async def _open(self) -> int:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _apply(self, mode: Mode, seconds: float) -> None:
        assert self._flowing is not None
        self.mode, self.delay = mode, seconds
        if mode == "blackhole":
            self._flowing.clear()
            return
        self._flowing.set()
        if mode == "reset":
            for link in list(self._links):
                link.close(rst=True)
            handlers = set(self._handlers)
            if handlers:  # return once every reset connection is gone
                await asyncio.wait(handlers, timeout=CONTROL_TIMEOUT / 2)

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._apply("reset", 0.0)
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    def _resetting(self) -> bool:
        return self.mode == "reset"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        handler = asyncio.current_task()
        assert handler is not None
        self.accepted += 1
        link = _Link(writer)
        self._links.add(link)
        self._handlers.add(handler)
        self.peak_active = max(self.peak_active, len(self._links))
        try:
            await self._flowing.wait()  # blackhole: hold the client before connecting upstream
            if self._resetting():
                return
            up_reader, link.upstream = await asyncio.open_connection(*self.target)
            if self._resetting():  # switched while connecting
                return
            pumps = [
                asyncio.create_task(self._pump(reader, link.upstream)),
                asyncio.create_task(self._pump(up_reader, writer)),
            ]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        except OSError:
            pass  # Redis refused or a side vanished: the link just ends
        finally:
            link.close(rst=self._resetting())
            self._links.discard(link)
            self._handlers.discard(handler)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy one direction; a separate sender keeps delayed chunks pipelined and in order."""
        assert self._flowing is not None
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        sender = asyncio.create_task(self._send(chunks, writer))
        try:
            while True:
                await self._flowing.wait()
                data = await reader.read(CHUNK)
                if not data:
                    break
                chunks.put_nowait((loop.time() + self.delay, data))
            chunks.put_nowait(None)
            await sender
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)

    async def _send(
        self, chunks: asyncio.Queue[tuple[float, bytes] | None], writer: asyncio.StreamWriter
    ) -> None:
        assert self._flowing is not None
        loop = asyncio.get_running_loop()
        while (item := await chunks.get()) is not None:
            due, data = item
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            await self._flowing.wait()
            writer.write(data)
            await writer.drain()
