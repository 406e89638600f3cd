from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sheetanchor.errors import ConfigError
from sheetanchor.ingest._tail import Tail

T0 = dt.datetime(2026, 11, 23, tzinfo=dt.UTC)


def test_last_and_since_on_dict_records() -> None:
    tail: Tail[dict[str, Any]] = Tail(3)
    for i in range(5):
        tail.append({"ts": float(i), "i": i})
    assert [r["i"] for r in tail.last(2)] == [3, 4]
    assert [r["i"] for r in tail.last(10)] == [2, 3, 4]
    assert tail.last(0) == []
    assert [r["i"] for r in tail.since(3.0)] == [3, 4]
    assert tail.since(99.0) == []
    assert tail.stats().dropped_by_length == 2
    with pytest.raises(ValueError, match="n >= 0"):
        tail.last(-1)


def test_max_age_with_datetime_keys_and_float_age() -> None:
    tail: Tail[dict[str, Any]] = Tail(1000, max_age=10.0)
    for s in range(0, 30, 2):
        tail.append({"ts": T0 + dt.timedelta(seconds=s)})
    assert [r["ts"] for r in tail] == [T0 + dt.timedelta(seconds=s) for s in range(18, 30, 2)]
    assert tail.stats().dropped_by_age == 9
    recent = tail.since(T0 + dt.timedelta(seconds=25))
    assert len(recent) == 2


def test_custom_key_and_timedelta_age_on_number_keys() -> None:
    tail: Tail[tuple[float, str]] = Tail(10, max_age=dt.timedelta(seconds=1), key=lambda r: r[0])
    tail.extend([(0.0, "a"), (0.5, "b"), (1.2, "c")])
    assert [r[1] for r in tail] == ["b", "c"]
    tail.clear()
    assert len(tail) == 0
    assert tail.stats().appended == 3


@pytest.mark.parametrize(
    ("kwargs", "name"), [({"maxlen": 0}, "maxlen"), ({"max_age": -1}, "max_age")]
)
def test_bad_settings(kwargs: Any, name: str) -> None:
    args = {"maxlen": 5, **kwargs}
    with pytest.raises(ConfigError, match=name):
        Tail(**args)


@given(
    maxlen=st.integers(1, 30),
    max_age=st.one_of(st.none(), st.integers(0, 50)),
    steps=st.lists(st.integers(0, 10), max_size=120),
    n=st.integers(0, 40),
    back=st.integers(0, 60),
)
def test_tail_matches_a_model(
    maxlen: int, max_age: int | None, steps: list[int], n: int, back: int
) -> None:
    tail: Tail[dict[str, int]] = Tail(maxlen, max_age)
    history: list[dict[str, int]] = []
    ts = 0
    for i, step in enumerate(steps):
        ts += step  # keys never decrease
        record = {"ts": ts, "i": i}
        tail.append(record)
        history.append(record)
        kept = history[-maxlen:]
        if max_age is not None:
            kept = [r for r in kept if r["ts"] >= ts - max_age]
        assert list(tail) == kept
        assert len(tail) <= maxlen
    kept = list(tail)
    assert tail.last(n) == (kept[-n:] if n else [])
    start = ts - back
    assert tail.since(start) == [r for r in kept if r["ts"] >= start]
    stats = tail.stats()
    assert stats.appended == len(steps)
    assert stats.size + stats.dropped_by_length + stats.dropped_by_age == len(steps)
