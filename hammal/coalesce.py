"""
Merging of concurrent identical work.

Modelled on Synapse's C{ResponseCache.wrap} and C{ObservableDeferred}: the
first caller for a key starts the work, later callers observe the same
result. Cancelling one observer never cancels the shared work; a failure is
delivered to every observer and forgotten, so the next call tries afresh.
"""

from __future__ import annotations

from typing import Callable, Generic, Hashable, TypeVar

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.python.failure import Failure

T = TypeVar("T")


class Coalescer(Generic[T]):
    """One run of C{work} per key at a time, observed by every caller."""

    def __init__(self) -> None:
        self._observers: dict[Hashable, list[Deferred[T]]] = {}

    def __contains__(self, key: Hashable) -> bool:
        return key in self._observers

    def observers(self, key: Hashable) -> int:
        """How many callers wait on the work for C{key}."""
        return len(self._observers.get(key, ()))

    def run(self, key: Hashable, work: Callable[[], "Deferred[T]"]) -> Deferred[T]:
        """
        Return a L{Deferred} for the result of C{work()}, starting it only if
        no run for C{key} is under way.
        """
        observer: Deferred[T] = Deferred(lambda d: self._forget(key, d))
        waiting = self._observers.get(key)
        if waiting is not None:
            waiting.append(observer)
            return observer
        self._observers[key] = [observer]
        try:
            started = ensureDeferred(work())
        except Exception:
            self._deliver(Failure(), key)
        else:
            started.addBoth(self._deliver, key)
        return observer

    def _forget(self, key: Hashable, observer: Deferred[T]) -> None:
        waiting = self._observers.get(key)
        if waiting is not None and observer in waiting:
            waiting.remove(observer)

    def _deliver(self, result: T | Failure, key: Hashable) -> None:
        # Returning None consumes a failure here: every observer has had it.
        for observer in self._observers.pop(key, []):
            if isinstance(result, Failure):
                observer.errback(result)
            else:
                observer.callback(result)
