"""L{hammal.turns}: queued calls run a bounded number per reactor turn."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hammal.turns import TurnQueue, turn_queue


def one_turn(clock: Clock) -> None:
    """Run the calls due now, as one reactor turn would: not those they add."""
    due = [call for call in clock.getDelayedCalls() if call.getTime() <= clock.seconds()]
    for call in due:
        clock.calls.remove(call)
        call.called = 1
        call.func(*call.args, **call.kw)


class TurnQueueTests(SynchronousTestCase):
    def test_bounded_per_turn_in_order(self) -> None:
        clock = Clock()
        queue = TurnQueue(clock, per_turn=3)
        ran: list[int] = []
        for index in range(7):
            queue.call(lambda index=index: ran.append(index))
        self.assertEqual(ran, [])  # nothing in the caller's turn
        one_turn(clock)
        self.assertEqual(ran, [0, 1, 2])
        one_turn(clock)
        self.assertEqual(ran, [0, 1, 2, 3, 4, 5])
        one_turn(clock)
        self.assertEqual(ran, list(range(7)))
        self.assertEqual(clock.getDelayedCalls(), [])  # idle once empty

    def test_cancelled_calls_do_not_run_or_count(self) -> None:
        clock = Clock()
        queue = TurnQueue(clock, per_turn=2)
        ran: list[str] = []
        first = queue.call(lambda: ran.append("a"))
        queue.call(lambda: ran.append("b"))
        queue.call(lambda: ran.append("c"))
        self.assertTrue(first.active())
        first.cancel()
        self.assertFalse(first.active())
        one_turn(clock)
        self.assertEqual(ran, ["b", "c"])

    def test_call_queued_by_a_call_runs_in_a_later_turn(self) -> None:
        clock = Clock()
        queue = TurnQueue(clock, per_turn=10)
        ran: list[str] = []

        def again() -> None:
            ran.append("first")
            queue.call(lambda: ran.append("second"))

        queue.call(again)
        one_turn(clock)
        self.assertEqual(ran, ["first"])
        one_turn(clock)
        self.assertEqual(ran, ["first", "second"])

    def test_ran_call_is_inactive(self) -> None:
        clock = Clock()
        call = TurnQueue(clock).call(lambda: None)
        clock.advance(0)
        self.assertFalse(call.active())
        call.cancel()  # harmless

    def test_failing_call_leaves_the_rest_queued(self) -> None:
        clock = Clock()
        queue = TurnQueue(clock, per_turn=5)
        ran: list[str] = []

        def boom() -> None:
            raise ValueError("boom")

        queue.call(boom)
        queue.call(lambda: ran.append("after"))
        self.assertRaises(ValueError, one_turn, clock)
        one_turn(clock)
        self.assertEqual(ran, ["after"])

    def test_one_queue_per_clock(self) -> None:
        clock = Clock()
        self.assertIs(turn_queue(clock), turn_queue(clock))
        self.assertIsNot(turn_queue(clock), turn_queue(Clock()))


class CancelledTurnTests(SynchronousTestCase):
    def test_queue_recovers_when_its_turn_was_cancelled(self) -> None:
        """A reactor clean-up that cancels the pending turn does not wedge the queue."""
        clock = Clock()
        queue = TurnQueue(clock)
        ran: list[str] = []
        queue.call(lambda: ran.append("dropped"))
        for call in clock.getDelayedCalls():
            call.cancel()
        queue.call(lambda: ran.append("later"))
        clock.advance(0)
        self.assertEqual(ran, ["dropped", "later"])
