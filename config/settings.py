"""The one typed settings object: defaults, a TOML file, then the environment.

Precedence, highest first: keyword arguments, ``SCRAPEQ_<SECTION>__<KEY>`` env
vars, the seed's env names (``REDIS_URL``, ``REDIS_HOST``, ...), the TOML file
(``Settings.from_file(path)`` or ``SUPERVISOR_CONFIG``), the defaults.
Every failure surfaces as :class:`ConfigError`, naming the dotted key and file.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from actors.defaults import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT
from actors.endpoint import RedisEndpoint, redacted

CONFIG_ENV = "SUPERVISOR_CONFIG"
#: The most partitions one queue may have: each costs every worker a claim
#: round and each status-by-id lookup a probe.
MAX_PARTITIONS = 64

# Seed env names that set one key each (the Redis URL parts are composed apart).
_ENV_ALIASES: dict[str, tuple[str, str]] = {
    "TASK_QUEUE_TIMEOUT": ("tasks", "default_timeout"),
    "WORKER_HEARTBEAT_INTERVAL": ("heartbeat", "interval"),
    "CLEANUP_INTERVAL": ("tasks", "cleanup_interval"),
}
_URL_PARTS = ("REDIS_HOST", "REDIS_PORT", "REDIS_DB", "REDIS_PASSWORD")
_RATE_KEY = re.compile(r"script:[\w.:-]+|domain:[^\s/]+|default_domain")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class ConfigError(Exception):
    """The configuration is unusable; ``key`` is the dotted key, ``path`` the file."""

    def __init__(self, message: str, *, key: str | None = None, path: Path | None = None) -> None:
        named = path is None or str(path) in message
        super().__init__(message if named else f"{message} (config file: {path})")
        self.key = key
        self.path = path


def _check_rate_key(key: str) -> str:
    if not _RATE_KEY.fullmatch(key):
        raise ValueError("rate limit keys are 'script:NAME', 'domain:HOST' or 'default_domain'")
    return key


def _check_domain_key(key: str) -> str:
    if not key.startswith("domain:") or not _RATE_KEY.fullmatch(key):
        raise ValueError("per-domain keys are 'domain:HOST'")
    return key


Seconds = PositiveFloat
ModuleName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")]
RateKey = Annotated[str, AfterValidator(_check_rate_key)]
DomainKey = Annotated[str, AfterValidator(_check_domain_key)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


SentinelAddress = Annotated[str, StringConstraints(pattern=r"^[^\s:/]+:\d{1,5}$")]


class RedisSettings(_Section):
    url: str = "redis://127.0.0.1:6379/0"
    embedded: Literal["auto", "always", "never"] = "auto"
    # Braces would break the {hash tag} the key space wraps the prefix in.
    key_prefix: Annotated[str, StringConstraints(pattern=r"^[^\s{}]+$")] = "scraping"
    # Find the master through these Sentinels ("host:port"); the URL's host
    # and port are then unused, its credentials, database and TLS options apply.
    sentinel: tuple[SentinelAddress, ...] = ()
    master_name: Annotated[str, StringConstraints(min_length=1, pattern=r"^\S+$")] = "mymaster"
    # `url` names one node of a Redis Cluster; every command goes to its slot's master.
    cluster: bool = False
    # One logical queue over N hash tags (actors/partitions.py); 1 = today's layout.
    partitions: Annotated[int, Field(ge=1, le=MAX_PARTITIONS)] = 1
    # N > 0: an enqueue (and a completion) is acknowledged only once N replicas
    # have it (WAIT N durable_timeout), so a failover cannot lose it.
    durable_enqueue: NonNegativeInt = 0
    durable_timeout: Seconds = 1.0  # how long WAIT waits for the replicas

    @model_validator(mode="after")
    def _sentinel_is_not_embedded(self) -> Self:
        if self.sentinel and self.embedded == "always":
            raise ValueError("embedded = 'always' cannot be combined with redis.sentinel")
        if self.cluster and self.sentinel:
            raise ValueError("redis.cluster cannot be combined with redis.sentinel")
        if self.cluster and self.embedded == "always":
            raise ValueError("embedded = 'always' cannot be combined with redis.cluster")
        return self

    @field_validator("url")
    @classmethod
    def _usable_url(cls, url: str) -> str:
        # The parser every connection uses: an option it cannot honour fails here.
        RedisEndpoint.parse(url)
        return url


class WorkerSettings(_Section):
    processes: NonNegativeInt = 2
    concurrency: PositiveInt = 50
    scripts: tuple[ModuleName, ...] = ()
    max_tasks_per_child: NonNegativeInt = 0
    max_memory_mb: NonNegativeInt = 0


class TasksSettings(_Section):
    default_timeout: Seconds = DEFAULT_TIMEOUT
    max_retries: NonNegativeInt = DEFAULT_MAX_RETRIES
    retry_backoff: Seconds = 1.0
    retry_backoff_max: Seconds = 300.0
    result_ttl: Seconds = 86400.0
    max_payload_bytes: PositiveInt = 1048576
    max_result_bytes: PositiveInt = 1048576
    cleanup_interval: Seconds = 60.0

    @field_validator("retry_backoff_max")
    @classmethod
    def _max_not_below_first(cls, value: float, info: ValidationInfo) -> float:
        first = info.data.get("retry_backoff")
        if first is not None and value < first:
            raise ValueError(f"must be >= retry_backoff ({first})")
        return value


class HeartbeatSettings(_Section):
    interval: Seconds = 5.0
    timeout: Seconds = 30.0

    @field_validator("timeout")
    @classmethod
    def _longer_than_interval(cls, value: float, info: ValidationInfo) -> float:
        interval = info.data.get("interval")
        if interval is not None and value <= interval:
            raise ValueError(f"must be greater than heartbeat.interval ({interval})")
        return value


class BackpressureSettings(_Section):
    high_watermark: PositiveInt = 100000
    low_watermark: NonNegativeInt = 80000
    throttle_at: NonNegativeInt = 50000
    # A governor state older than this is ignored by enqueue, which then only
    # enforces high_watermark itself (fail open to the hard cap).
    stale_after: Seconds = 5.0

    @field_validator("low_watermark", "throttle_at")
    @classmethod
    def _below_high(cls, value: int, info: ValidationInfo) -> int:
        high = info.data.get("high_watermark")
        if high is None:
            return value
        if info.field_name == "low_watermark" and value >= high:
            raise ValueError(f"must be below backpressure.high_watermark ({high})")
        if info.field_name == "throttle_at" and value > high:
            raise ValueError(f"must not exceed backpressure.high_watermark ({high})")
        return value


class CircuitBreakerSettings(_Section):
    failures: NonNegativeInt = 5  # consecutive failures that pause a domain; 0 = off
    cooldown: Seconds = 30.0  # pause before one probe task is let through


class PolitenessSettings(_Section):
    """How scrapeq spares sites that publish no limit (docs/rate-limits.md)."""

    max_in_flight_per_domain: NonNegativeInt = 8  # tasks of one domain at once, all hosts; 0 = off
    in_flight: dict[DomainKey, NonNegativeInt] = Field(default_factory=dict)  # per-domain caps
    initial_window: PositiveInt = 2  # tasks in flight of a domain not seen before (slow start)
    adaptive: bool = True  # learn a domain's pace from 429/503, slow start after a pause
    max_retry_after: Seconds = 3600.0  # a site's Retry-After is clamped to this
    start_rate: PositiveFloat = 1.0  # tasks/s of a domain with no limit at its first 429/503
    min_rate: PositiveFloat = 0.05  # a learned rate never drops below this (tasks/s)
    idle_decay: Seconds = 60.0  # each idle period doubles a learned rate, up to the configured one
    forget_after: Seconds = 3600.0  # state of a domain idle this long is dropped


class EventsSettings(_Section):
    """The event history ``supervisor events --since`` replays (docs/events.md)."""

    history: NonNegativeInt = 100000  # events kept for replay; 0 = none
    history_max_age: Seconds = 3600.0  # entries older than this are dropped


class SupervisorSettings(_Section):
    drain_timeout: Annotated[float, Field(ge=0)] = 30.0
    restart_backoff_max: Seconds = 30.0
    max_restarts: NonNegativeInt = 10
    restart_window: Seconds = 60.0
    state_dir: Path = Path(".scrapeq")
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9464
    # Loopback by default: /metrics shows queue depths and worker hosts to anyone who reaches it.
    metrics_host: Annotated[str, StringConstraints(min_length=1, pattern=r"^[^\s/]+$")] = (
        "127.0.0.1"
    )


class DashboardSettings(_Section):
    """The web dashboard at ``/`` on the metrics port (docs/dashboard.md); read at start."""

    enabled: bool = True
    # Bearer token the actions (retry, purge) need; "" = read-only. A secret: kept out of repr.
    token: str = Field(default="", repr=False)


@dataclass(frozen=True)
class _Plan:
    """Which sources one ``Settings(...)`` call reads besides its keyword arguments."""

    path: Path | None
    use_env: bool = True


_PLAN: ContextVar[_Plan | None] = ContextVar("scrapeq_settings_plan", default=None)


@contextmanager
def _planned(plan: _Plan) -> Iterator[None]:
    token = _PLAN.set(plan)
    try:
        yield
    finally:
        _PLAN.reset(token)


def _current_plan() -> _Plan:
    plan = _PLAN.get()
    if plan is not None:
        return plan
    configured = os.environ.get(CONFIG_ENV)
    return _Plan(Path(configured) if configured else None)


class _TomlFile(TomlConfigSettingsSource):
    """The TOML source, turning a missing, unreadable or broken file into ConfigError."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path) -> None:
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}", path=path)
        self._path = path
        super().__init__(settings_cls, toml_file=path)

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        try:
            return super()._read_file(file_path)
        except OSError as exc:
            raise ConfigError(f"cannot read config file: {exc}", path=self._path) from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"invalid TOML: {exc}", path=self._path) from None


