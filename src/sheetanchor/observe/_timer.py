"""Phase timers: how long each phase of a loop takes, as a histogram and a slow-phase log.

Incident 000 wanted per-phase timings of the simulation tick; this is that, for any loop::

    with timed("persist", part="tick", slow=0.5):
        await store.put(...)

    async with timed("fetch", part="ingest"):
        ...
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from types import TracebackType

from prometheus_client import Histogram

from sheetanchor.errors import ConfigError
from sheetanchor.observe._log import get_logger
from sheetanchor.observe._metrics import REGISTRY, metric_name

__all__ = ["PHASE_DURATION", "PhaseTimer", "timed"]

_log = get_logger("phase")

#: ``sheetanchor_phase_duration_seconds{part,phase}``: from a millisecond tick to a
#: two-minute migration.
PHASE_DURATION = Histogram(
    metric_name("phase", "duration", "seconds"),
    "Duration of a timed phase (sheetanchor.observe.timed), by part and phase.",
    ["part", "phase"],
    registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)


class PhaseTimer:
    """Times one phase; use through :func:`timed`. Usable with ``with`` and ``async with``.

    Attributes:
        elapsed: seconds the phase took, set when the block exits (``None`` before).
    """

    __slots__ = ("_clock", "_start", "elapsed", "part", "phase", "slow")

    def __init__(
        self, phase: str, *, part: str, slow: float | None, clock: Callable[[], float]
    ) -> None:
        for name, value in (("phase", phase), ("part", part)):
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{name} must be a non-empty string, got {value!r}")
        if slow is not None and (
            isinstance(slow, bool)
            or not isinstance(slow, int | float)
            or math.isnan(slow)
            or slow < 0
        ):
            raise ConfigError(f"slow must be None or a number of seconds >= 0, got {slow!r}")
        if not callable(clock):
            raise ConfigError(f"clock must be callable, got {clock!r}")
        self.phase = phase
        self.part = part
        self.slow = slow
        self._clock = clock
        self._start: float | None = None
        self.elapsed: float | None = None

    def __enter__(self) -> PhaseTimer:
        self._start = self._clock()
        self.elapsed = None
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._start is None:
            raise RuntimeError("PhaseTimer exited without being entered; use it in a with block")
        # Failed and cancelled phases are recorded too: a phase that times out slowly is
        # exactly the one to see in the histogram.
        elapsed = max(0.0, self._clock() - self._start)
        self._start = None
        self.elapsed = elapsed
        PHASE_DURATION.labels(part=self.part, phase=self.phase).observe(elapsed)
        if self.slow is not None and elapsed > self.slow:
            _log.warning(
                "slow phase %s/%s: %.3f s (threshold %.3f s)%s",
                self.part,
                self.phase,
                elapsed,
                self.slow,
                "" if exc is None else f", ended by {type(exc).__name__}",
                extra={
                    "part": self.part,
                    "phase": self.phase,
                    "seconds": round(elapsed, 6),
                    "slow_threshold": self.slow,
                },
            )

    async def __aenter__(self) -> PhaseTimer:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)


def timed(
    phase: str,
    *,
    part: str = "app",
    slow: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> PhaseTimer:
    """Time a phase into ``sheetanchor_phase_duration_seconds{part,phase}``.

    Phases slower than ``slow`` seconds are also logged at WARNING on
    ``sheetanchor.phase``, with ``part``, ``phase`` and ``seconds`` as structured extras.
    ``part`` and ``phase`` become metric labels: use fixed names from code, never a key,
    an id or user input.

    Args:
        phase: the phase name (``"persist"``).
        part: the loop or component it belongs to (``"tick"``).
        slow: threshold in seconds above which the phase is logged; ``None`` never logs.
        clock: a monotonic clock in seconds; ``time.perf_counter`` by default.

    Raises:
        ConfigError: empty names, a negative ``slow`` or a clock that is not callable.

    Example::

        with timed("persist", part="tick", slow=0.5) as t:
            await persist()
        print(t.elapsed)
    """
    return PhaseTimer(phase, part=part, slow=slow, clock=clock)
