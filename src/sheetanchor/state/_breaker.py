"""A circuit breaker for the cache: a dead Redis costs a flag check, not a timeout.

Closed: calls go to Redis. After ``failure_threshold`` consecutive failures it opens: calls
skip Redis for ``reset_timeout`` seconds (jittered, doubling up to ``max_reset_timeout``
while Redis stays down). Then exactly one caller gets :data:`PROBE`: it must first bring the
cache back in line (the store writes its pending invalidations) and report
:meth:`success` or :meth:`failure`; everyone else keeps skipping Redis meanwhile.

The clock and the random source are injected so tests drive it without sleeping.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Literal

__all__ = ["ALLOW", "DENY", "PROBE", "CircuitBreaker"]

ALLOW: Literal[0] = 0
DENY: Literal[1] = 1
PROBE: Literal[2] = 2


class CircuitBreaker:
    """Closed / open / half-open breaker with jittered, growing open periods.

    Args:
        failure_threshold: consecutive failures that open the breaker.
        reset_timeout: seconds open before the first probe.
        max_reset_timeout: the cap of the doubling open period.
        jitter: fraction of the open period randomized (0.2 = up to 20 % shorter).
        clock: monotonic clock (seconds).
        rand: uniform [0, 1) source.
    """

    def __init__(
        self,
        *,
        failure_threshold: int = 2,
        reset_timeout: float = 0.5,
        max_reset_timeout: float = 15.0,
        jitter: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold}")
        if not 0 < reset_timeout <= max_reset_timeout:
            raise ValueError(
                f"need 0 < reset_timeout <= max_reset_timeout, got {reset_timeout}, "
                f"{max_reset_timeout}"
            )
        self._threshold = failure_threshold
        self._base = reset_timeout
        self._cap = max_reset_timeout
        self._jitter = jitter
        self._clock = clock
        self._rand = rand
        self._lock = threading.Lock()
        self._failures = 0
        self._open = False
        self._open_until = 0.0
        self._period = reset_timeout
        self._probing = False
        self.opened_total = 0

    @property
    def state(self) -> str:
        """``"closed"``, ``"open"`` or ``"half_open"`` (a probe is running)."""
        if not self._open:
            return "closed"
        return "half_open" if self._probing else "open"

    def probe_in(self) -> float:
        """Seconds until the next probe may run (0.0: closed, or a probe is due now)."""
        if not self._open:
            return 0.0
        return max(0.0, self._open_until - self._clock())

    def check(self) -> Literal[0, 1, 2]:
        """:data:`ALLOW` (closed), :data:`DENY` (skip Redis) or :data:`PROBE` (you test it)."""
        if not self._open:  # the hot path: one attribute read
            return ALLOW
        return self._check_open()

    def denies(self) -> bool:
        """True when :meth:`check` would give :data:`DENY`: open, and no probe due or one
        running. Changes nothing (no probe is handed out) and takes no lock: a caller that
        reads a breaker being closed meanwhile skips Redis once more, as a ``DENY`` would."""
        return self._open and (self._probing or self._clock() < self._open_until)

    def _check_open(self) -> Literal[0, 1, 2]:
        with self._lock:
            if not self._open:
                return ALLOW
            if self._probing or self._clock() < self._open_until:
                return DENY
            self._probing = True
            return PROBE

    def success(self) -> None:
        """A call (or the probe) succeeded: close."""
        if self._open or self._failures:
            with self._lock:
                self._failures = 0
                self._open = False
                self._probing = False
                self._period = self._base

    def note_success(self) -> None:
        """A call succeeded while closed: earlier failures were not consecutive, forget them.

        Costs two attribute reads when there is nothing to forget. Does not close an open
        breaker (only the probe's :meth:`success` does, after the recovery).
        """
        if self._failures and not self._open:
            with self._lock:
                if not self._open:
                    self._failures = 0

    def trip(self) -> None:
        """Open now, whatever the failure count (a write could not reach Redis).

        Already open (or probing): nothing changes; the running or next probe writes what
        is pending before the breaker closes.
        """
        with self._lock:
            if self._open:
                return
            self._failures = max(self._failures, self._threshold)
            self.opened_total += 1
            self._open = True
            self._probing = False
            self._open_until = self._clock() + self._period * (1 - self._jitter * self._rand())

    def failure(self) -> None:
        """A call (or the probe) failed: count it, open (again) when over the threshold."""
        with self._lock:
            self._failures += 1
            if self._open:
                # A failed probe: stay open, longer.
                self._period = min(self._period * 2, self._cap)
            elif self._failures < self._threshold:
                return
            else:
                self.opened_total += 1
            self._open = True
            self._probing = False
            self._open_until = self._clock() + self._period * (1 - self._jitter * self._rand())
