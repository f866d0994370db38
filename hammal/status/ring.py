"""
Per-minute counters in a fixed-size ring buffer: the last day of a few
numbers, a minute per point, in constant memory.

A slot is addressed by its minute number (clock seconds // 60) modulo the
ring's size; each slot remembers which minute it holds, so a slot left over
from a previous lap reads as zero and is cleared when written again. No
timer is needed: the clock is read when something is added or read.
"""

from __future__ import annotations

from typing import Sequence

#: A day of minutes.
DAY_MINUTES = 24 * 60


class MinuteRing:
    """
    Counters named C{fields}, summed per minute over the last C{size}
    minutes.
    """

    def __init__(self, fields: Sequence[str], size: int = DAY_MINUTES) -> None:
        if size < 1:
            raise ValueError("a ring needs at least one slot")
        self.fields = tuple(fields)
        self.size = size
        self._minute = [-1] * size
        self._values = {field: [0.0] * size for field in self.fields}

    def add(self, now: float, **amounts: float) -> None:
        """Add C{amounts} (field=amount) to the minute holding C{now}."""
        minute = int(now // 60)
        slot = minute % self.size
        if self._minute[slot] != minute:
            self._minute[slot] = minute
            for values in self._values.values():
                values[slot] = 0.0
        for field, amount in amounts.items():
            self._values[field][slot] += amount

    def series(self, now: float, minutes: int) -> dict[str, list[float]]:
        """
        The last C{minutes} values of every field, oldest first, the
        current (partial) minute last.
        """
        minutes = min(minutes, self.size)
        current = int(now // 60)
        wanted = range(current - minutes + 1, current + 1)
        out: dict[str, list[float]] = {field: [] for field in self.fields}
        for minute in wanted:
            slot = minute % self.size
            fresh = self._minute[slot] == minute
            for field in self.fields:
                out[field].append(self._values[field][slot] if fresh else 0.0)
        return out

    def totals(self, now: float, minutes: int) -> dict[str, float]:
        """Each field summed over the last C{minutes}."""
        return {field: sum(values) for field, values in self.series(now, minutes).items()}
