"""Group append: concurrent single-record puts of one stream share one journal append.

A journaled ``put`` must not return before its record is durable, but one journal append per
record spends most of its time in per-append Python work (a frame list, a future, a queue
entry, a wake-up of the journal's flusher), not in the disk. So each journaled stream has one
``GroupAppender``: a put reserves room, joins the stream's open group and waits on its own
future; one task per stream takes the whole group, makes it durable with a single
journal append (one write, and one fsync under ``fsync="batch"``), enqueues its rows in
sequence order and resolves every waiter. Puts arriving while that append runs form the next
group, which is written as soon as the previous one is done.

Ordering: one task per stream calls ``append`` one group at a time and enqueues a group right
after its append returns, with no await in between, so records enter the buffer in journal
sequence order and a swapped batch's ``last_seq`` covers exactly the records it carries.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from sheetanchor.errors import RecordError, ResourceClosed
from sheetanchor.ingest._journal_seam import JournalLike
from sheetanchor.ingest._state import StreamState
from sheetanchor.ingest._validate import Row

__all__ = ["GroupAppender", "append_rows", "enqueue_journaled"]


async def append_rows(journal: JournalLike, st: StreamState, rows: Sequence[Row]) -> int:
    """Append validated ``rows`` of ``st`` to ``journal``; return the last sequence number.

    The disk journal takes the rows as they are (``Journal.append_rows``: field names once
    per append); any other :class:`JournalLike` gets each record as a mapping.
    """
    direct = getattr(journal, "append_rows", None)
    if direct is not None:
        seq: int = await direct(st.name, st.stream.column_names, rows)
        return seq
    as_dict = st.validator.as_dict
    return await journal.append(st.name, [as_dict(row) for row in rows])


def enqueue_journaled(
    st: StreamState, rows: Sequence[Row], records: Sequence[Mapping[str, Any]], nbytes: int
) -> None:
    """Enqueue journaled rows whose room was reserved (same accounting, no bound check).

    The caller has already released the reservation and advanced ``st.last_seq``; this runs
    with no await in between, so the next swap carries these rows with their sequence.
    """
    st.rows.extend(rows)
    st.bytes += nbytes
    st.reset_budget()
    st.counts["in"] += len(rows)
    if st.tail is not None:
        for record in records:
            st.tail.append(record)
    if len(st.rows) >= st.batch_rows or st.held_rows >= st.high_rows:
        st.wake.set()


class GroupAppender:
    """Coalesces the concurrent journaled puts of one stream into one append per group.

    Only touched from the buffer's event loop. Every record added is reserved against the
    stream's bounds until its group is enqueued or has failed, so the memory bound holds.
    """

    __slots__ = ("_journal", "_loop", "_nbytes", "_records", "_rows", "_st", "_waiters", "task")

    def __init__(self, st: StreamState, journal: JournalLike) -> None:
        # Made by the buffer's open(), on the loop every put comes from (the buffer checks).
        self._loop = asyncio.get_running_loop()
        self._st = st
        self._journal = journal
        self._rows: list[Row] = []
        self._records: list[Mapping[str, Any]] = []
        self._nbytes = 0
        self._waiters: list[asyncio.Future[None]] = []
        self.task: asyncio.Task[None] | None = None

    def add(self, row: Row, size: int, record: Mapping[str, Any]) -> asyncio.Future[None]:
        """Join the open group; the future resolves once the record is durable and buffered.

        The caller has checked that the stream has room for the record. The future gets
        the append's exception if the journal refuses the group (``JournalFull`` ...).
        """
        st = self._st
        st.reserved_rows += 1
        st.reserved_bytes += size
        st.reset_budget()
        loop = self._loop
        waiter: asyncio.Future[None] = loop.create_future()
        self._rows.append(row)
        self._records.append(record)
        self._nbytes += size
        self._waiters.append(waiter)
        if self.task is None:
            # Started on the next loop iteration: every put ready in this one joins the group.
            self.task = loop.create_task(self._run(), name=f"journal-group:{st.name}")
        return waiter

    async def _run(self) -> None:
        try:
            while self._rows:
                rows, records, nbytes, waiters = (
                    self._rows,
                    self._records,
                    self._nbytes,
                    self._waiters,
                )
                self._rows, self._records, self._nbytes, self._waiters = [], [], 0, []
                await self._append(rows, records, nbytes, waiters)
        finally:
            self.task = None
            # Cancelled (close() past its deadline): puts still waiting learn it now.
            rows, waiters = self._rows, self._waiters
            self._rows, self._records, self._waiters = [], [], []
            self._st.reserved_rows -= len(rows)
            self._st.reserved_bytes -= self._nbytes
            self._st.room.set()  # room given back: wake puts waiting for it
            self._nbytes = 0
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(
                        ResourceClosed(
                            f"WriteBuffer closed before the journal took a put on "
                            f"{self._st.name!r}; the record was not accepted"
                        )
                    )

    def _closed_mid_append(self) -> ResourceClosed:
        return ResourceClosed(
            f"WriteBuffer closed (close_timeout passed) while the journal was writing a put "
            f"on {self._st.name!r}; the record may be in the journal, and then comes back "
            "when a buffer opens it again (writes are idempotent on the natural key)"
        )

    async def _append(
        self,
        rows: list[Row],
        records: list[Mapping[str, Any]],
        nbytes: int,
        waiters: list[asyncio.Future[None]],
    ) -> None:
        st = self._st
        try:
            seq = await append_rows(self._journal, st, rows)
        except BaseException as exc:
            if isinstance(exc, RecordError) and len(rows) > 1:
                # A value the journal cannot encode must not fail the puts beside it: append
                # them one by one (each releases its share of the reservation), so only the
                # bad one gets its error.
                await self._one_by_one(rows, records, nbytes, waiters)
                return
            st.reserved_rows -= len(rows)
            st.reserved_bytes -= nbytes
            st.room.set()  # room given back: wake puts waiting for it
            for waiter in waiters:
                if waiter.done():
                    continue
                if isinstance(exc, asyncio.CancelledError):
                    # close() cancelled the group mid-append: the puts were not cancelled
                    # themselves, so they get an error they can act on, not CancelledError.
                    waiter.set_exception(self._closed_mid_append())
                else:
                    waiter.set_exception(exc)
            if isinstance(exc, Exception):
                return  # each put of the group raises it; the next group tries again
            raise
        st.reserved_rows -= len(rows)
        st.reserved_bytes -= nbytes
        st.last_seq = max(st.last_seq, seq)
        enqueue_journaled(st, rows, records, nbytes)
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _one_by_one(
        self,
        rows: list[Row],
        records: list[Mapping[str, Any]],
        nbytes: int,
        waiters: list[asyncio.Future[None]],
    ) -> None:
        # Sizes are not kept per row: the group's bytes are shared out evenly (the sum is
        # exact, so the reservation of the group is released in full).
        share, extra = divmod(nbytes, len(rows))
        done = 0
        try:
            for row, record, waiter in zip(rows, records, waiters, strict=True):
                size = share + (extra if done == len(rows) - 1 else 0)
                done += 1
                await self._append([row], [record], size, [waiter])
        finally:
            # Cancelled part-way: the rows never tried release their room and their puts.
            rest = len(rows) - done
            if rest:
                self._st.reserved_rows -= rest
                self._st.reserved_bytes -= share * rest + extra
                self._st.room.set()  # room given back: wake puts waiting for it
                for waiter in waiters[done:]:
                    if not waiter.done():
                        waiter.set_exception(self._closed_mid_append())
