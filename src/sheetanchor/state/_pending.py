"""Keys written while Redis was unreachable: invalidated before the cache is trusted again.

Bounded: past ``max_keys`` the set stops recording keys and remembers that it overflowed;
the store then drops every cached entry of its namespace on recovery instead.
"""

from __future__ import annotations

import threading

__all__ = ["PendingInvalidations"]


class PendingInvalidations:
    """Redis key -> (version, rank, entry bytes) to write with the fence, newest kept.

    Args:
        max_keys: keys remembered at most; then :attr:`overflowed` is set.
    """

    def __init__(self, max_keys: int = 10_000) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        self.max_keys = max_keys
        self.overflowed = False
        self._items: dict[str, tuple[int, int, bytes]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def dirty(self) -> bool:
        """True while anything is pending (keys, or an overflow to flush)."""
        return bool(self._items) or self.overflowed

    def add(self, rkey: str, version: int, rank: int, entry: bytes) -> None:
        """Remember that ``rkey`` must get ``entry`` (or something newer) before reads."""
        with self._lock:
            cur = self._items.get(rkey)
            if cur is not None:
                if (cur[0], cur[1]) < (version, rank):
                    self._items[rkey] = (version, rank, entry)
                return
            if len(self._items) >= self.max_keys:
                self.overflowed = True
                return
            self._items[rkey] = (version, rank, entry)

    def snapshot(self) -> tuple[dict[str, tuple[int, int, bytes]], bool]:
        """The items and the overflow flag, without clearing them."""
        with self._lock:
            return dict(self._items), self.overflowed

    def done(self, items: dict[str, tuple[int, int, bytes]], overflow_handled: bool) -> None:
        """Forget items that were written (unless a newer one arrived meanwhile)."""
        with self._lock:
            for rkey, value in items.items():
                if self._items.get(rkey) == value:
                    del self._items[rkey]
            if overflow_handled:
                self.overflowed = False
