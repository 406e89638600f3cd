from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sheetanchor.config import parse_url, redact, to_asyncpg_dsn, to_sqlalchemy_url
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
