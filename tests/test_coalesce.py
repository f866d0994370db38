"""
Tests for L{hammal.coalesce.Coalescer}: one run of concurrent identical
work, observed by every caller.
"""

from __future__ import annotations

import gc

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase

from hammal import metrics
from hammal.coalesce import Coalescer
from hammal.errors import UpstreamTimeout


class Boom(Exception):
    """The work failed."""


class Work:
    """
    Work whose runs are counted and finished by hand.

    @ivar runs: the L{Deferred} of every run started, in order.
    @ivar cancelled: how many runs were cancelled.
    """

    def __init__(self) -> None:
        self.runs: list[Deferred[str]] = []
        self.cancelled = 0

    def __call__(self) -> Deferred[str]:
        d: Deferred[str] = Deferred(self._cancel)
        self.runs.append(d)
        return d

    def _cancel(self, d: Deferred[str]) -> None:
        self.cancelled += 1


class CoalescerTests(SynchronousTestCase):
    """Callers for one key share one run of the work."""

    def setUp(self) -> None:
        self.coalescer: Coalescer[str] = Coalescer()
        self.work = Work()

    def test_one_run_per_key(self) -> None:
        observers = [self.coalescer.run("k", self.work) for _ in range(5)]
        self.assertEqual(len(self.work.runs), 1)
        self.assertIn("k", self.coalescer)
        self.assertEqual(self.coalescer.observers("k"), 5)
        for observer in observers:
            self.assertNoResult(observer)
        self.work.runs[0].callback("result")
        self.assertEqual([self.successResultOf(o) for o in observers], ["result"] * 5)
        self.assertNotIn("k", self.coalescer)
        self.assertEqual(self.coalescer.observers("k"), 0)

    def test_keys_independent(self) -> None:
        a = self.coalescer.run("a", self.work)
        b = self.coalescer.run("b", self.work)
        self.assertEqual(len(self.work.runs), 2)
        self.work.runs[1].callback("B")
        self.assertEqual(self.successResultOf(b), "B")
        self.assertNoResult(a)
        self.assertIn("a", self.coalescer)
        self.assertNotIn("b", self.coalescer)

    def test_tuple_keys(self) -> None:
        first = self.coalescer.run(("blob", "sha256:0"), self.work)
        second = self.coalescer.run(("blob", "sha256:0"), self.work)
        self.assertEqual(len(self.work.runs), 1)
        self.work.runs[0].callback("x")
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)), ("x", "x"))

    def test_next_call_after_success_runs_afresh(self) -> None:
        first = self.coalescer.run("k", self.work)
        self.work.runs[0].callback("one")
        self.assertEqual(self.successResultOf(first), "one")
        second = self.coalescer.run("k", self.work)
        self.assertEqual(len(self.work.runs), 2)
        self.work.runs[1].callback("two")
        self.assertEqual(self.successResultOf(second), "two")

    def test_failure_reaches_all(self) -> None:
        observers = [self.coalescer.run("k", self.work) for _ in range(3)]
        self.work.runs[0].errback(Boom("upstream broke"))
        for observer in observers:
            failure = self.failureResultOf(observer, Boom)
            self.assertEqual(failure.getErrorMessage(), "upstream broke")

    def test_failure_forgotten(self) -> None:
        """After a failure the next call starts the work again."""
        first = self.coalescer.run("k", self.work)
        self.work.runs[0].errback(Boom())
        self.failureResultOf(first, Boom)
        self.assertNotIn("k", self.coalescer)
        second = self.coalescer.run("k", self.work)
        self.assertEqual(len(self.work.runs), 2)
        self.work.runs[1].callback("recovered")
        self.assertEqual(self.successResultOf(second), "recovered")

    def test_cancel_one_observer(self) -> None:
        """
        Cancelling one observer fails only that observer; the shared work
        and the other observers carry on.
        """
        first = self.coalescer.run("k", self.work)
        second = self.coalescer.run("k", self.work)
        third = self.coalescer.run("k", self.work)
        second.cancel()
        self.failureResultOf(second, CancelledError)
        self.assertEqual(self.work.cancelled, 0)
        self.assertEqual(self.coalescer.observers("k"), 2)
        self.assertNoResult(first)
        self.assertNoResult(third)
        self.work.runs[0].callback("done")
        self.assertEqual(self.successResultOf(first), "done")
        self.assertEqual(self.successResultOf(third), "done")

    def test_cancel_first_observer(self) -> None:
        """The caller that started the work has no special power over it."""
        first = self.coalescer.run("k", self.work)
        second = self.coalescer.run("k", self.work)
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.assertEqual(self.work.cancelled, 0)
        self.work.runs[0].callback("done")
        self.assertEqual(self.successResultOf(second), "done")

    def test_cancel_all_observers(self) -> None:
        """
        With every observer gone the work still runs to completion, and a
        caller arriving meanwhile joins it instead of starting another.
        """
        observers = [self.coalescer.run("k", self.work) for _ in range(2)]
        for observer in observers:
            observer.cancel()
            self.failureResultOf(observer, CancelledError)
        self.assertEqual(self.work.cancelled, 0)
        self.assertEqual(self.coalescer.observers("k"), 0)
        late = self.coalescer.run("k", self.work)
        self.assertEqual(len(self.work.runs), 1)
        self.work.runs[0].callback("done")
        self.assertEqual(self.successResultOf(late), "done")
        self.assertNotIn("k", self.coalescer)

    def test_failure_with_no_observers_is_handled(self) -> None:
        """A failure nobody waits for is not left unhandled."""
        observer = self.coalescer.run("k", self.work)
        observer.cancel()
        self.failureResultOf(observer, CancelledError)
        run = self.work.runs.pop()
        run.errback(Boom())
        del run
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(Boom), [])
        self.assertNotIn("k", self.coalescer)

    def test_cancel_after_result(self) -> None:
        observer = self.coalescer.run("k", self.work)
        self.work.runs[0].callback("done")
        observer.cancel()
        self.assertEqual(self.successResultOf(observer), "done")

    def test_observer_callbacks_isolated(self) -> None:
        """One observer's callbacks changing its result do not reach the others."""
        first = self.coalescer.run("k", self.work)
        second = self.coalescer.run("k", self.work)
        first.addCallback(lambda _: "changed")
        self.work.runs[0].callback("done")
        self.assertEqual(self.successResultOf(first), "changed")
        self.assertEqual(self.successResultOf(second), "done")

    def test_observer_error_isolated(self) -> None:
        first = self.coalescer.run("k", self.work)
        second = self.coalescer.run("k", self.work)

        def explode(_: object) -> None:
            raise Boom("in observer")

        first.addCallback(explode)
        self.work.runs[0].callback("done")
        self.failureResultOf(first, Boom)
        self.assertEqual(self.successResultOf(second), "done")

    def test_synchronous_result(self) -> None:
        d = self.coalescer.run("k", lambda: succeed("now"))
        self.assertEqual(self.successResultOf(d), "now")
        self.assertNotIn("k", self.coalescer)

    def test_synchronous_failure(self) -> None:
        d = self.coalescer.run("k", lambda: fail(Boom()))
        self.failureResultOf(d, Boom)
        self.assertNotIn("k", self.coalescer)

    def test_coroutine_work(self) -> None:
        """Coroutine work (as L{hammal.upstream.auth} uses) runs once per key too."""
        clock = Clock()
        started: list[int] = []

        async def fetch() -> str:
            started.append(1)
            await deferLater(clock, 1.0, lambda: None)
            return "fetched"

        first = self.coalescer.run("k", fetch)
        second = self.coalescer.run("k", fetch)
        self.assertEqual(started, [1])
        clock.advance(1.0)
        self.assertEqual(
            (self.successResultOf(first), self.successResultOf(second)), ("fetched",) * 2
        )

    def test_metrics(self) -> None:
        """Each call counts as started or joined, under the coalescer's name."""

        def count(outcome: str) -> float:
            sample = metrics.REGISTRY.get_sample_value(
                "hammal_coalesced_work_total", {"work": "test-metrics", "outcome": outcome}
            )
            return sample or 0.0

        coalescer: Coalescer[str] = Coalescer(name="test-metrics")
        pending: Deferred[str] = Deferred()
        coalescer.run("k", lambda: pending)
        coalescer.run("k", lambda: pending)
        coalescer.run("other", lambda: succeed("x"))
        self.assertEqual((count("started"), count("joined")), (2.0, 1.0))

    def test_reentrant_call_from_observer(self) -> None:
        """An observer that asks again when the result arrives starts a new run."""
        again: list[Deferred[str]] = []
        first = self.coalescer.run("k", self.work)

        def ask_again(result: str) -> str:
            again.append(self.coalescer.run("k", self.work))
            return result

        first.addCallback(ask_again)
        self.work.runs[0].callback("one")
        self.assertEqual(self.successResultOf(first), "one")
        self.assertEqual(len(self.work.runs), 2)
        self.work.runs[1].callback("two")
        self.assertEqual(self.successResultOf(again[0]), "two")

    def test_work_raising_synchronously(self) -> None:
        """
        Work that raises instead of returning a failed L{Deferred} must not
        leave its key busy forever.
        """

        def broken() -> Deferred[str]:
            raise Boom("raised before returning a Deferred")

        try:
            first = self.coalescer.run("k", broken)
        except Boom:
            pass
        else:
            self.failureResultOf(first, Boom)
        self.assertNotIn("k", self.coalescer)
        second = self.coalescer.run("k", self.work)
        self.assertEqual(len(self.work.runs), 1)
        self.work.runs[0].callback("fine")
        self.assertEqual(self.successResultOf(second), "fine")