def _compose_redis_url(base: str, parts: Mapping[str, str]) -> str:
    """Replace the parts of ``base`` that REDIS_HOST/PORT/DB/PASSWORD set."""
    url = urlsplit(base)
    for name, check in (("REDIS_PORT", range(1, 65536)), ("REDIS_DB", range(1 << 31))):
        value = parts.get(name)
        if value is not None and not (value.isdigit() and int(value) in check):
            raise ConfigError(
                f"{name} must be an integer in [{check.start}, {check.stop})", key="redis.url"
            )
    password = parts.get("REDIS_PASSWORD")
    if url.scheme == "unix":
        if "REDIS_HOST" in parts or "REDIS_PORT" in parts:
            raise ConfigError(
                "REDIS_HOST/REDIS_PORT cannot apply to a unix:// redis.url", key="redis.url"
            )
        query = dict(parse_qsl(url.query))
        for name, field in (("REDIS_DB", "db"), ("REDIS_PASSWORD", "password")):
            if name in parts:
                query[field] = parts[name]
        # urlunsplit would drop the empty netloc and write "unix:/path".
        return f"unix://{url.netloc}{url.path}?{urlencode(query)}"
    try:
        port = parts.get("REDIS_PORT") or (str(url.port) if url.port else "")
    except ValueError:
        raise ConfigError(
            f"redis.url has a malformed port: {redacted(base)!r}", key="redis.url"
        ) from None
    userinfo = url.netloc.rpartition("@")[0]
    if password is not None:
        userinfo = f"{userinfo.partition(':')[0]}:{quote(password, safe='')}"
    host = parts.get("REDIS_HOST") or url.hostname or "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    netloc = (f"{userinfo}@" if userinfo else "") + host + (f":{port}" if port else "")
    db = parts.get("REDIS_DB")
    return urlunsplit(url._replace(netloc=netloc, path=f"/{db}" if db else url.path))


