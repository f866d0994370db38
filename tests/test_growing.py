"""
Tests for L{hammal.cache.growing}: how every kind of fill tells its news
(L{FillNews}), and that the blob cache holds a fill of another process as
what it is, not as a local fetch.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from hammal.cache.fetch import BlobFetch
from hammal.cache.growing import FillNews
from hammal.cache.sibling import SiblingFill
from hammal.errors import RegistryError


class FillNewsTests(SynchronousTestCase):
    def test_listeners(self) -> None:
        """Listeners hear every piece of news until they unsubscribe; twice is once."""
        news = FillNews()
        heard: list[str] = []

        def listener() -> None:
            heard.append("a")

        news.subscribe(listener)
        news.subscribe(listener)
        news._notify()
        news.unsubscribe(listener)
        news._notify()
        news.unsubscribe(listener)  # no error
        self.assertEqual(heard, ["a"])

    def test_listener_leaving_while_told(self) -> None:
        """A listener that unsubscribes another while being told does not break the round."""
        news = FillNews()
        heard: list[str] = []

        def first() -> None:
            heard.append("first")
            news.unsubscribe(second)

        def second() -> None:
            heard.append("second")

        news.subscribe(first)
        news.subscribe(second)
        news._notify()  # this round was told to both, whoever went first
        news._notify()
        self.assertEqual(heard.count("first"), 2)
        self.assertEqual(heard.count("second"), 1)

    def test_start_waiters_get_the_fill_once(self) -> None:
        """Waiters fire with the fill when it starts; a later start fires nothing again."""
        news = FillNews()
        one, two = news._wait_for_start(), news._wait_for_start()
        news._started_now()
        self.assertIs(self.successResultOf(one), news)
        self.assertIs(self.successResultOf(two), news)
        news._start_failed(RegistryError("late"))  # nobody waits: nothing happens
        three = news._wait_for_start()
        news._started_now()
        self.assertIs(self.successResultOf(three), news)

    def test_start_failure_reaches_every_waiter(self) -> None:
        news = FillNews()
        one, two = news._wait_for_start(), news._wait_for_start()
        news._start_failed(RegistryError("upstream is down"))
        self.assertEqual(self.failureResultOf(one, RegistryError).value.message, "upstream is down")
        self.failureResultOf(two, RegistryError)

    def test_both_fills_tell_it_the_same_way(self) -> None:
        """A local fetch and a sibling's fill share the one implementation (no copy)."""
        self.assertTrue(issubclass(BlobFetch, FillNews))
        self.assertTrue(issubclass(SiblingFill, FillNews))
        for kind in (BlobFetch, SiblingFill):
            for name in ("subscribe", "unsubscribe", "_notify"):
                self.assertNotIn(name, vars(kind), f"{kind.__name__} repeats {name}")
