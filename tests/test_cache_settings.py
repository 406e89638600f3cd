"""CacheSettings refuse combinations that would let a stale backfill into the cache."""

from __future__ import annotations

import pytest

from sheetanchor.errors import ConfigError
from sheetanchor.state import CacheSettings


def test_max_backfill_age_must_be_shorter_than_a_tombstone_lives() -> None:
    # A backfill that read the row before a delete must land while the delete's tombstone
    # still fences it out; otherwise the deleted row would be cached again.
    with pytest.raises(ConfigError) as err:
        CacheSettings(max_backfill_age=60.0)  # tombstones live 9-10 s by default
    message = str(err.value)
    assert "max_backfill_age" in message
    assert "tombstone_ttl" in message
    assert "9.0" in message  # the bound: tombstone_ttl * (1 - ttl_jitter)
    with pytest.raises(ConfigError, match="tombstone_ttl"):
        CacheSettings(tombstone_ttl=2.0, ttl_jitter=0.5, max_backfill_age=1.0)  # the bound


def test_max_backfill_age_must_be_shorter_than_a_cached_row_lives() -> None:
    with pytest.raises(ConfigError, match="ttl"):
        CacheSettings(ttl=5.0, tombstone_ttl=100.0, max_backfill_age=4.9)  # bound 4.5


def test_max_backfill_age_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="max_backfill_age"):
        CacheSettings(max_backfill_age=0.0)


def test_valid_backfill_ages() -> None:
    assert CacheSettings().backfill_age == pytest.approx(4.5)  # min(300, 10) * 0.9 / 2
    assert CacheSettings(max_backfill_age=8.9).backfill_age == 8.9
    slow = CacheSettings(tombstone_ttl=200.0, max_backfill_age=60.0)
    assert slow.backfill_age == 60.0
