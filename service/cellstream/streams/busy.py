"""The rows planned into the run being assembled: eviction and expiry must leave them alone."""

from __future__ import annotations

import numpy as np


class BusyRows:
    """The rows planned into the run being assembled (eviction and expiry must leave them alone).

    A set while only single readings are planned, so planning a run costs nothing per idle
    stream (a mask over the whole store is a 1 MB memset per run at a million streams); a
    boolean mask over the rows once a StepBatch wave needs vectorized checks.
    """

    __slots__ = ("_mask", "_rows")

    def __init__(self) -> None:
        self._rows: set[int] = set()
        self._mask: np.ndarray | None = None

    def __contains__(self, row: int) -> bool:
        if self._mask is None:
            return row in self._rows
        return row < len(self._mask) and bool(self._mask[row])

    def add(self, row: int) -> None:
        if self._mask is None:
            self._rows.add(row)
        else:
            self.mask(row + 1)[row] = True

    def mask(self, capacity: int) -> np.ndarray:
        """The rows as a mask of at least `capacity` entries (made or grown on first need)."""
        mask = self._mask
        if mask is None or len(mask) < capacity:
            grown = np.zeros(max(capacity, 0 if mask is None else len(mask)), bool)
            if mask is not None:
                grown[: len(mask)] = mask
            elif self._rows:
                grown[np.fromiter(self._rows, np.int64, len(self._rows))] = True
            self._mask = mask = grown
        return mask

    def of(self, rows: np.ndarray) -> np.ndarray:
        """Which of these rows are busy, one bool each."""
        if self._mask is None:
            if not self._rows:
                return np.zeros(len(rows), bool)
            return np.isin(rows, np.fromiter(self._rows, np.int64, len(self._rows)))
        result = np.zeros(len(rows), bool)
        inside = rows < len(self._mask)
        result[inside] = self._mask[rows[inside]]
        return result
