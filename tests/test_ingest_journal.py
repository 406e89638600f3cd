from __future__ import annotations

import asyncio
import datetime as dt
import stat
import tempfile
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sheetanchor.errors import JournalError, JournalFull, RecordError, ResourceClosed
from sheetanchor.ingest._journal import Journal


def _segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


async def test_append_commit_recover_across_reopen(tmp_path: Path) -> None:
    async with Journal(tmp_path / "j") as journal:
        s1 = await journal.append("prices", [{"id": 1}, {"id": 2}])
        s2 = await journal.append("book", [{"id": 3}])
        s3 = await journal.append("prices", [{"id": 4}])
        assert (s1, s2, s3) == (2, 3, 4)
        journal.commit("prices", s1)
    async with Journal(tmp_path / "j") as journal:
        assert journal.recover() == [("book", {"id": 3}), ("prices", {"id": 4})]
        assert journal.last_seq == 4
        # Sequences keep growing across restarts.
        assert await journal.append("prices", [{"id": 5}]) == 5


async def test_empty_append_writes_nothing(tmp_path: Path) -> None:
    async with Journal(tmp_path) as journal:
        assert await journal.append("s", []) == 0
        assert journal.stats().records_appended == 0


async def test_typed_values_round_trip(tmp_path: Path) -> None:
    record: dict[str, Any] = {
        "ts": dt.datetime(2026, 11, 23, 11, 0, 0, 123456, tzinfo=dt.UTC),
        "naive": dt.datetime(2026, 1, 2, 3, 4, 5),
        "day": dt.date(2026, 11, 23),
        "at": dt.time(9, 30),
        "id": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "price": Decimal("101.25"),
        "raw": b"\x00\xff",
        "n": 3,
        "nested": {"a": [1, 2.5, None, True]},
    }
    async with Journal(tmp_path) as journal:
        await journal.append("s", [record])
    async with Journal(tmp_path) as journal:
        assert journal.recover() == [("s", record)]


async def test_unencodable_record_is_a_record_error(tmp_path: Path) -> None:
    async with Journal(tmp_path) as journal:
        with pytest.raises(RecordError, match="stream 'prices'") as info:
            await journal.append("prices", [{"ok": 1}, {"bad": object()}])
        assert info.value.stream == "prices"
        assert journal.last_seq == 0  # nothing was handed out


async def test_rows_round_trip_as_records_with_their_types(tmp_path: Path) -> None:
    fields = ("ts", "day", "at", "id", "price", "raw", "n", "note")
    rows: list[tuple[Any, ...]] = [
        (
            dt.datetime(2026, 11, 23, 11, 0, 0, 123456, tzinfo=dt.UTC),
            dt.date(2026, 11, 23),
            dt.time(9, 30),
            uuid.UUID("12345678-1234-5678-1234-567812345678"),
            Decimal("101.25"),
            b"\x00\xff",
            3,
            "a",
        ),
        (None, None, None, None, None, None, None, None),  # nulls keep no tag
    ]
    async with Journal(tmp_path) as journal:
        assert await journal.append("s", [{"k": 0}]) == 1
        assert await journal.append_rows("s", fields, rows) == 3
        assert await journal.append_rows("s", fields, []) == 3
        assert journal.stats().records_appended == 3
    async with Journal(tmp_path) as journal:
        assert journal.recover() == [("s", {"k": 0})] + [
            ("s", dict(zip(fields, row, strict=True))) for row in rows
        ]
        assert [seq for seq, _, _ in journal.iter_recover_seq()] == [1, 2, 3]


async def test_rows_with_two_tagged_types_in_one_column_keep_each_type(tmp_path: Path) -> None:
    # One tag per column can't describe a date next to a datetime: written per record.
    rows = [(dt.date(2026, 1, 2),), (dt.datetime(2026, 1, 2, 3, 4),)]
    async with Journal(tmp_path) as journal:
        await journal.append_rows("s", ("when",), rows)
    async with Journal(tmp_path) as journal:
        recovered = journal.recover()
    assert recovered == [("s", {"when": dt.date(2026, 1, 2)}), ("s", {"when": rows[1][0]})]
    assert [type(r["when"]) for _, r in recovered] == [dt.date, dt.datetime]


async def test_unencodable_row_is_a_record_error(tmp_path: Path) -> None:
    async with Journal(tmp_path) as journal:
        with pytest.raises(RecordError, match="stream 'prices'"):
            await journal.append_rows("prices", ("v",), [(1,), (object(),)])
        assert journal.last_seq == 0  # nothing was handed out


