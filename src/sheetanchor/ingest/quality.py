"""Data-quality checks for ingested records: report gaps, outliers and bad values.

A check looks at one record at a time and returns :class:`Finding` objects; it never changes
the record. :class:`QualityGate` runs the checks of one stream, counts every finding in
``sheetanchor_ingest_quality_findings_total{stream,check}``, logs them (at most one line per
check per ``log_interval``, with the number held back), and lets the record flow on, unless
a check with ``reject=True`` found something: then it raises :class:`RecordError`.

State is bounded: per-key checks keep at most ``max_keys`` keys (least recently seen is
forgotten first), and :class:`PriceOutlier` keeps at most ``window`` prices per key.

Example::

    gate = QualityGate("prices", [
        TimeGap(max_gap=5.0),
        TimestampBackwards(),
        PriceOutlier(threshold=8.0, reject=True),
        ZeroVolume(),
    ])
    findings = gate.inspect({"symbol": "ABC", "ts": 1700000000.0, "price": 10.0, "volume": 3})

A custom check is any object with ``name``, ``reject`` and ``observe(record)``.

With a ``WriteBuffer``, give the checks to the stream: ``Stream(..., checks=[...])``; the
buffer runs them through a ``QualityGate`` at ``put``, before accepting the record, so a check
with ``reject=True`` makes ``put`` raise ``RecordError`` and the record is not written.
"""

from __future__ import annotations

import datetime as dt
import math
import statistics
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar, runtime_checkable

from prometheus_client import Counter

from sheetanchor.errors import ConfigError, RecordError
from sheetanchor.observe import REGISTRY, get_logger, metric_name

__all__ = [
    "DEFAULT_MAX_KEYS",
    "Finding",
    "PriceOutlier",
    "QualityCheck",
    "QualityGate",
    "TimeGap",
    "TimestampBackwards",
    "ZeroVolume",
]

DEFAULT_MAX_KEYS = 10_000
# MAD of a normal distribution times this is its standard deviation.
_MAD_TO_SIGMA = 1.4826

_log = get_logger("ingest.quality")

_FINDINGS = Counter(
    metric_name("ingest", "quality_findings"),
    "Data-quality findings per stream and check (the record still flows unless rejected).",
    ["stream", "check"],
    registry=REGISTRY,
)


@dataclass(frozen=True)
class Finding:
    """One problem a check saw in one record.

    Attributes:
        check: the check's name, e.g. ``"time_gap"``.
        field: the record field that is wrong.
        value: its value.
        key: the per-key value (e.g. the symbol), or None for checks without a key.
        message: what is wrong, in words.
    """

    check: str
    field: str
    value: object
    key: object
    message: str


@runtime_checkable
class QualityCheck(Protocol):
    """What :class:`QualityGate` runs: ``observe`` returns the findings for one record.

    ``observe`` must not modify the record and must keep bounded state.
    """

    @property
    def name(self) -> str:
        """Short, low-cardinality name used as the metric label."""
        ...

    @property
    def reject(self) -> bool:
        """If true, a finding makes :meth:`QualityGate.inspect` raise ``RecordError``."""
        ...

    def observe(self, record: Mapping[str, object]) -> list[Finding]:
        """Return the findings for ``record`` (empty when it looks fine)."""
        ...


_S = TypeVar("_S")


class _KeyedState(Generic[_S]):
    """Per-key state with an LRU bound: the least recently seen key is forgotten first."""

    def __init__(self, max_keys: int) -> None:
        if max_keys < 1:
            raise ConfigError(f"max_keys={max_keys!r} must be >= 1")
        self._max = max_keys
        self._items: OrderedDict[Hashable, _S] = OrderedDict()
        self.evicted = 0

    def get(self, key: Hashable) -> _S | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def set(self, key: Hashable, value: _S) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self._max:
            self._items.popitem(last=False)
            self.evicted += 1

    def __len__(self) -> int:
        return len(self._items)


def _as_seconds(value: object) -> float | None:
    """A time as float seconds: datetimes (naive ones read as UTC) or numbers (epoch)."""
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.timestamp()
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
        return number if math.isfinite(number) else None
    return None


def _as_number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(value)  # type: ignore[arg-type]  # Decimal, numeric strings
    except (TypeError, ValueError):
        return None


def _key_of(record: Mapping[str, object], key: str | None) -> Hashable:
    if key is None:
        return None
    value = record.get(key)
    return value if isinstance(value, Hashable) else repr(value)


def _seconds(value: float | dt.timedelta, name: str) -> float:
    seconds = value.total_seconds() if isinstance(value, dt.timedelta) else float(value)
    if not seconds > 0:
        raise ConfigError(f"{name}={value!r} must be a positive number of seconds")
    return seconds


