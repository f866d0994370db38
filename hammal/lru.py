"""
The one bounded-memory helper: an insertion- or use-ordered mapping trimmed
to a limit, oldest first. Every in-process table hammal keeps about
clients or upstreams (logins, confirmations, failures, negative answers)
is bounded with it, so that no client can grow hammal's memory.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


def trim_oldest(entries: OrderedDict[K, V], limit: int) -> list[tuple[K, V]]:
    """
    Drop the oldest of C{entries} (the first in order) until at most
    C{limit} remain; return what was dropped, oldest first.
    """
    dropped: list[tuple[K, V]] = []
    while len(entries) > limit:
        dropped.append(entries.popitem(last=False))
    return dropped


def remember(entries: OrderedDict[K, V], key: K, value: V, limit: int) -> list[tuple[K, V]]:
    """
    Set C{key} to C{value} as the newest entry, then trim C{entries} to
    C{limit}; return what was dropped.
    """
    entries[key] = value
    entries.move_to_end(key)
    return trim_oldest(entries, limit)
