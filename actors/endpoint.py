"""Where and how to reach Redis: the one parser of ``[redis] url``.

Every connection scrapeq opens (the multiplexed call connection, each pub/sub
subscription, the CLI's, ``/metrics``'s) is opened from a :class:`RedisEndpoint`
by ``actors/multiplexed.py``'s ``open_protocol``, so a URL means the same thing
on every path: the same TLS context, the same credentials, the same database.
An option the URL names that these connections cannot honour is refused when
the settings are read (a config error, exit 2), never silently ignored.

URL forms (redis-py's names, so a URL written for redis-py means the same):

* ``redis://[USER:PASSWORD@]HOST[:PORT][/DB]``
* ``rediss://...`` — TLS; options ``ssl_ca_certs``, ``ssl_ca_path``,
  ``ssl_certfile``, ``ssl_keyfile``, ``ssl_password``, ``ssl_cert_reqs``
  (``required``, ``optional``, ``none``), ``ssl_check_hostname``
  (``true``/``false``), ``ssl_min_version`` (``TLSv1_2``, ``TLSv1_3``),
  ``ssl_ciphers``
* ``unix:///path/to/socket?db=N&password=P[&username=U]``

``db``, ``username`` and ``password`` may also be query options of any form.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

#: TLS options of a ``rediss://`` URL.
TLS_OPTIONS = frozenset(
    {
        "ssl_ca_certs",
        "ssl_ca_path",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_password",
        "ssl_cert_reqs",
        "ssl_check_hostname",
        "ssl_min_version",
        "ssl_ciphers",
    }
)
#: Options of any URL.
COMMON_OPTIONS = frozenset({"db", "username", "password"})

_CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}
_TLS_VERSIONS = {"TLSv1_2": ssl.TLSVersion.TLSv1_2, "TLSv1_3": ssl.TLSVersion.TLSv1_3}
_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


class EndpointError(ValueError):
    """The URL cannot be used; the message names the part (never the password)."""


@dataclass(frozen=True, slots=True)
class TlsOptions:
    ca_certs: str | None = None
    ca_path: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    password: str | None = field(default=None, repr=False)
    cert_reqs: ssl.VerifyMode = ssl.CERT_REQUIRED
    check_hostname: bool = True
    min_version: ssl.TLSVersion | None = None
    ciphers: str | None = None

    def context(self) -> ssl.SSLContext:
        """The one TLS context every connection to this endpoint uses.

        Host names are checked unless ``ssl_check_hostname=false`` or
        ``ssl_cert_reqs=none`` (nothing to check a name against then).
        """
        context = ssl.create_default_context(cafile=self.ca_certs, capath=self.ca_path)
        context.check_hostname = self.check_hostname and self.cert_reqs is not ssl.CERT_NONE
        context.verify_mode = self.cert_reqs
        if self.min_version is not None:
            context.minimum_version = self.min_version
        if self.ciphers:
            context.set_ciphers(self.ciphers)
        if self.certfile:
            context.load_cert_chain(self.certfile, self.keyfile, self.password)
        return context


@dataclass(frozen=True, slots=True)
class RedisEndpoint:
    """One Redis server, as ``[redis] url`` names it."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None  # a unix socket instead of host and port
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: TlsOptions | None = None
    # With Sentinels, host and port are unused: each connection asks the
    # Sentinels where the master named ``master_name`` is now.
    sentinels: tuple[tuple[str, int], ...] = ()
    master_name: str = ""

    @classmethod
    def parse(cls, url: str) -> RedisEndpoint:
        """Read a URL; raises :class:`EndpointError` naming what is wrong."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise EndpointError(f"malformed URL: {exc}") from None
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise EndpointError("must start with redis://, rediss:// or unix://")
        options = dict(parse_qsl(parts.query, keep_blank_values=True))
        allowed = COMMON_OPTIONS | (TLS_OPTIONS if parts.scheme == "rediss" else frozenset())
        unknown = sorted(set(options) - allowed)
        if unknown:
            hint = "" if parts.scheme == "rediss" else " (ssl_* options need rediss://)"
            supported = ", ".join(sorted(allowed))
            raise EndpointError(
                f"unsupported URL option {unknown[0]!r}{hint}; supported: {supported}"
            )
        db_text = options.get("db")
        if db_text is None and parts.scheme != "unix":
            db_text = parts.path.lstrip("/")
        try:
            db = int(db_text) if db_text else 0
        except ValueError:
            raise EndpointError("the database must be a number") from None
        username = options.get("username") or (unquote(parts.username) if parts.username else None)
        password = options.get("password")
        if password is None and parts.password is not None:
            password = unquote(parts.password)
        if parts.scheme == "unix":
            if not parts.path:
                raise EndpointError("a unix:// URL needs a socket path")
            return cls(path=parts.path, db=db, username=username, password=password)
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=port or 6379,
            db=db,
            username=username,
            password=password,
            tls=_tls_options(options) if parts.scheme == "rediss" else None,
        )

    def with_sentinels(self, sentinels: Sequence[str], master_name: str) -> RedisEndpoint:
        """This endpoint, found through Sentinels (``"host:port"`` each) by ``master_name``."""
        addresses = []
        for sentinel in sentinels:
            host, _, port = sentinel.rpartition(":")
            addresses.append((host, int(port)))
        return replace(self, sentinels=tuple(addresses), master_name=master_name)

    @property
    def address(self) -> str:
        """Where the server is, fit for any message (no credentials)."""
        if self.sentinels:
            where = ",".join(f"{host}:{port}" for host, port in self.sentinels)
            return f"sentinel://{where}/{self.master_name}/{self.db}"
        if self.path is not None:
            return f"unix://{self.path}"
        scheme = "rediss" if self.tls else "redis"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/{self.db}"


def _tls_options(options: dict[str, str]) -> TlsOptions:
    def flag(name: str, default: bool) -> bool:
        text = options.get(name)
        if text is None:
            return default
        if text.lower() not in _BOOLEANS:
            raise EndpointError(f"{name} must be true or false")
        return _BOOLEANS[text.lower()]

    def choice(name: str, table: dict[str, Any], default: Any) -> Any:
        text = options.get(name)
        if text is None:
            return default
        if text not in table:
            raise EndpointError(f"{name} must be one of {', '.join(table)}")
        return table[text]

    return TlsOptions(
        ca_certs=options.get("ssl_ca_certs"),
        ca_path=options.get("ssl_ca_path"),
        certfile=options.get("ssl_certfile"),
        keyfile=options.get("ssl_keyfile"),
        password=options.get("ssl_password"),
        cert_reqs=choice("ssl_cert_reqs", _CERT_REQS, ssl.CERT_REQUIRED),
        check_hostname=flag("ssl_check_hostname", True),
        min_version=choice("ssl_min_version", _TLS_VERSIONS, None),
        ciphers=options.get("ssl_ciphers"),
    )


def redacted(url: str) -> str:
    """``url`` with every secret (a password in the user part or the query) as ``***``."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, has_password, _ = userinfo.partition(":")
        netloc = f"{user}:***@{hostport}" if has_password else netloc
    query = "&".join(
        f"{name}=***" if name in ("password", "ssl_password") else f"{name}={quote(value)}"
        for name, value in parse_qsl(parts.query, keep_blank_values=True)
    )
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
