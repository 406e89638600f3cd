from __future__ import annotations

import datetime as dt
import logging
import random
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sheetanchor.errors import ConfigError, RecordError
from sheetanchor.ingest.quality import (
    Finding,
    PriceOutlier,
    QualityCheck,
    QualityGate,
    TimeGap,
    TimestampBackwards,
    ZeroVolume,
)
from sheetanchor.observe import REGISTRY

T0 = dt.datetime(2026, 11, 23, 9, 0, tzinfo=dt.UTC)


def _market(seed: int, n: int, symbols: tuple[str, ...] = ("AAA", "BBB")) -> list[dict[str, Any]]:
    """Clean synthetic ticks: one per second per symbol, mean-reverting prices, volume > 0."""
    rng = random.Random(seed)
    base = {s: 50.0 + 50 * i for i, s in enumerate(symbols)}
    ticks = []
    for i in range(n):
        for symbol in symbols:
            ticks.append(
                {
                    "symbol": symbol,
                    "ts": T0 + dt.timedelta(seconds=i),
                    "price": round(base[symbol] * (1 + rng.gauss(0, 0.002)), 4),
                    "volume": rng.randint(1, 500),
                }
            )
    return ticks


def _checks(**overrides: bool) -> list[QualityCheck]:
    return [
        TimeGap(max_gap=dt.timedelta(seconds=5), reject=overrides.get("time_gap", False)),
        TimestampBackwards(reject=overrides.get("timestamp_backwards", False)),
        PriceOutlier(window=50, threshold=8.0, reject=overrides.get("price_outlier", False)),
        ZeroVolume(reject=overrides.get("zero_volume", False)),
    ]


def _count(stream: str, check: str) -> float:
    value = REGISTRY.get_sample_value(
        "sheetanchor_ingest_quality_findings_total", {"stream": stream, "check": check}
    )
    return value or 0.0


def test_clean_market_data_has_no_findings() -> None:
    gate = QualityGate("clean", _checks())
    for tick in _market(seed=1, n=300):
        assert gate.inspect(tick) == []
    assert gate.findings_total == 0


def test_each_defect_is_found_once_and_counted() -> None:
    ticks = _market(seed=2, n=120, symbols=("AAA",))
    ticks[60]["price"] = ticks[60]["price"] * 1.5  # a wild print
    ticks[70]["volume"] = 0
    ticks[80]["ts"] = ticks[79]["ts"] - dt.timedelta(seconds=3)  # goes back in time
    for tick in ticks[91:]:
        tick["ts"] += dt.timedelta(seconds=30)  # a 31 s hole in the feed
    gate = QualityGate("defects", _checks())
    names = ("price_outlier", "zero_volume", "time_gap", "timestamp_backwards")
    before = {c: _count("defects", c) for c in names}

    found: dict[int, list[Finding]] = {}
    for i, tick in enumerate(ticks):
        findings = gate.inspect(tick)  # the record still flows: inspect only reports
        if findings:
            found[i] = findings

    assert sorted(found) == [60, 70, 80, 91]
    assert [f.check for f in found[60]] == ["price_outlier"]
    assert found[60][0].field == "price"
    assert found[60][0].key == "AAA"
    assert [f.check for f in found[70]] == ["zero_volume"]
    assert [f.check for f in found[80]] == ["timestamp_backwards"]
    assert [f.check for f in found[91]] == ["time_gap"]
    assert "31.000 s" in found[91][0].message
    assert all(_count("defects", c) == before[c] + 1 for c in names)
    assert gate.findings_total == 4


def test_reject_raises_record_error_naming_field_and_value() -> None:
    gate = QualityGate("strict", _checks(zero_volume=True))
    before = _count("strict", "zero_volume")
    gate.inspect({"symbol": "A", "ts": T0, "price": 10.0, "volume": 5})
    with pytest.raises(RecordError, match="volume=0") as info:
        gate.inspect({"symbol": "A", "ts": T0, "price": 10.0, "volume": 0})
    assert (info.value.stream, info.value.field, info.value.value) == ("strict", "volume", 0)
    assert _count("strict", "zero_volume") == before + 1  # counted even though rejected


