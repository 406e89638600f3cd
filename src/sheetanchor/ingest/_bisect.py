"""Isolate the records PostgreSQL refuses, in O(k log n) round trips for k bad among n.

The algorithm only knows a ``write(segment)`` coroutine and a predicate saying whether an
exception is a *data* error (the segment holds at least one bad record). A segment that
fails for a data reason is split in two and each half is written on its own; a single record
that fails is poison. Good halves commit as soon as they are written.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["BisectAborted", "BisectResult", "bisect_write"]

T = TypeVar("T")


@dataclass(slots=True)
class BisectResult(Generic[T]):
    """What bisection wrote and what it isolated.

    Attributes:
        written: records written (in segments that committed).
        poison: each refused record with the exception PostgreSQL raised for it alone.
        round_trips: calls to ``write``.
    """

    written: int = 0
    poison: list[tuple[T, BaseException]] = field(default_factory=list)
    round_trips: int = 0


class BisectAborted(Exception, Generic[T]):
    """A write failed for a non-data reason; ``remaining`` were not written.

    ``result`` holds what was written and isolated before the failure; the cause is in
    ``__cause__``.
    """

    def __init__(self, remaining: list[T], result: BisectResult[T]) -> None:
        super().__init__(f"bisection stopped with {len(remaining)} record(s) unwritten")
        self.remaining = remaining
        self.result = result


async def bisect_write(
    records: Sequence[T],
    write: Callable[[Sequence[T]], Awaitable[object]],
    is_data_error: Callable[[BaseException], bool],
    *,
    first_error: BaseException | None = None,
) -> BisectResult[T]:
    """Write ``records``, isolating each record that fails on its own with a data error.

    Arguments:
        records: the batch.
        write: writes one segment in one transaction (retrying transient errors itself).
        is_data_error: True when an exception means "this segment holds a bad record".
        first_error: the data error the whole batch already failed with; saves the first
            round trip.

    Raises:
        BisectAborted: a write failed for another reason; carries the unwritten records.
    """
    result: BisectResult[T] = BisectResult()
    # Segments as (start, stop) into ``records``; a stack keeps memory at O(log n) segments.
    stack: list[tuple[int, int]] = []
    n = len(records)
    if n == 0:
        return result
    if first_error is not None:
        if n == 1:
            result.poison.append((records[0], first_error))
            return result
        mid = n // 2
        stack = [(mid, n), (0, mid)]
    else:
        stack = [(0, n)]
    while stack:
        start, stop = stack.pop()
        segment = records[start:stop]
        result.round_trips += 1
        try:
            await write(segment)
        except Exception as exc:  # cancellation and other BaseExceptions propagate as is
            if not is_data_error(exc):
                remaining = list(segment)
                for s, e in reversed(stack):
                    remaining.extend(records[s:e])
                raise BisectAborted(remaining, result) from exc
            if stop - start == 1:
                result.poison.append((records[start], exc))
                continue
            mid = (start + stop) // 2
            stack.append((mid, stop))
            stack.append((start, mid))
            continue
        result.written += stop - start
    return result
