"""Settings: keyword arguments first, then ``SHEETANCHOR_*`` environment variables.

This is the only module that reads the environment. It also owns URL parsing and password
redaction: anything printed, logged or put in an error message goes through :func:`redact`.

Environment variables:
    SHEETANCHOR_PG_URL      PostgreSQL URL (``postgresql://user:pass@host:port/db``)
    SHEETANCHOR_REDIS_URL   Redis URL (``redis://[:pass@]host:port/db``)
    SHEETANCHOR_HOME        where embedded servers and dead letters live
                            (default: the per-user cache directory, ``~/.cache/sheetanchor``)
    SHEETANCHOR_LOG_LEVEL   DEBUG, INFO, WARNING (default), ERROR
    SHEETANCHOR_LOG_FORMAT  ``plain`` (default) or ``json``
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from sheetanchor.errors import ConfigError

__all__ = [
    "ENV_HOME",
    "ENV_LOG_FORMAT",
    "ENV_LOG_LEVEL",
    "ENV_PG_URL",
    "ENV_REDIS_URL",
    "ParsedURL",
    "check_seconds",
    "env",
    "home_dir",
    "parse_url",
    "pg_url_from_env",
    "redact",
    "redis_url_from_env",
    "to_asyncpg_dsn",
    "to_sqlalchemy_url",
]

ENV_PG_URL = "SHEETANCHOR_PG_URL"
ENV_REDIS_URL = "SHEETANCHOR_REDIS_URL"
ENV_HOME = "SHEETANCHOR_HOME"
ENV_LOG_LEVEL = "SHEETANCHOR_LOG_LEVEL"
ENV_LOG_FORMAT = "SHEETANCHOR_LOG_FORMAT"

_PG_SCHEMES = {"postgres", "postgresql", "postgresql+asyncpg", "postgresql+psycopg"}
_REDIS_SCHEMES = {"redis", "rediss", "unix"}
_MASK = "***"

# user:password@ in any URL-looking string; used to scrub free text (driver messages).
# The password runs to the LAST "@" of the authority (drivers accept "p@ss" unencoded).
_USERINFO = re.compile(
    r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^:@/\s]*):(?P<pw>[^/?#\s]*)@"
)
# password=... in libpq keyword strings and query strings, quoted or not.
_PW_PARAM = re.compile(r"""(?i)(password\s*=\s*)('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^&\s]+)""")


def env(name: str, default: str | None = None) -> str | None:
    """Return the environment variable ``name`` or ``default``; empty counts as unset."""
    value = os.environ.get(name)
    return value if value else default


def check_seconds(
    name: str, value: object, *, allow_none: bool = False, allow_zero: bool = False
) -> None:
    """Raise :class:`ConfigError` naming ``name`` unless ``value`` is a usable number of seconds.

    NaN and infinity are refused: a deadline of NaN never expires, so it would wait forever.
    """
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a number of seconds, got {value!r}")
    if math.isnan(value) or math.isinf(value):
        raise ConfigError(f"{name} must be a finite number of seconds, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be {bound} seconds, got {value!r}")


def pg_url_from_env() -> str | None:
    """The PostgreSQL URL from ``SHEETANCHOR_PG_URL``, or ``None`` when unset."""
    return env(ENV_PG_URL)


def redis_url_from_env() -> str | None:
    """The Redis URL from ``SHEETANCHOR_REDIS_URL``, or ``None`` when unset."""
    return env(ENV_REDIS_URL)


def home_dir() -> Path:
    """Directory for embedded servers and dead letters (``SHEETANCHOR_HOME`` or the cache dir)."""
    configured = env(ENV_HOME)
    if configured:
        return Path(configured).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("sheetanchor", appauthor=False))


def redact(text: str) -> str:
    """Mask every password in ``text`` (URLs and ``password=`` parameters).

    >>> redact("postgresql://app:s3cret@db:5432/x")
    'postgresql://app:***@db:5432/x'
    """
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{_MASK}@", text)
    return _PW_PARAM.sub(lambda m: f"{m.group(1)}{_MASK}", text)


@dataclass(frozen=True, slots=True)
class ParsedURL:
    """A parsed PostgreSQL or Redis URL. ``repr`` and ``str`` never show the password."""

    scheme: str
    host: str | None
    port: int | None
    user: str | None
    password: str | None
    database: str | None
    query: tuple[tuple[str, str], ...]
    raw: str

    @property
    def kind(self) -> str:
        """``"postgres"`` or ``"redis"``."""
        return "redis" if self.scheme in _REDIS_SCHEMES else "postgres"

    @property
    def display(self) -> str:
        """The URL with its password masked."""
        return redact(self.raw)

    @property
    def address(self) -> str:
        """``host:port`` (or the socket directory), for messages."""
        host = self.host or dict(self.query).get("host") or "localhost"
        if self.port is not None:
            return f"{host}:{self.port}"
        return host

    def __repr__(self) -> str:
        return f"ParsedURL({self.display!r})"

    def __str__(self) -> str:
        return self.display


def parse_url(url: str) -> ParsedURL:
    """Parse a PostgreSQL or Redis URL, raising :class:`ConfigError` with the reason.

    Raises:
        ConfigError: the scheme is unknown, the port is not a number, or the URL is empty.
    """
    if not url or not url.strip():
        raise ConfigError(f"empty database URL; set {ENV_PG_URL} or {ENV_REDIS_URL}")
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in _PG_SCHEMES | _REDIS_SCHEMES:
        raise ConfigError(
            f"unsupported URL scheme {scheme!r} in {redact(url)!r}; expected one of "
            "postgresql://, postgres://, redis://, rediss://, unix://"
        )
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"invalid port in {redact(url)!r}: {exc}") from exc
    path = unquote(parts.path.lstrip("/")) or None
    return ParsedURL(
        scheme=scheme,
        host=parts.hostname,
        port=port,
        user=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        database=path,
        query=tuple(parse_qsl(parts.query)),
        raw=url.strip(),
    )


def to_sqlalchemy_url(url: str) -> str:
    """Rewrite a PostgreSQL URL for SQLAlchemy's asyncpg dialect (``postgresql+asyncpg://``)."""
    parsed = parse_url(url)
    if parsed.kind != "postgres":
        raise ConfigError(f"expected a PostgreSQL URL, got {parsed.display!r}")
    rest = parsed.raw.split("://", 1)[1]
    return f"postgresql+asyncpg://{rest}"


def to_asyncpg_dsn(url: str) -> str:
    """Rewrite a PostgreSQL URL into a DSN asyncpg accepts (``postgresql://``)."""
    parsed = parse_url(url)
    if parsed.kind != "postgres":
        raise ConfigError(f"expected a PostgreSQL URL, got {parsed.display!r}")
    rest = parsed.raw.split("://", 1)[1]
    return f"postgresql://{rest}"