class _TimeCheck:
    """Shared state handling of the time-ordered checks: last time seen per key."""

    name = "time"

    def __init__(self, field: str, key: str | None, reject: bool, max_keys: int) -> None:
        self.field = field
        self.key = key
        self.reject = reject
        self._last: _KeyedState[float] = _KeyedState(max_keys)

    @property
    def tracked_keys(self) -> int:
        """Keys currently remembered (at most ``max_keys``)."""
        return len(self._last)

    def observe(self, record: Mapping[str, object]) -> list[Finding]:
        """Return the findings for ``record``."""
        value = record.get(self.field)
        key = _key_of(record, self.key)
        now = _as_seconds(value)
        if now is None:
            return [
                Finding(
                    self.name,
                    self.field,
                    value,
                    key,
                    f"{self.field}={value!r} is missing or not a time (datetime or epoch seconds)",
                )
            ]
        last = self._last.get(key)
        # Remember the latest time only, so one bad timestamp does not cascade into more.
        self._last.set(key, now if last is None else max(last, now))
        if last is None:
            return []
        return self._compare(record, key, value, now, last)

    def _compare(
        self, record: Mapping[str, object], key: Hashable, value: object, now: float, last: float
    ) -> list[Finding]:
        raise NotImplementedError


class TimeGap(_TimeCheck):
    """Report a record whose time is more than ``max_gap`` after the previous one of its key.

    Args:
        field: the time field (datetime, naive read as UTC, or epoch seconds).
        key: the field that separates series (e.g. the symbol); None for one series.
        max_gap: the largest allowed gap, in seconds or as a ``timedelta``.
        reject: raise ``RecordError`` instead of only reporting.
        max_keys: keys remembered at most (least recently seen is forgotten).
    """

    name = "time_gap"

    def __init__(
        self,
        field: str = "ts",
        key: str | None = "symbol",
        *,
        max_gap: float | dt.timedelta,
        reject: bool = False,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        super().__init__(field, key, reject, max_keys)
        self.max_gap = _seconds(max_gap, "max_gap")

    def _compare(
        self, record: Mapping[str, object], key: Hashable, value: object, now: float, last: float
    ) -> list[Finding]:
        gap = now - last
        if gap <= self.max_gap:
            return []
        return [
            Finding(
                self.name,
                self.field,
                value,
                key,
                f"{gap:.3f} s since the previous {self.field} of {key!r} "
                f"(max_gap={self.max_gap:g} s)",
            )
        ]


class TimestampBackwards(_TimeCheck):
    """Report a record whose time is earlier than the latest one seen for its key.

    Args:
        field: the time field (datetime, naive read as UTC, or epoch seconds).
        key: the field that separates series; None for one series.
        reject: raise ``RecordError`` instead of only reporting.
        max_keys: keys remembered at most.
    """

    name = "timestamp_backwards"

    def __init__(
        self,
        field: str = "ts",
        key: str | None = "symbol",
        *,
        reject: bool = False,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        super().__init__(field, key, reject, max_keys)

    def _compare(
        self, record: Mapping[str, object], key: Hashable, value: object, now: float, last: float
    ) -> list[Finding]:
        if now >= last:
            return []
        return [
            Finding(
                self.name,
                self.field,
                value,
                key,
                f"{self.field} of {key!r} went back {last - now:.3f} s behind the latest seen",
            )
        ]


class ZeroVolume:
    """Report a record whose volume is zero or negative (or missing / not a number).

    Args:
        field: the volume field.
        reject: raise ``RecordError`` instead of only reporting.
    """

    name = "zero_volume"

    def __init__(self, field: str = "volume", *, reject: bool = False) -> None:
        self.field = field
        self.reject = reject

    def observe(self, record: Mapping[str, object]) -> list[Finding]:
        """Return the findings for ``record``."""
        value = record.get(self.field)
        number = _as_number(value)
        if number is not None and number > 0:
            return []
        why = "is missing or not a number" if number is None else "is not positive"
        return [Finding(self.name, self.field, value, None, f"{self.field}={value!r} {why}")]


class PriceOutlier:
    """Report a price far from the recent prices of its key (robust z-score).

    The score is ``|price - median| / (1.4826 * MAD)`` over the last ``window`` prices of the
    key (median absolute deviation, so one wild print barely moves it). When the recent prices
    hardly vary, the scale never drops below ``min_scale`` times the median, so a tick after a
    flat stretch is not an outlier. Every price joins the window, so a lasting level shift is
    reported for a while and then accepted.

    Args:
        field: the price field.
        key: the field that separates series; None for one series.
        window: prices remembered per key (bounded deque).
        threshold: scores above this are outliers.
        min_samples: prices needed before anything is judged.
        min_scale: floor of the scale, as a fraction of the median.
        reject: raise ``RecordError`` instead of only reporting.
        max_keys: keys remembered at most.
    """

    name = "price_outlier"

    def __init__(
        self,
        field: str = "price",
        key: str | None = "symbol",
        *,
        window: int = 100,
        threshold: float = 8.0,
        min_samples: int = 10,
        min_scale: float = 1e-3,
        reject: bool = False,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        if window < 3:
            raise ConfigError(f"window={window!r} must be >= 3")
        if not threshold > 0:
            raise ConfigError(f"threshold={threshold!r} must be > 0")
        if not 1 <= min_samples <= window:
            raise ConfigError(f"min_samples={min_samples!r} must be between 1 and window")
        if min_scale < 0:
            raise ConfigError(f"min_scale={min_scale!r} must be >= 0")
        self.field = field
        self.key = key
        self.window = window
        self.threshold = float(threshold)
        self.min_samples = min_samples
        self.min_scale = float(min_scale)
        self.reject = reject
        self._windows: _KeyedState[deque[float]] = _KeyedState(max_keys)

    @property
    def tracked_keys(self) -> int:
        """Keys currently remembered (at most ``max_keys``)."""
        return len(self._windows)

    def observe(self, record: Mapping[str, object]) -> list[Finding]:
        """Return the findings for ``record``."""
        value = record.get(self.field)
        key = _key_of(record, self.key)
        price = _as_number(value)
        if price is None or not math.isfinite(price):
            return [
                Finding(
                    self.name,
                    self.field,
                    value,
                    key,
                    f"{self.field}={value!r} is missing or not a finite number",
                )
            ]
        recent = self._windows.get(key)
        if recent is None:
            recent = deque(maxlen=self.window)
            self._windows.set(key, recent)
        findings: list[Finding] = []
        if len(recent) >= self.min_samples:
            score, median = _robust_score(recent, price, self.min_scale)
            if score > self.threshold:
                findings.append(
                    Finding(
                        self.name,
                        self.field,
                        value,
                        key,
                        f"{self.field}={price:g} of {key!r} is {score:.1f} robust deviations "
                        f"from the median {median:g} of its last {len(recent)} "
                        f"(threshold {self.threshold:g})",
                    )
                )
        recent.append(price)
        return findings


def _robust_score(recent: Sequence[float], price: float, min_scale: float) -> tuple[float, float]:
    median = statistics.median(recent)
    mad = statistics.median([abs(p - median) for p in recent])
    scale = max(_MAD_TO_SIGMA * mad, abs(median) * min_scale, 1e-12)
    return abs(price - median) / scale, median


class QualityGate:
    """Run the quality checks of one stream: count, log (rate-limited), maybe reject.

    Args:
        stream: the stream name (the ``stream`` metric label).
        checks: the checks to run on every record, in order.
        log_interval: at most one log line per check per this many seconds; the lines in
            between are counted and reported with the next one.
        clock: monotonic clock in seconds (injectable for tests).

    Example::

        gate = QualityGate("prices", [ZeroVolume(), PriceOutlier(reject=True)])
        gate.inspect(record)   # -> list of findings; raises RecordError if rejected
    """

    def __init__(
        self,
        stream: str,
        checks: Sequence[QualityCheck],
        *,
        log_interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if log_interval < 0:
            raise ConfigError(f"log_interval={log_interval!r} must be >= 0")
        names = [check.name for check in checks]
        if len(set(names)) != len(names):
            raise ConfigError(f"check names must be unique per stream, got {names}")
        self.stream = stream
        self.checks: tuple[QualityCheck, ...] = tuple(checks)
        self._log_interval = float(log_interval)
        self._clock = clock
        # One entry per check: bounded by the number of checks.
        self._next_log: dict[str, float] = {}
        self._held_back: dict[str, int] = {}
        self._counters = {name: _FINDINGS.labels(stream=stream, check=name) for name in names}
        self.findings_total = 0

    def inspect(self, record: Mapping[str, object]) -> list[Finding]:
        """Run every check on ``record`` and return all findings.

        Raises:
            RecordError: a check configured with ``reject=True`` found a problem; ``field``
                and ``value`` name it. Its findings are counted and logged first.
        """
        findings: list[Finding] = []
        rejected: Finding | None = None
        for check in self.checks:
            found = check.observe(record)
            if not found:
                continue
            self._counters[check.name].inc(len(found))
            self.findings_total += len(found)
            self._report(check.name, found)
            findings.extend(found)
            if check.reject and rejected is None:
                rejected = found[0]
        if rejected is not None:
            raise RecordError(
                f"stream {self.stream!r} rejected a record: check {rejected.check} found "
                f"{rejected.field}={rejected.value!r}: {rejected.message}; fix the source or "
                "configure the check with reject=False to only report",
                stream=self.stream,
                field=rejected.field,
                value=rejected.value,
            )
        return findings

    def _report(self, name: str, found: list[Finding]) -> None:
        now = self._clock()
        if now < self._next_log.get(name, -math.inf):
            self._held_back[name] = self._held_back.get(name, 0) + len(found)
            return
        self._next_log[name] = now + self._log_interval
        held = self._held_back.pop(name, 0)
        first = found[0]
        _log.warning(
            "quality %s on stream %s: %s (key=%r)%s",
            name,
            self.stream,
            first.message,
            first.key,
            f"; {held} more since the last report" if held else "",
            extra={"stream": self.stream, "check": name, "held_back": held},
        )
