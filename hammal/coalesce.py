"""
Merging of concurrent identical work.

Modelled on Synapse's C{ResponseCache.wrap} and C{ObservableDeferred}: the
first caller for a key starts the work, later callers observe the same
result. Cancelling one observer never cancels the shared work; a failure is
delivered to every observer and forgotten, so the next call tries afresh.

Shared work that never ends would hang every later caller for its key, so a
coalescer given a clock and a deadline gives up on a run that takes longer:
each observer gets L{UpstreamTimeout} (a 504), the run is cancelled and its
entry dropped, and the next call starts afresh.
"""

from __future__ import annotations

from typing import Any, Callable, Coroutine, Generic, Hashable, TypeVar

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from hammal import metrics
from hammal.errors import UpstreamTimeout

T = TypeVar("T")


class _Run(Generic[T]):
    """One run of the work for a key: its observers, its work and its timer."""

    def __init__(self) -> None:
        self.observers: list[Deferred[T]] = []
        self.work: Deferred[T] | None = None
        self.timer: IDelayedCall | None = None


class Coalescer(Generic[T]):
    """
    One run of C{work} per key at a time, observed by every caller.

    @param clock: with C{deadline}, bounds every run.
    @param deadline: seconds a run may take before its observers get
        L{UpstreamTimeout} and the run is cancelled and forgotten.
    @param what: names the work in that timeout's message.
    @param name: names the work in metrics (C{hammal_coalesced_work_total}).
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime | None = None,
        deadline: float | None = None,
        what: str = "the upstream request",
        name: str = "work",
    ) -> None:
        self._runs: dict[Hashable, _Run[T]] = {}
        self._started = metrics.coalesced_work.labels(name, "started")
        self._joined = metrics.coalesced_work.labels(name, "joined")
        self._clock = clock
        self._deadline = deadline
        self._what = what

    def __contains__(self, key: Hashable) -> bool:
        return key in self._runs

    def observers(self, key: Hashable) -> int:
        """How many callers wait on the work for C{key}."""
        run = self._runs.get(key)
        return len(run.observers) if run is not None else 0

    def run(
        self, key: Hashable, work: Callable[[], Coroutine[Any, Any, T] | Deferred[T]]
    ) -> Deferred[T]:
        """
        Return a L{Deferred} for the result of C{work()} (a coroutine or a
        L{Deferred}), calling it only if no run for C{key} is under way.
        """
        current = self._runs.get(key)
        if current is not None:
            self._joined.inc()
            return self._observe(current)
        self._started.inc()
        run: _Run[T] = _Run()
        self._runs[key] = run
        observer = self._observe(run)
        if self._clock is not None and self._deadline is not None:
            run.timer = self._clock.callLater(self._deadline, self._expire, key, run)
        try:
            run.work = ensureDeferred(work())
        except Exception:
            self._deliver(Failure(), key, run)
        else:
            run.work.addBoth(self._deliver, key, run)
        return observer

    def _observe(self, run: _Run[T]) -> Deferred[T]:
        observer: Deferred[T] = Deferred(lambda d: self._forget(run, d))
        run.observers.append(observer)
        return observer

    def _forget(self, run: _Run[T], observer: Deferred[T]) -> None:
        if observer in run.observers:
            run.observers.remove(observer)

    def _expire(self, key: Hashable, run: _Run[T]) -> None:
        run.timer = None
        if self._runs.get(key) is not run:
            return
        self.log.warn(
            "{what} did not finish within {deadline:g}s: given up for {observers} waiters",
            what=self._what,
            deadline=self._deadline,
            observers=len(run.observers),
        )
        self._deliver(
            Failure(
                UpstreamTimeout(f"{self._what} did not finish within {self._deadline:g} seconds")
            ),
            key,
            run,
        )
        if run.work is not None:
            run.work.cancel()  # drops its upstream connections; its outcome goes nowhere

    def _deliver(self, result: T | Failure, key: Hashable, run: _Run[T]) -> None:
        # Returning None consumes a failure here: every observer has had it.
        if run.timer is not None and run.timer.active():
            run.timer.cancel()
        run.timer = None
        if self._runs.get(key) is not run:
            return  # given up already: a later run may hold the key now
        del self._runs[key]
        observers, run.observers = run.observers, []
        for observer in observers:
            if isinstance(result, Failure):
                observer.errback(result)
            else:
                observer.callback(result)
