"""A bounded tail of recent records, so recent-window features never scan the whole history.

Incident 004: feature building scanned the whole buffer on every tick. A :class:`Tail` keeps
only the last ``maxlen`` records (and, with ``max_age``, only those younger than that behind
the newest); :meth:`Tail.last` and :meth:`Tail.since` cost O(size of the answer).
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Generic, NamedTuple, TypeVar, cast

from sheetanchor.errors import ConfigError

__all__ = ["Tail", "TailStats"]

T = TypeVar("T")


class TailStats(NamedTuple):
    """Counts from :meth:`Tail.stats`."""

    size: int
    maxlen: int
    appended: int
    dropped_by_length: int
    dropped_by_age: int


def _ts_of(record: object) -> Any:
    return cast(Mapping[str, Any], record)["ts"]


class Tail(Generic[T]):
    """A ring buffer of the most recent records of one stream, oldest first.

    Records must be appended in non-decreasing key order (the order a feed produces them);
    :meth:`since` walks back from the newest record and stops at the first older one.

    Args:
        maxlen: records kept at most; the oldest is dropped first.
        max_age: also drop records whose key is more than this behind the newest key
            (seconds as a float, or a ``timedelta`` when keys are datetimes).
        key: the time of a record; default ``record["ts"]``. Keys are numbers or datetimes.

    Example::

        tail = Tail(1000, max_age=60.0)
        tail.append({"ts": 1700000000.0, "price": 10.0})
        recent = tail.since(1700000000.0 - 5)     # the last five seconds
        window = tail.last(20)                    # the last 20 records
    """

    def __init__(
        self,
        maxlen: int,
        max_age: float | dt.timedelta | None = None,
        *,
        key: Callable[[T], Any] | None = None,
    ) -> None:
        if maxlen < 1:
            raise ConfigError(f"maxlen={maxlen!r} must be >= 1")
        if max_age is not None:
            seconds = max_age.total_seconds() if isinstance(max_age, dt.timedelta) else max_age
            if not seconds >= 0:
                raise ConfigError(f"max_age={max_age!r} must be >= 0 seconds")
        self._items: deque[T] = deque(maxlen=maxlen)
        self._max_age = max_age
        self._key: Callable[[T], Any] = key if key is not None else _ts_of
        self._appended = 0
        self._dropped_length = 0
        self._dropped_age = 0

    @property
    def maxlen(self) -> int:
        """Records kept at most."""
        return cast(int, self._items.maxlen)

    def append(self, record: T) -> None:
        """Add the newest record, dropping the oldest beyond ``maxlen`` or ``max_age``."""
        if len(self._items) == self._items.maxlen:
            self._dropped_length += 1
        self._items.append(record)
        self._appended += 1
        if self._max_age is not None:
            cutoff = _minus(self._key(record), self._max_age)
            # Oldest first: pop from the left until the oldest is young enough.
            while self._items and self._key(self._items[0]) < cutoff:
                self._items.popleft()
                self._dropped_age += 1

    def extend(self, records: Iterable[T]) -> None:
        """Append each of ``records`` in order."""
        for record in records:
            self.append(record)

    def last(self, n: int) -> list[T]:
        """The newest ``n`` records (fewer if the tail holds fewer), oldest first."""
        if n < 0:
            raise ValueError(f"last(n={n}) needs n >= 0")
        newest_first = list(itertools.islice(reversed(self._items), n))
        newest_first.reverse()
        return newest_first

    def since(self, start: Any) -> list[T]:
        """Records whose key is at or after ``start``, oldest first; O(number returned)."""
        found: list[T] = []
        for record in reversed(self._items):
            if self._key(record) < start:
                break
            found.append(record)
        found.reverse()
        return found

    def clear(self) -> None:
        """Forget every record (counters are kept)."""
        self._items.clear()

    def stats(self) -> TailStats:
        """Size, limit and how many records were dropped by length and by age."""
        return TailStats(
            len(self._items), self.maxlen, self._appended, self._dropped_length, self._dropped_age
        )

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._items))

    def __repr__(self) -> str:
        return f"<Tail {len(self._items)}/{self.maxlen} max_age={self._max_age!r}>"


def _minus(newest: Any, max_age: float | dt.timedelta) -> Any:
    # Datetime keys with a float age, or number keys with a timedelta age, both just work.
    if isinstance(newest, dt.datetime | dt.date) and not isinstance(max_age, dt.timedelta):
        return newest - dt.timedelta(seconds=max_age)
    if isinstance(max_age, dt.timedelta) and not isinstance(newest, dt.datetime | dt.date):
        return newest - max_age.total_seconds()
    return newest - max_age