def _seed_env(file_data: Mapping[str, Any]) -> dict[str, Any]:
    """The seed's env names as a nested settings dict."""
    env = {name: value for name, value in os.environ.items() if value}
    found: dict[str, dict[str, Any]] = {}
    url = env.get("REDIS_URL")
    parts = {name: env[name] for name in _URL_PARTS if name in env}
    if parts:
        redis = file_data.get("redis")
        file_url = redis.get("url") if isinstance(redis, dict) else None
        base = url or (file_url if isinstance(file_url, str) else RedisSettings().url)
        url = _compose_redis_url(base, parts)
    if url:
        found["redis"] = {"url": url}
    for name, (section, key) in _ENV_ALIASES.items():
        if name in env:
            found.setdefault(section, {})[key] = env[name]
    return found


def _dotted(loc: tuple[int | str, ...]) -> str:
    """``("rate_limits", "domain:x", "[key]")`` -> ``rate_limits."domain:x"``."""
    key = ""
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
        elif part != "[key]":
            text = part if _BARE_KEY.fullmatch(part) else json.dumps(part)
            key += f".{text}" if key else text
    return key


def _describe(error: ErrorDetails) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown key"
    message = error["msg"].removeprefix("Value error, ")
    given = error["input"]
    if error["loc"] == ("redis", "url") and isinstance(given, str):
        given = redacted(given)  # never echo a password
    return f"{message} (got {given!r})"