class CoalescerDeadlineTests(SynchronousTestCase):
    """Shared work never hangs its callers: a run past its deadline is given up."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.coalescer: Coalescer[str] = Coalescer(self.clock, 10.0, "the token request")
        self.work = Work()

    def test_waiters_get_504_at_the_deadline(self) -> None:
        """Every observer gets L{UpstreamTimeout} once the deadline passes."""
        observers = [self.coalescer.run("k", self.work) for _ in range(3)]
        self.clock.advance(9.9)
        for observer in observers:
            self.assertNoResult(observer)
        self.clock.advance(0.1)
        for observer in observers:
            failure = self.failureResultOf(observer, UpstreamTimeout)
            self.assertEqual(failure.value.status, 504)
            self.assertIn(
                "the token request did not finish within 10 seconds", failure.getErrorMessage()
            )

    def test_stalled_work_is_cancelled_and_forgotten(self) -> None:
        """The stalled run is cancelled and the next call starts afresh."""
        first = self.coalescer.run("k", self.work)
        self.clock.advance(10.0)
        self.failureResultOf(first, UpstreamTimeout)
        self.assertEqual(self.work.cancelled, 1)
        self.assertNotIn("k", self.coalescer)
        second = self.coalescer.run("k", self.work)
        self.assertEqual(len(self.work.runs), 2)
        self.work.runs[1].callback("recovered")
        self.assertEqual(self.successResultOf(second), "recovered")

    def test_late_result_of_a_given_up_run_goes_nowhere(self) -> None:
        """
        A run that ends after it was given up (it caught the cancellation)
        neither reaches nor disturbs the run that replaced it.
        """
        late: Deferred[None] = Deferred()

        async def stubborn() -> str:
            try:
                await Deferred()
            except CancelledError:
                await late
            return "stale"

        first = self.coalescer.run("k", lambda: Deferred.fromCoroutine(stubborn()))
        self.clock.advance(10.0)
        self.failureResultOf(first, UpstreamTimeout)
        second = self.coalescer.run("k", self.work)
        late.callback(None)  # the old run returns "stale" now
        self.assertIn("k", self.coalescer)
        self.assertNoResult(second)
        self.work.runs[0].callback("fresh")
        self.assertEqual(self.successResultOf(second), "fresh")

    def test_finished_work_cancels_its_timer(self) -> None:
        """A run that ends in time leaves no timer behind."""
        d = self.coalescer.run("k", self.work)
        self.work.runs[0].callback("done")
        self.assertEqual(self.successResultOf(d), "done")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_synchronous_work_leaves_no_timer(self) -> None:
        d = self.coalescer.run("k", lambda: succeed("now"))
        self.assertEqual(self.successResultOf(d), "now")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_deadline_counts_from_the_start_of_the_run(self) -> None:
        """A caller joining late shares the run's deadline, not a new one."""
        first = self.coalescer.run("k", self.work)
        self.clock.advance(8.0)
        late = self.coalescer.run("k", self.work)
        self.clock.advance(2.0)
        self.failureResultOf(first, UpstreamTimeout)
        self.failureResultOf(late, UpstreamTimeout)
