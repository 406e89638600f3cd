"""Dead-letter store: layout, atomic writes, permissions, byte bound, round trip of types."""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import decimal
import math
import os
import subprocess
import threading
import uuid
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from sheetanchor.errors import DeadLetterFull
from sheetanchor.ingest import DeadLetterStore, Stream
from sheetanchor.ingest._validate import Validator
from sheetanchor.observe import REGISTRY

ALL_TYPES = Stream(
    "types",
    table="t",
    columns={
        "id": "bigint",
        "ts": "timestamptz",
        "day": "date",
        "amount": "numeric",
        "ratio": "float8",
        "blob": "bytea",
        "ref": "uuid",
        "doc": "jsonb",
        "flag": "bool",
        "note": "text",
    },
    natural_key="id",
    nullable=("note",),
)


def _row(i: int, ratio: float = 0.5) -> tuple[object, ...]:
    record = {
        "id": i,
        "ts": dt.datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=dt.UTC),
        "day": dt.date(2026, 1, 2),
        "amount": decimal.Decimal("12345.6789"),
        "ratio": ratio,
        "blob": b"\x00\xff",
        "ref": uuid.UUID(int=i),
        "doc": {"a": [1, 2]},
        "flag": True,
        "note": None,
    }
    return Validator(ALL_TYPES).validate(record)[0]


def test_layout_permissions_and_round_trip(tmp_path: Path) -> None:
    store = DeadLetterStore(tmp_path / "dl")
    rows = [_row(1), _row(2, ratio=math.inf), _row(3, ratio=-math.inf)]
    errors = [None, {"sqlstate": "22003", "message": "out of range"}, None]
    path = store.write(ALL_TYPES.describe(), "poison", rows, errors=errors, batch_id="b1")
    assert path.parent == tmp_path / "dl" / "types" / "poison"
    assert path.name.endswith(".ndjson")
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "dl" / "types").stat().st_mode & 0o777 == 0o700
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left
    batch = store.read(path)
    assert batch.rows == rows
    assert batch.errors == errors
    assert batch.header["batch_id"] == "b1"
    assert batch.header["reason"] == "poison"
    assert batch.header["table"] == "t"
    nan = store.read(store.write(ALL_TYPES.describe(), "failed", [_row(4, ratio=math.nan)]))
    assert math.isnan(nan.rows[0][4])  # type: ignore[arg-type]


def test_listing_and_purge(tmp_path: Path) -> None:
    store = DeadLetterStore(tmp_path)
    a = store.write(ALL_TYPES.describe(), "failed", [_row(1)])
    b = store.write(ALL_TYPES.describe(), "spilled", [_row(2)])
    assert [f.path for f in store.files()] == [a, b]
    assert [f.path for f in store.files(reason="spilled")] == [b]
    assert store.files(stream="other") == []
    assert store.total_bytes == a.stat().st_size + b.stat().st_size
    assert store.purge(reason="failed") == 1
    assert store.total_bytes == b.stat().st_size
    assert DeadLetterStore(tmp_path).total_bytes == b.stat().st_size  # recounted from disk


def test_bound_raises_dead_letter_full_with_a_clear_message(tmp_path: Path) -> None:
    store = DeadLetterStore(tmp_path, max_bytes=2_000)
    store.write(ALL_TYPES.describe(), "failed", [_row(1)])
    with pytest.raises(DeadLetterFull, match="max_bytes=2000") as info:
        store.write(ALL_TYPES.describe(), "failed", [_row(i) for i in range(20)])
    assert "replay or purge" in str(info.value).lower()
    assert len(store.files()) == 1  # nothing partial was written
    metrics = generate_latest(REGISTRY).decode()
    assert 'sheetanchor_ingest_deadletter_bytes{stream="types"}' in metrics
    assert 'sheetanchor_ingest_deadletter_full_total{stream="types"}' in metrics


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_failed_write_leaves_nothing_and_releases_its_bytes(tmp_path: Path) -> None:
    store = DeadLetterStore(tmp_path)
    folder = tmp_path / "types" / "failed"
    folder.mkdir(parents=True)
    folder.chmod(0o500)
    try:
        with pytest.raises(PermissionError):
            store.write(ALL_TYPES.describe(), "failed", [_row(1)])
    finally:
        folder.chmod(0o700)
    assert list(folder.iterdir()) == []
    assert store.total_bytes == 0


def test_failed_write_cleans_up_when_the_disk_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An fsync failure (disk full, I/O error) leaves no file and no reserved bytes."""
    store = DeadLetterStore(tmp_path)

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        store.write(ALL_TYPES.describe(), "failed", [_row(1)])
    monkeypatch.undo()
    assert list((tmp_path / "types" / "failed").iterdir()) == []
    assert store.total_bytes == 0


def test_unknown_reason_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reason"):
        DeadLetterStore(tmp_path).write(ALL_TYPES.describe(), "lost", [_row(1)])


class _PausedStore(DeadLetterStore):
    """A real store whose file write waits for the test (a write in progress)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.entered = threading.Event()
        self.release = threading.Event()

    def _write_file(self, stream: str, reason: str, data: bytes, nrows: int) -> Path:
        if not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(30)
        return super()._write_file(stream, reason, data, nrows)


def test_rescan_keeps_reservations_of_writes_in_progress(tmp_path: Path) -> None:
    one = DeadLetterStore(tmp_path / "probe")
    size = one.write(ALL_TYPES.describe(), "failed", [_row(1)]).stat().st_size
    store = _PausedStore(tmp_path / "dl", max_bytes=size + size // 2)  # room for one file
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(store.write, ALL_TYPES.describe(), "failed", [_row(1)])
        assert store.entered.wait(30)
        store.rescan()  # nothing linked yet: the reservation must survive the recount
        with pytest.raises(DeadLetterFull):
            store.write(ALL_TYPES.describe(), "failed", [_row(2)])
        store.release.set()
        first.result(30)
    assert store.total_bytes == size
    assert store.rescan() == size


def test_rescan_removes_temporary_files_of_dead_writers(tmp_path: Path) -> None:
    store = DeadLetterStore(tmp_path)
    path = store.write(ALL_TYPES.describe(), "failed", [_row(1)])
    proc = subprocess.Popen(["true"])
    proc.wait()
    stale = path.parent / f".tmp-{proc.pid}-1-1"
    stale.write_bytes(b"half a file")
    mine = path.parent / f".tmp-{os.getpid()}-1-99"
    mine.write_bytes(b"in progress")
    assert store.rescan() == path.stat().st_size
    assert not stale.exists()
    assert mine.exists()  # this process's write in progress is left alone
