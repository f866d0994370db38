"""
The most pulled repositories over the last 24 hours, in bounded memory.

Counts go into one bucket per hour (24 buckets, a ring like L{ring}); the
top list sums the buckets of the last 24 hours. Each bucket holds at most
C{max_per_bucket} repositories: past that, new names are counted under
L{OTHERS} so that a flood of distinct names cannot grow memory.
"""

from __future__ import annotations

import heapq

import attrs

#: Where repositories beyond a bucket's capacity are counted.
OTHERS = "(others)"

HOURS = 24


@attrs.frozen
class RepositoryUse:
    """One repository's pulls and bytes over the window."""

    upstream: str
    repository: str
    pulls: int
    bytes: int


class TopRepositories:
    """Pulls and bytes per (upstream, repository), hourly, for a day."""

    def __init__(self, max_per_bucket: int = 2000, hours: int = HOURS) -> None:
        self._hours = hours
        self._max = max_per_bucket
        self._hour = [-1] * hours
        self._buckets: list[dict[tuple[str, str], list[int]]] = [{} for _ in range(hours)]

    def add(self, now: float, upstream: str, repository: str, pulls: int, size: int) -> None:
        """Count C{pulls} manifest pulls and C{size} bytes for C{repository}."""
        hour = int(now // 3600)
        slot = hour % self._hours
        if self._hour[slot] != hour:
            self._hour[slot] = hour
            self._buckets[slot] = {}
        bucket = self._buckets[slot]
        key = (upstream, repository)
        counts = bucket.get(key)
        if counts is None:
            if len(bucket) >= self._max:
                key = (upstream, OTHERS)
                counts = bucket.get(key)
            if counts is None:
                counts = bucket[key] = [0, 0]
        counts[0] += pulls
        counts[1] += size

    def _window(self, now: float) -> dict[tuple[str, str], list[int]]:
        current = int(now // 3600)
        merged: dict[tuple[str, str], list[int]] = {}
        for hour in range(current - self._hours + 1, current + 1):
            slot = hour % self._hours
            if self._hour[slot] != hour:
                continue
            for key, (pulls, size) in self._buckets[slot].items():
                total = merged.setdefault(key, [0, 0])
                total[0] += pulls
                total[1] += size
        return merged

    def top(self, now: float, n: int = 10) -> tuple[list[RepositoryUse], list[RepositoryUse]]:
        """The C{n} repositories with the most pulls, and with the most bytes."""
        merged = [
            RepositoryUse(upstream, repository, pulls, size)
            for (upstream, repository), (pulls, size) in self._window(now).items()
        ]
        by_pulls = heapq.nlargest(
            n, (u for u in merged if u.pulls), key=lambda u: (u.pulls, u.bytes)
        )
        by_bytes = heapq.nlargest(
            n, (u for u in merged if u.bytes), key=lambda u: (u.bytes, u.pulls)
        )
        return by_pulls, by_bytes
