from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sheetanchor.config import (
    parse_url,
    redact,
    to_asyncpg_dsn,
    to_sqlalchemy_url,
    with_database,
)
from sheetanchor.errors import ConfigError


def test_parse_pg_url_masks_password_in_repr_and_str() -> None:
    url = parse_url("postgresql://app:s3cret@db.example:6432/orders?sslmode=disable")
    assert url.kind == "postgres"
    assert (url.host, url.port, url.user, url.database) == ("db.example", 6432, "app", "orders")
    assert url.password == "s3cret"
    assert "s3cret" not in repr(url)
    assert "s3cret" not in str(url)
    assert url.address == "db.example:6432"


def test_parse_redis_url() -> None:
    url = parse_url("redis://:pw@127.0.0.1:6379/3")
    assert url.kind == "redis"
    assert url.database == "3"
    assert "pw@" not in url.display


@pytest.mark.parametrize("bad", ["", "   ", "mysql://x@y/z", "postgresql://h:notaport/db"])
def test_parse_url_rejects_with_config_error(bad: str) -> None:
    with pytest.raises(ConfigError):
        parse_url(bad)


def test_driver_url_rewrites() -> None:
    assert to_sqlalchemy_url("postgres://u@h/d") == "postgresql+asyncpg://u@h/d"
    assert to_asyncpg_dsn("postgresql+asyncpg://u@h/d") == "postgresql://u@h/d"


def test_redact_keyword_password() -> None:
    assert "hunter2" not in redact("host=db user=x password=hunter2 dbname=y")


# Characters legal unencoded in a URL's userinfo (RFC 3986 unreserved + sub-delims, minus ':').
_USERINFO_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;="


@given(st.text(alphabet=_USERINFO_CHARS, min_size=1))
def test_redact_never_leaks_any_password(password: str) -> None:
    text = f"failed to connect to postgresql://user:{password}@127.0.0.1:5432/db: refused"
    out = redact(text)
    assert f":{password}@" not in out
    assert "postgresql://user:***@127.0.0.1:5432/db" in out


@given(st.text(alphabet=_USERINFO_CHARS + "@", min_size=1).filter(lambda p: not p.startswith("@")))
def test_redact_masks_passwords_containing_at_signs(password: str) -> None:
    out = redact(f"could not connect: postgresql://user:{password}@db.internal:5432/app")
    assert out == "could not connect: postgresql://user:***@db.internal:5432/app"


@pytest.mark.parametrize("quote", ["'", '"'])
def test_redact_masks_quoted_keyword_passwords(quote: str) -> None:
    out = redact(f"host=db password={quote}two words{quote} user=x")
    assert "two" not in out
    assert "words" not in out
    assert out.endswith(" user=x")


_WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_", min_size=1, max_size=12)
_NAMES = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20)


@given(
    scheme=st.sampled_from(["postgresql", "postgres", "postgresql+asyncpg", "redis", "rediss"]),
    user=st.none() | _WORD,
    password=st.none() | _WORD,
    host=st.none() | _WORD,
    port=st.none() | st.integers(1, 65535),
    path=st.sampled_from(["", "/", "/postgres", "/3", "/a%2Fb"]),
    query=st.lists(st.tuples(_WORD, _WORD), max_size=3),
    database=_NAMES,
)
def test_with_database_replaces_only_the_database(
    scheme: str,
    user: str | None,
    password: str | None,
    host: str | None,
    port: int | None,
    path: str,
    query: list[tuple[str, str]],
    database: str,
) -> None:
    userinfo = ""
    if user is not None:
        userinfo = user + (f":{password}" if password is not None else "") + "@"
    netloc = userinfo + (host or "") + (f":{port}" if port is not None and host else "")
    qs = "&".join(f"{k}={v}" for k, v in query)
    url = f"{scheme}://{netloc}{path}" + (f"?{qs}" if qs else "")

    result = with_database(url, database)

    before, after = parse_url(url), parse_url(result)
    assert after.database == database
    assert (after.scheme, after.host, after.port, after.user, after.password, after.query) == (
        before.scheme,
        before.host,
        before.port,
        before.user,
        before.password,
        before.query,
    )
    assert result.endswith(f"?{qs}") if qs else "?" not in result


def test_with_database_examples() -> None:
    assert (
        with_database("postgresql://u:p@db:5432/postgres?sslmode=disable", "orders")
        == "postgresql://u:p@db:5432/orders?sslmode=disable"
    )
    assert with_database("redis://127.0.0.1:6379", "3") == "redis://127.0.0.1:6379/3"
    assert with_database("redis://h:1?protocol=3", "2") == "redis://h:1/2?protocol=3"
    assert with_database("postgresql://h/x", "a b/c") == "postgresql://h/a%20b%2Fc"
    # No host (libpq's socket directory in the query): the "//" must stay.
    assert (
        with_database("postgresql:///x?host=/run/postgresql", "y")
        == "postgresql:///y?host=/run/postgresql"
    )
    assert (
        with_database("unix:///tmp/redis.sock?db=0&protocol=3", "5")
        == "unix:///tmp/redis.sock?protocol=3&db=5"
    )
    with pytest.raises(ConfigError, match="database"):
        with_database("postgresql://h/x", "")
    with pytest.raises(ConfigError, match="expected a URL"):
        with_database("localhost:5432", "x")
