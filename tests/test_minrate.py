"""
Tests for L{hammal.minrate}: the arithmetic of the minimum upstream
rate (L{RateFloor}) and its watch on a reactor clock (L{RateWatch}), on a
L{Clock}. How fills use them: C{MinimumRateTests} in L{tests.test_fetch}
(the event loop) and L{tests.test_pump} (pump threads, over real TCP).
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hammal.errors import UpstreamTimeout
from hammal.minrate import RateFloor, RateWatch


class RateFloorTests(SynchronousTestCase):
    def test_not_judged_before_the_window_ends(self) -> None:
        floor = RateFloor(100, 30, "upstream.test", now=10)
        self.assertEqual(floor.due(), 40)
        self.assertIsNone(floor.judge(39.9, 0))

    def test_short_window(self) -> None:
        floor = RateFloor(100, 30, "upstream.test", now=10, count=50)
        slow = floor.judge(40, 2999 + 50)
        self.assertIsInstance(slow, UpstreamTimeout)
        assert slow is not None
        self.assertEqual(
            slow.message,
            "upstream.test sent 2999 bytes in the last 30 s, below --upstream-min-rate 100 B/s",
        )

    def test_enough_starts_the_next_window(self) -> None:
        floor = RateFloor(100, 30, "upstream.test", now=0)
        self.assertIsNone(floor.judge(30, 3000))
        self.assertEqual(floor.due(), 60)
        slow = floor.judge(60, 3000 + 2999)
        self.assertIsNotNone(slow)

    def test_late_look_judges_the_whole_span(self) -> None:
        """Judged after more than a window, the span is what passed: 45 s need 4500 bytes."""
        floor = RateFloor(100, 30, "upstream.test", now=0)
        slow = floor.judge(45, 4499)
        assert slow is not None
        self.assertIn("sent 4499 bytes in the last 45 s", slow.message)
        self.assertIsNone(RateFloor(100, 30, "upstream.test", now=0).judge(45, 4500))

    def test_restart(self) -> None:
        floor = RateFloor(100, 30, "upstream.test", now=0)
        floor.restart(100, 7)
        self.assertEqual(floor.due(), 130)
        self.assertIsNone(floor.judge(129, 7))
        self.assertIsNotNone(floor.judge(130, 7 + 2999))

    def test_zero_judges_nothing(self) -> None:
        floor = RateFloor(0, 30, "upstream.test", now=0)
        self.assertFalse(floor.enabled)
        self.assertIsNone(floor.due())
        self.assertIsNone(floor.judge(10_000, 0))


class RateWatchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.slow: list[UpstreamTimeout] = []

    def watch(self, rate: int = 10) -> RateWatch:
        return RateWatch(self.clock, rate, 30, "upstream.test", self.slow.append)

    def test_judged_at_each_window_end(self) -> None:
        watch = self.watch()
        watch.start()
        watch.count(300)
        self.clock.advance(30)
        self.assertEqual(self.slow, [])
        watch.count(299)
        self.clock.advance(29.9)
        self.assertEqual(self.slow, [])
        self.clock.advance(0.1)
        self.assertEqual(len(self.slow), 1)
        self.assertIn("sent 299 bytes in the last 30 s", self.slow[0].message)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stopped_judges_nothing(self) -> None:
        watch = self.watch()
        watch.start()
        watch.stop()
        self.clock.advance(100)
        self.assertEqual(self.slow, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_start_again_is_a_fresh_window(self) -> None:
        watch = self.watch()
        watch.start()
        watch.count(100)
        self.clock.advance(20)
        watch.stop()
        self.clock.advance(50)
        watch.start()
        watch.count(300)  # the 100 before the stop are not this window's
        self.clock.advance(30)
        self.assertEqual(self.slow, [])
        self.clock.advance(30)
        self.assertIn("sent 0 bytes in the last 30 s", self.slow[0].message)

    def test_zero_schedules_nothing(self) -> None:
        watch = self.watch(rate=0)
        watch.start()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(1000)
        self.assertEqual(self.slow, [])
