"""The settings model: sources, precedence, validation and error texts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from config.settings import ConfigError, Settings

DEFAULT_TOML = Path(__file__).resolve().parents[1] / "config" / "default.toml"
SEED_VARS = (
    "SUPERVISOR_CONFIG",
    "REDIS_URL",
    "REDIS_HOST",
    "REDIS_PORT",
    "REDIS_DB",
    "REDIS_PASSWORD",
    "TASK_QUEUE_TIMEOUT",
    "WORKER_HEARTBEAT_INTERVAL",
    "CLEANUP_INTERVAL",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name in SEED_VARS or name.upper().startswith("SCRAPEQ_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "scrapeq.toml"
    path.write_text(text)
    return path


def test_defaults_match_the_contract() -> None:
    settings = Settings()
    assert settings.redis.url == "redis://127.0.0.1:6379/0"
    assert settings.redis.embedded == "auto"
    assert settings.worker.processes == 2
    assert settings.worker.concurrency == 50
    assert settings.tasks.default_timeout == 300
    assert settings.tasks.cleanup_interval == 60
    assert settings.heartbeat.timeout == 30
    assert settings.backpressure.high_watermark == 100000
    assert settings.rate_limits == {}
    assert settings.supervisor.state_dir == Path(".scrapeq")
    assert settings.supervisor.metrics_port == 9464


def test_shipped_default_toml_equals_the_builtin_defaults() -> None:
    assert Settings.from_file(DEFAULT_TOML) == Settings()


def test_file_values_override_defaults_and_leave_the_rest(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[worker]\nconcurrency = 8\nscripts = ["pkg.mod"]\n'
        '[rate_limits]\n"domain:example.com" = 2.0\ndefault_domain = 1\n'
        '[supervisor]\nstate_dir = "/var/lib/scrapeq"\n',
    )
    settings = Settings.from_file(path)
    assert settings.worker.concurrency == 8
    assert settings.worker.scripts == ("pkg.mod",)
    assert settings.worker.processes == 2
    assert settings.rate_limits == {"domain:example.com": 2.0, "default_domain": 1.0}
    assert settings.supervisor.state_dir == Path("/var/lib/scrapeq")


def test_env_overrides_file_and_kwargs_override_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "[worker]\nconcurrency = 8\nprocesses = 3\n[tasks]\nmax_retries = 1\n")
    monkeypatch.setenv("SCRAPEQ_WORKER__CONCURRENCY", "10")
    monkeypatch.setenv("TASK_QUEUE_TIMEOUT", "45")
    monkeypatch.setenv("WORKER_HEARTBEAT_INTERVAL", "2")
    monkeypatch.setenv("CLEANUP_INTERVAL", "15")
    settings = Settings.from_file(path)
    assert settings.worker.concurrency == 10
    assert settings.worker.processes == 3
    assert settings.tasks.max_retries == 1
    assert settings.tasks.default_timeout == 45
    assert settings.heartbeat.interval == 2
    assert settings.tasks.cleanup_interval == 15
    monkeypatch.setenv("SUPERVISOR_CONFIG", str(path))
    assert Settings(worker={"concurrency": 99}).worker.concurrency == 99


def test_supervisor_config_env_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, '[redis]\nembedded = "never"\n')
    monkeypatch.setenv("SUPERVISOR_CONFIG", str(path))
    assert Settings().redis.embedded == "never"


def test_from_file_ignores_supervisor_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SUPERVISOR_CONFIG", str(write(tmp_path, "[worker]\nconcurrency = 3\n")))
    assert Settings.from_file(DEFAULT_TOML).worker.concurrency == 50


def test_redis_url_env_replaces_the_file_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, '[redis]\nurl = "redis://file-host:6379/0"\n')
    monkeypatch.setenv("REDIS_URL", "rediss://env-host:6380/2")
    assert Settings.from_file(path).redis.url == "rediss://env-host:6380/2"


def test_redis_parts_replace_parts_of_the_file_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, '[redis]\nurl = "rediss://user:old@file-host:7000/1"\n')
    monkeypatch.setenv("REDIS_HOST", "cache.internal")
    monkeypatch.setenv("REDIS_DB", "4")
    monkeypatch.setenv("REDIS_PASSWORD", "p@ss/word")
    url = Settings.from_file(path).redis.url
    assert url == "rediss://user:p%40ss%2Fword@cache.internal:7000/4"


def test_redis_port_alone_edits_the_default_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_PORT", "6390")
    assert Settings().redis.url == "redis://127.0.0.1:6390/0"


def test_redis_parts_apply_to_a_unix_url_as_query(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "unix:///run/redis.sock")
    monkeypatch.setenv("REDIS_DB", "3")
    assert Settings().redis.url == "unix:///run/redis.sock?db=3"


def test_bad_redis_port_env_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_PORT", "http")
    with pytest.raises(ConfigError, match="REDIS_PORT") as caught:
        Settings()
    assert caught.value.key == "redis.url"


def test_unknown_key_error_names_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[worker]\nconcurency = 5\n")
    with pytest.raises(ConfigError) as caught:
        Settings.from_file(path)
    assert caught.value.key == "worker.concurency"
    assert caught.value.path == path
    assert "worker.concurency" in str(caught.value)
    assert str(path) in str(caught.value)


def test_unknown_section_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key") as caught:
        Settings.from_file(write(tmp_path, "[workers]\nprocesses = 1\n"))
    assert caught.value.key == "workers"


def test_wrong_type_error_names_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"worker\.concurrency") as caught:
        Settings.from_file(write(tmp_path, '[worker]\nconcurrency = "lots"\n'))
    assert caught.value.key == "worker.concurrency"


def test_wrong_type_from_env_names_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCRAPEQ_HEARTBEAT__TIMEOUT", "soon")
    with pytest.raises(ConfigError) as caught:
        Settings()
    assert caught.value.key == "heartbeat.timeout"
    assert caught.value.path is None


def test_non_json_list_in_env_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCRAPEQ_WORKER__SCRIPTS", "pkg.mod")
    with pytest.raises(ConfigError, match="worker"):
        Settings()
    monkeypatch.setenv("SCRAPEQ_WORKER__SCRIPTS", '["pkg.mod"]')
    assert Settings().worker.scripts == ("pkg.mod",)


def test_missing_file_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="not found") as caught:
        Settings.from_file(missing)
    assert caught.value.path == missing
    monkeypatch.setenv("SUPERVISOR_CONFIG", str(missing))
    with pytest.raises(ConfigError, match=r"nope\.toml"):
        Settings()


def test_broken_toml_is_a_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, "[worker\nconcurrency = 5\n")
    with pytest.raises(ConfigError, match="invalid TOML") as caught:
        Settings.from_file(path)
    assert caught.value.path == path
    assert caught.value.key is None


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('[rate_limits]\n"host:example.com" = 1.0\n', 'rate_limits."host:example.com"'),
        ('[rate_limits]\n"domain:example.com" = 0\n', 'rate_limits."domain:example.com"'),
        ('[rate_limits]\n"script:echo" = -5\n', 'rate_limits."script:echo"'),
    ],
)
def test_rate_limit_errors_name_the_entry(tmp_path: Path, toml: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_file(write(tmp_path, toml))
    assert caught.value.key == key
    assert key in str(caught.value)


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[backpressure]\nlow_watermark = 100000\n", "backpressure.low_watermark"),
        ("[backpressure]\nhigh_watermark = 10\nthrottle_at = 11\n", "backpressure.throttle_at"),
        ("[heartbeat]\ninterval = 30\ntimeout = 30\n", "heartbeat.timeout"),
        ("[tasks]\nretry_backoff = 10\nretry_backoff_max = 5\n", "tasks.retry_backoff_max"),
        ("[worker]\nconcurrency = 0\n", "worker.concurrency"),
        ("[worker]\nprocesses = -1\n", "worker.processes"),
        ("[tasks]\ncleanup_interval = 0\n", "tasks.cleanup_interval"),
        ('[redis]\nembedded = "sometimes"\n', "redis.embedded"),
        ('[redis]\nurl = "http://127.0.0.1:6379"\n', "redis.url"),
    ],
)
def test_failed_checks_name_the_key(tmp_path: Path, toml: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_file(write(tmp_path, toml))
    assert caught.value.key == key


def test_watermarks_in_order_are_accepted(tmp_path: Path) -> None:
    path = write(
        tmp_path, "[backpressure]\nhigh_watermark = 10\nlow_watermark = 5\nthrottle_at = 10\n"
    )
    assert Settings.from_file(path).backpressure.throttle_at == 10


def test_json_round_trip_is_exact_and_ignores_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, '[worker]\nconcurrency = 8\n[rate_limits]\n"script:echo" = 3.5\n')
    original = Settings.from_file(path)
    monkeypatch.setenv("SCRAPEQ_WORKER__CONCURRENCY", "1")
    monkeypatch.setenv("SUPERVISOR_CONFIG", str(tmp_path / "absent.toml"))
    restored = Settings.from_json(original.to_json())
    assert restored == original
    assert restored.worker.concurrency == 8


def test_from_json_revalidates() -> None:
    text = Settings().to_json().replace('"concurrency":50', '"concurrency":0')
    with pytest.raises(ConfigError) as caught:
        Settings.from_json(text)
    assert caught.value.key == "worker.concurrency"
    with pytest.raises(ConfigError, match="malformed"):
        Settings.from_json("{")