def _from_validation(exc: ValidationError, path: Path | None) -> ConfigError:
    errors = exc.errors(include_url=False)
    lines = [f"{_dotted(e['loc']) or '<root>'}: {_describe(e)}" for e in errors]
    return ConfigError(
        "invalid configuration: " + "; ".join(lines),
        key=(_dotted(errors[0]["loc"]) or None) if errors else None,
        path=path,
    )


class Settings(BaseSettings):
    """All of scrapeq's configuration; see docs/configuration.md for every key."""

    model_config = SettingsConfigDict(
        extra="forbid",
        frozen=True,
        env_prefix="SCRAPEQ_",
        env_nested_delimiter="__",
    )

    redis: RedisSettings = Field(default_factory=RedisSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    tasks: TasksSettings = Field(default_factory=TasksSettings)
    heartbeat: HeartbeatSettings = Field(default_factory=HeartbeatSettings)
    backpressure: BackpressureSettings = Field(default_factory=BackpressureSettings)
    rate_limits: dict[RateKey, PositiveFloat] = Field(default_factory=dict)
    circuit_breaker: CircuitBreakerSettings = Field(default_factory=CircuitBreakerSettings)
    politeness: PolitenessSettings = Field(default_factory=PolitenessSettings)
    events: EventsSettings = Field(default_factory=EventsSettings)
    supervisor: SupervisorSettings = Field(default_factory=SupervisorSettings)
    dashboard: DashboardSettings = Field(default_factory=DashboardSettings)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise _from_validation(exc, _current_plan().path) from None
        except SettingsError as exc:  # an env var holding a list/table that is not JSON
            raise ConfigError(
                f"{exc}: list and table values must be JSON", path=_current_plan().path
            ) from None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        plan = _current_plan()
        if not plan.use_env:
            return (init_settings,)
        file_source = _TomlFile(settings_cls, plan.path) if plan.path else None
        file_data = file_source.toml_data if file_source else {}
        seed = InitSettingsSource(settings_cls, init_kwargs=_seed_env(file_data))
        return tuple(s for s in (init_settings, env_settings, seed, file_source) if s is not None)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Self:
        """Read ``path`` (env vars still override it), ignoring SUPERVISOR_CONFIG."""
        with _planned(_Plan(Path(path))):
            return cls()

    def to_json(self) -> str:
        """The complete settings, for handing to a child process."""
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> Self:
        """Re-validate :meth:`to_json` output; neither env vars nor a file apply."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"settings JSON is malformed: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError("settings JSON must be an object")
        with _planned(_Plan(None, use_env=False)):
            return cls(**data)