async def test_torn_tail_is_skipped_and_counted(tmp_path: Path) -> None:
    async with Journal(tmp_path) as journal:
        for i in range(5):
            await journal.append("s", [{"i": i, "pad": "x" * 20}])
    segment = _segments(tmp_path)[-1]
    data = segment.read_bytes()
    segment.write_bytes(data[:-7])  # a crash in the middle of the last write
    async with Journal(tmp_path) as journal:
        assert journal.stats().torn_tails == 1
        assert journal.recover() == [("s", {"i": i, "pad": "x" * 20}) for i in range(4)]
        # The journal keeps working after the damaged tail (the torn record was never
        # acknowledged, so its sequence may be handed out again).
        assert await journal.append("s", [{"i": 99}]) == 5
    async with Journal(tmp_path) as journal:
        assert [r["i"] for _, r in journal.recover()] == [0, 1, 2, 3, 99]


@pytest.mark.parametrize("cut", [1, 4, 8, 9])
async def test_torn_header_never_crashes_recovery(tmp_path: Path, cut: int) -> None:
    async with Journal(tmp_path) as journal:
        await journal.append("s", [{"i": 1}])
    segment = _segments(tmp_path)[-1]
    with segment.open("ab") as f:
        f.write(b"\xff" * cut)  # a header claiming 4 GiB, or a partial header
    async with Journal(tmp_path) as journal:
        assert journal.stats().torn_tails == 1
        assert journal.recover() == [("s", {"i": 1})]


async def test_crc_corruption_skips_only_the_damaged_record(tmp_path: Path) -> None:
    async with Journal(tmp_path) as journal:
        for i in range(3):
            await journal.append("s", [{"i": i, "marker": f"rec{i}"}])
    segment = _segments(tmp_path)[-1]
    data = bytearray(segment.read_bytes())
    pos = data.index(b"rec1")
    data[pos] ^= 0x01  # one flipped bit inside the middle record's payload
    segment.write_bytes(bytes(data))
    async with Journal(tmp_path) as journal:
        stats = journal.stats()
        assert (stats.corrupt_frames, stats.torn_tails) == (1, 0)
        assert [r["i"] for _, r in journal.recover()] == [0, 2]


async def test_many_concurrent_appenders_share_group_commits(tmp_path: Path) -> None:
    async with Journal(tmp_path, fsync="batch") as journal:

        async def producer(p: int) -> list[int]:
            return [await journal.append("s", [{"p": p, "k": k}]) for k in range(10)]

        results = await asyncio.gather(*(producer(p) for p in range(50)))
        for seqs in results:
            assert seqs == sorted(seqs)
        all_seqs = sorted(s for seqs in results for s in seqs)
        assert all_seqs == list(range(1, 501))
        stats = journal.stats()
        assert stats.records_appended == 500
        # Every producer waits on each append, so 50 appends are queued at once: they share.
        assert stats.group_writes < 500
        assert stats.fsyncs == stats.group_writes + 1  # +1: the new segment's checkpoint
    async with Journal(tmp_path) as journal:
        recovered = journal.recover()
        assert len(recovered) == 500
        per_producer: dict[int, list[int]] = {}
        for _, record in recovered:
            per_producer.setdefault(record["p"], []).append(record["k"])
        assert all(ks == list(range(10)) for ks in per_producer.values())


async def test_appenders_resume_in_sequence_order(tmp_path: Path) -> None:
    resumed: list[int] = []
    async with Journal(tmp_path) as journal:

        async def producer(p: int) -> None:
            for k in range(5):
                resumed.append(await journal.append(f"s{p % 3}", [{"p": p, "k": k}]))

        await asyncio.gather(*(producer(p) for p in range(40)))
    assert resumed == sorted(resumed)  # no lock needed to keep journal order downstream


@pytest.mark.parametrize("policy", ["batch", "always", "never"])
async def test_every_fsync_policy_is_durable_across_reopen(tmp_path: Path, policy: Any) -> None:
    async with Journal(tmp_path, fsync=policy, group_commit_interval=0) as journal:
        seqs = await asyncio.gather(*(journal.append("s", [{"i": i}]) for i in range(20)))
        assert sorted(seqs) == list(range(1, 21))
        if policy == "always":
            assert journal.stats().group_writes == 20
        if policy == "never":
            assert journal.stats().fsyncs == 0
    async with Journal(tmp_path) as journal:
        assert len(journal.recover()) == 20


async def test_commit_deletes_fully_committed_segments(tmp_path: Path) -> None:
    async with Journal(tmp_path, segment_bytes=200, max_bytes=100_000) as journal:
        last = 0
        for i in range(40):
            last = await journal.append("s", [{"i": i, "pad": "y" * 30}])
        assert journal.stats().segments > 5
        keep = await journal.append("other", [{"keep": True}])
        journal.commit("s", last)
        await journal.append("s", [{"i": 40}])  # the commit mark rides along with this group
        stats = journal.stats()
        assert stats.segments_deleted > 5
        assert stats.segments <= 2
        assert len(_segments(tmp_path)) == stats.segments
        assert keep == last + 1
    async with Journal(tmp_path) as journal:
        assert journal.recover() == [("other", {"keep": True}), ("s", {"i": 40})]
        assert journal.last_seq == last + 2


