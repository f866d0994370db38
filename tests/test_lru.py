"""Tests for L{hammal.lru}: bounded tables drop their oldest entries."""

from __future__ import annotations

from collections import OrderedDict

from twisted.trial.unittest import SynchronousTestCase

from hammal.lru import remember, trim_oldest


class TrimTests(SynchronousTestCase):
    def test_trim_oldest(self) -> None:
        entries = OrderedDict((k, i) for i, k in enumerate("abcde"))
        self.assertEqual(trim_oldest(entries, 3), [("a", 0), ("b", 1)])
        self.assertEqual(list(entries), ["c", "d", "e"])
        self.assertEqual(trim_oldest(entries, 3), [])

    def test_remember_refreshes(self) -> None:
        """Setting a key again makes it the newest: the others go first."""
        entries: OrderedDict[str, int] = OrderedDict()
        for key in "abc":
            remember(entries, key, 1, 3)
        remember(entries, "a", 2, 3)
        self.assertEqual(remember(entries, "d", 1, 3), [("b", 1)])
        self.assertEqual(list(entries.items()), [("c", 1), ("a", 2), ("d", 1)])