def test_logging_is_rate_limited_and_reports_what_it_held_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    gate = QualityGate("noisy", [ZeroVolume()], log_interval=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="sheetanchor.ingest.quality"):
        for _ in range(5):
            gate.inspect({"volume": 0})
        assert len(caplog.records) == 1
        now[0] = 10.0
        gate.inspect({"volume": 0})
    assert len(caplog.records) == 2
    assert "4 more since the last report" in caplog.records[1].getMessage()
    assert gate.findings_total == 6


def test_values_of_other_types() -> None:
    volume = ZeroVolume()
    assert volume.observe({"volume": Decimal("3")}) == []
    assert volume.observe({"volume": "12"}) == []
    assert [f.message for f in volume.observe({})] == ["volume=None is missing or not a number"]
    assert volume.observe({"volume": -1})[0].message == "volume=-1 is not positive"
    gap = TimeGap(key=None, max_gap=1.0)
    assert gap.observe({"ts": 100}) == []
    assert gap.observe({"ts": 100.5}) == []
    assert len(gap.observe({"ts": 102})) == 1
    assert "not a time" in gap.observe({"ts": "yesterday"})[0].message
    naive = TimestampBackwards(key=None)
    naive.observe({"ts": dt.datetime(2026, 1, 1, 12)})
    assert naive.observe({"ts": dt.datetime(2026, 1, 1, 12, tzinfo=dt.UTC)}) == []
    price = PriceOutlier(key=None, min_samples=3)
    assert "finite" in price.observe({"price": float("nan")})[0].message


def test_flat_prices_do_not_make_every_tick_an_outlier() -> None:
    check = PriceOutlier(key=None, window=20, threshold=8.0, min_scale=1e-3)
    for _ in range(20):
        assert check.observe({"price": 100.0}) == []
    assert check.observe({"price": 100.05}) == []  # 0.05 % move after a flat stretch
    assert len(check.observe({"price": 101.0})) == 1  # 1 %: 10 floor-scales away


def test_level_shift_is_reported_then_accepted() -> None:
    check = PriceOutlier(key=None, window=20, threshold=8.0)
    for i in range(20):
        check.observe({"price": 100.0 + (i % 3) * 0.1})
    flagged = [bool(check.observe({"price": 200.0 + (i % 3) * 0.1})) for i in range(20)]
    assert flagged[0]
    assert not flagged[-1]  # after half a window the new level is the median


def test_per_key_state_is_bounded() -> None:
    outlier = PriceOutlier(window=10, max_keys=3)
    gap = TimeGap(max_gap=1.0, max_keys=3)
    for i in range(100):
        record = {"symbol": f"S{i}", "price": 1.0, "ts": float(i)}
        outlier.observe(record)
        gap.observe(record)
    assert outlier.tracked_keys == 3
    assert gap.tracked_keys == 3


def test_custom_checks_plug_in() -> None:
    class NegativeSpread:
        name = "negative_spread"
        reject = False

        def observe(self, record: Mapping[str, object]) -> list[Finding]:
            bid, ask = record.get("bid"), record.get("ask")
            if isinstance(bid, float) and isinstance(ask, float) and bid > ask:
                return [Finding(self.name, "bid", bid, None, f"bid {bid} above ask {ask}")]
            return []

    check = NegativeSpread()
    assert isinstance(check, QualityCheck)
    gate = QualityGate("book", [check])
    assert gate.inspect({"bid": 1.0, "ask": 2.0}) == []
    assert gate.inspect({"bid": 3.0, "ask": 2.0})[0].check == "negative_spread"


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: TimeGap(max_gap=0), "max_gap"),
        (lambda: TimeGap(max_gap=1, max_keys=0), "max_keys"),
        (lambda: PriceOutlier(window=2), "window"),
        (lambda: PriceOutlier(threshold=0), "threshold"),
        (lambda: PriceOutlier(window=10, min_samples=11), "min_samples"),
        (lambda: QualityGate("s", [ZeroVolume(), ZeroVolume()]), "unique"),
    ],
)
def test_bad_settings_name_the_argument(make: Any, name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        make()


_keys = st.sampled_from(["A", "B", "C", "D"])


@given(st.lists(st.tuples(_keys, st.integers(0, 1000)), max_size=200))
def test_time_checks_match_a_model(events: list[tuple[str, int]]) -> None:
    backwards = TimestampBackwards(max_keys=4)
    gap = TimeGap(max_gap=50.0, max_keys=4)
    latest: dict[str, int] = {}
    for symbol, ts in events:
        record = {"symbol": symbol, "ts": ts}
        went_back = bool(backwards.observe(record))
        jumped = bool(gap.observe(record))
        previous = latest.get(symbol)
        assert went_back == (previous is not None and ts < previous)
        assert jumped == (previous is not None and ts - previous > 50)
        latest[symbol] = ts if previous is None else max(previous, ts)


_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.decimals(allow_nan=False, allow_infinity=False),
)