def test_commit_outside_a_loop_is_written_at_close(tmp_path: Path) -> None:
    async def first() -> int:
        async with Journal(tmp_path) as journal:
            return await journal.append("s", [{"i": 1}])

    seq = asyncio.run(first())
    journal = Journal(tmp_path)
    assert journal.recover() == [("s", {"i": 1})]
    journal.commit("s", seq)  # no running loop here
    asyncio.run(journal.close())
    journal = Journal(tmp_path)
    assert journal.recover() == []
    asyncio.run(journal.close())


async def test_commit_validates_and_ignores_lower_marks(tmp_path: Path) -> None:
    async with Journal(tmp_path) as journal:
        seq = await journal.append("s", [{"i": 1}, {"i": 2}])
        with pytest.raises(ValueError, match="past the last sequence"):
            journal.commit("s", seq + 1)
        journal.commit("s", seq)
        journal.commit("s", 1)  # lower: ignored
    async with Journal(tmp_path) as journal:
        assert journal.recover() == []


async def test_byte_limit_raises_journal_full_until_committed(tmp_path: Path) -> None:
    async with Journal(tmp_path, segment_bytes=500, max_bytes=1000) as journal:
        record = {"pad": "z" * 100}
        seq = 0
        while journal.stats().bytes < 900:
            seq = await journal.append("s", [record])
        with pytest.raises(JournalFull, match="max_bytes=1000"):
            await journal.append("s", [record])
        assert 0 < journal.stats().bytes <= 1000
        journal.commit("s", seq)
        await journal.append("t", [{"small": 1}])  # flushes the commit, deletes old segments
        await journal.append("s", [record])  # room again


async def test_files_are_private_and_directory_is_locked(tmp_path: Path) -> None:
    directory = tmp_path / "journal"
    async with Journal(directory) as journal:
        await journal.append("s", [{"i": 1}])
        assert stat.S_IMODE(directory.stat().st_mode) & 0o077 == 0
        for segment in _segments(directory):
            assert stat.S_IMODE(segment.stat().st_mode) == 0o600
        with pytest.raises(JournalError, match="in use by another Journal"):
            Journal(directory)


async def test_closed_journal_refuses_appends(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    await journal.close()
    await journal.close()  # idempotent
    assert journal.closed
    with pytest.raises(ResourceClosed):
        await journal.append("s", [{"i": 1}])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"fsync": "sometimes"}, "fsync"),
        ({"group_commit_interval": -1.0}, "group_commit_interval"),
        ({"segment_bytes": 0}, "segment_bytes"),
        ({"segment_bytes": 1000, "max_bytes": 1500}, "max_bytes"),
    ],
)
def test_bad_settings_name_the_argument(tmp_path: Path, kwargs: Any, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        Journal(tmp_path, **kwargs)


_STREAMS = ("a", "b", "c")
_ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("append"),
            st.sampled_from(_STREAMS),
            st.lists(st.integers(-(2**40), 2**40), min_size=0, max_size=4),
        ),
        st.tuples(st.just("commit"), st.sampled_from(_STREAMS), st.integers(0, 100)),
        st.tuples(st.just("reopen"), st.just(""), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_ops, segment_bytes=st.sampled_from([120, 400, 1 << 20]))
def test_recover_returns_exactly_the_uncommitted_records_in_order(
    ops: list[tuple[str, str, Any]], segment_bytes: int
) -> None:
    async def scenario(directory: Path) -> None:
        journal = Journal(directory, segment_bytes=segment_bytes, group_commit_interval=0)
        model: list[tuple[int, str, dict[str, Any]]] = []  # (seq, stream, record)
        try:
            for op, stream, arg in ops:
                if op == "append":
                    records = [{"v": v} for v in arg]
                    last = await journal.append(stream, records)
                    first = last - len(records) + 1
                    model.extend((first + i, stream, r) for i, r in enumerate(records))
                elif op == "commit":
                    # Commit up to one of this stream's sequences (a high-water mark).
                    seqs = [seq for seq, s, _ in model if s == stream]
                    if seqs:
                        upto = seqs[arg % len(seqs)]
                        journal.commit(stream, upto)
                        model = [m for m in model if m[1] != stream or m[0] > upto]
                else:
                    await journal.close()
                    journal = Journal(directory, segment_bytes=segment_bytes)
                    assert journal.recover() == [(s, r) for _, s, r in model]
        finally:
            await journal.close()
        async with Journal(directory) as reopened:
            assert reopened.recover() == [(s, r) for _, s, r in model]
            assert list(reopened.iter_recover()) == reopened.recover()

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(scenario(Path(tmp)))
