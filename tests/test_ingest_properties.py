"""Property test of the buffer's accounting: whatever the sequence of puts and flushes, every
record is accounted for exactly once and the memory bound is never passed (real PostgreSQL)."""

from __future__ import annotations

import asyncio
import datetime as dt
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _ingest_helpers import create_tick_table, fast_retry, table_name, tick, tick_stream
from sheetanchor.errors import BufferFull, RecordError
from sheetanchor.ingest import Stream, WriteBuffer
from sheetanchor.ingest._state import StreamState
from sheetanchor.ingest._validate import Validator
from sheetanchor.postgres import Database, PoolSettings

# An op is either a run of puts (keys) or a flush (None).
ops_strategy = st.lists(
    st.one_of(st.lists(st.integers(0, 40), min_size=1, max_size=30), st.none()),
    min_size=1,
    max_size=12,
)


def _poison(key: int) -> bool:
    return key % 7 == 3  # always the same keys: a key is either always good or always poison


async def _scenario(pg_url: str, ops: list[list[int] | None], max_rows: int) -> None:
    db = Database(pg_url, pool=PoolSettings(size=3, max_overflow=0), name="ingest_props")
    try:
        table = table_name("prop")
        await create_tick_table(db, table)
        stream = tick_stream(
            table, max_rows=max_rows, batch_rows=min(5, max_rows), flush_interval=0.01
        )
        offered: list[int] = []
        with tempfile.TemporaryDirectory() as tmp:
            async with WriteBuffer(
                db, [stream], deadletter_dir=tmp, retry=fast_retry(), replay_interval=None
            ) as buffer:
                for op in ops:
                    if op is None:
                        await buffer.flush()
                        continue
                    for key in op:
                        record = tick(key, price=-1.0 if _poison(key) else 1.0)
                        while True:
                            try:
                                buffer.put_nowait("ticks", record)
                                break
                            except BufferFull:
                                await asyncio.sleep(0.001)
                        offered.append(key)
                        s = buffer.stream_stats("ticks")
                        assert s.held_rows <= max_rows
                        assert s.held_bytes <= stream.max_bytes
            s = buffer.stream_stats("ticks")
        good = [k for k in offered if not _poison(k)]
        assert s.held_rows == 0
        assert s.rows_in == len(offered)
        assert s.rows_in == (
            s.rows_written + s.rows_duplicate + s.rows_failed + s.rows_quarantined + s.rows_spilled
        )
        assert s.rows_quarantined == len(offered) - len(good)
        assert s.rows_written == len(set(good))
        assert await db.fetchval(f"SELECT count(*) FROM {table}") == len(set(good))
        await db.execute(f"DROP TABLE {table}")
    finally:
        await db.close()


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=ops_strategy, max_rows=st.integers(1, 25))
def test_every_record_is_accounted_for_once(
    pg_url: str, ops: list[list[int] | None], max_rows: int
) -> None:
    asyncio.run(_scenario(pg_url, ops, max_rows))


_FAST_STREAM = Stream(
    "fast",
    table="t",
    columns={
        "i2": "smallint",
        "i8": "bigint",
        "f": "float8",
        "b": "bool",
        "ts": "timestamptz",
        "d": "date",
        "s": "text",
        "n": "text",
    },
    natural_key="i8",
    nullable=("n",),
)
_any_value = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=5),
    st.datetimes(timezones=st.sampled_from([None, dt.UTC])),
    st.dates(),
)


@settings(max_examples=300, deadline=None)
@given(
    values=st.fixed_dictionaries({k: _any_value for k in _FAST_STREAM.columns}),
    drop=st.sampled_from([None, *_FAST_STREAM.columns]),
)
def test_fast_validator_accepts_a_subset_with_the_same_result(
    values: dict[str, object], drop: str | None
) -> None:
    if drop is not None:
        values.pop(drop)
    validator = Validator(_FAST_STREAM)
    assert validator._fast is not None
    quick = validator._fast(values)
    try:
        slow = validator._validate(values)
    except RecordError:
        assert quick is None
        return
    if quick is not None:
        assert quick == slow


def test_fast_validator_takes_a_valid_record() -> None:
    validator = Validator(_FAST_STREAM)
    assert validator._fast is not None
    record = {
        "i2": 7,
        "i8": 2**40,
        "f": 1.5,
        "b": True,
        "ts": dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        "d": dt.date(2026, 1, 1),
        "s": "abc",
        "n": None,
    }
    quick = validator._fast(record)
    assert quick is not None
    assert quick == validator._validate(record)
    assert validator._fast({**record, "n": "x"}) == validator._validate({**record, "n": "x"})


_ONE_COLUMN = Stream("one", table="t", columns={"i4": "integer"}, natural_key="i4")


@settings(max_examples=300, deadline=None)
@given(
    values=st.fixed_dictionaries({k: _any_value for k in _FAST_STREAM.columns}),
    drop=st.sampled_from([None, *_FAST_STREAM.columns]),
    extra=st.booleans(),
)
def test_fast_admit_appends_what_the_full_validator_returns(
    values: dict[str, object], drop: str | None, extra: bool
) -> None:
    """The generated validate-and-append accepts a subset of what the validator accepts and
    appends exactly its row (values in COPY order) and byte estimate, or changes nothing."""
    if drop is not None:
        values.pop(drop)
    if extra:
        values["unknown"] = 1
    state = StreamState(_FAST_STREAM)
    admit = state.fast_admit
    assert admit is not None
    state.fast_rows_left = state.fast_granted = 10
    state.fast_bytes_left = state.fast_bytes_granted = 10**6
    taken = admit(values)
    try:
        row, size = Validator(_FAST_STREAM).validate(values)
    except RecordError:
        assert not taken
        assert (state.rows, state.held_bytes, state.fast_rows_left) == ([], 0, 10)
        return
    if taken:
        assert state.rows == [row]
        assert all(a is b for a, b in zip(state.rows[0], row, strict=True))
        assert (state.held_bytes, state.fast_rows_left, state.fast_bytes_left) == (
            size,
            9,
            10**6 - size,
        )
        # Counted lazily: folded into the row count and the buffered bytes together.
        assert (state.bytes, state.counts["in"]) == (0, 0)
        state.fold_budget()
        assert (state.bytes, state.counts["in"], state.held_bytes) == (size, 1, size)


@given(value=_any_value, drop=st.booleans())
def test_fast_paths_of_a_one_column_stream(value: object, drop: bool) -> None:
    record: dict[str, object] = {} if drop else {"i4": value}
    validator = Validator(_ONE_COLUMN)
    assert validator._fast is not None
    quick = validator._fast(record)
    try:
        slow = validator._validate(record)
    except RecordError:
        assert quick is None
        return
    if quick is not None:
        assert quick == slow
        assert type(quick[0]) is tuple