@given(st.lists(st.tuples(_keys, _values, _values, _values), max_size=150))
def test_checks_never_raise_and_state_stays_bounded(
    rows: list[tuple[str, object, object, object]],
) -> None:
    checks = [
        TimeGap(max_gap=1.0, max_keys=2),
        TimestampBackwards(max_keys=2),
        PriceOutlier(window=5, min_samples=3, max_keys=2),
        ZeroVolume(),
    ]
    gate = QualityGate("fuzz", checks, log_interval=0.0)
    total = 0
    for symbol, ts, price, volume in rows:
        total += len(gate.inspect({"symbol": symbol, "ts": ts, "price": price, "volume": volume}))
    assert gate.findings_total == total
    assert all(getattr(c, "tracked_keys", 0) <= 2 for c in checks)


@given(
    st.floats(1.0, 1e6),
    st.lists(st.floats(-0.0005, 0.0005), min_size=10, max_size=60),
    st.floats(0.05, 10.0),
)
def test_price_outlier_flags_big_jumps_and_spares_small_noise(
    level: float, noise: list[float], jump: float
) -> None:
    check = PriceOutlier(key=None, window=60, threshold=8.0, min_samples=10, min_scale=1e-3)
    for n in noise:
        assert check.observe({"price": level * (1 + n)}) == []
    # Noise stays within half a per-mille: a 5 % (or larger) move is always far out.
    assert len(check.observe({"price": level * (1 + jump)})) == 1


async def test_checks_run_in_a_write_buffer_stream(pg_url: str, tmp_path: Path) -> None:
    from sheetanchor.ingest import Stream, WriteBuffer
    from sheetanchor.postgres import Database

    columns = {"ts": "timestamptz", "symbol": "text", "price": "float8", "volume": "bigint"}
    stream = Stream(
        "q_ticks",
        table="q_ticks",
        columns=columns,
        natural_key=("ts", "symbol"),
        checks=[ZeroVolume(), PriceOutlier(window=20, reject=True)],
    )
    db = Database(pg_url)
    try:
        await db.execute(
            "CREATE TABLE q_ticks (ts timestamptz, symbol text, price float8, volume bigint, "
            "PRIMARY KEY (ts, symbol))"
        )
        async with WriteBuffer(
            db, [stream], deadletter_dir=tmp_path / "dl", replay_interval=None
        ) as buffer:
            ticks = _market(seed=3, n=30, symbols=("AAA",))
            ticks[25]["volume"] = 0  # reported, still written
            for tick in ticks[:29]:
                await buffer.put("q_ticks", tick)
            with pytest.raises(RecordError, match="price") as info:
                await buffer.put("q_ticks", {**ticks[29], "price": 1e6})  # rejected
            assert info.value.field == "price"
        assert await db.fetchval("SELECT count(*) FROM q_ticks") == 29
        assert await db.fetchval("SELECT count(*) FROM q_ticks WHERE volume = 0") == 1
        assert _count("q_ticks", "zero_volume") == 1
        assert _count("q_ticks", "price_outlier") == 1
    finally:
        await db.close()
