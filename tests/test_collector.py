"""L{hammal.collector}: the garbage collector's settings while hammal runs."""

from __future__ import annotations

import gc

from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from hammal.collector import THRESHOLDS, CollectorTuning


class CollectorTuningTests(SynchronousTestCase):
    def setUp(self) -> None:
        before = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *before)

    def test_thresholds_while_running_restored_after(self) -> None:
        before = gc.get_threshold()
        service = CollectorTuning(MemoryReactor())
        service.startService()
        self.assertEqual(gc.get_threshold(), THRESHOLDS)
        service.stopService()
        self.assertEqual(gc.get_threshold(), before)

    def test_freezes_start_up_once_the_reactor_runs(self) -> None:
        reactor = MemoryReactor()
        service = CollectorTuning(reactor)
        service.startService()
        self.addCleanup(gc.unfreeze)
        self.assertEqual(gc.get_freeze_count(), 0)  # not before the reactor runs
        for hook in reactor.whenRunningHooks:
            hook[0](*hook[1], **hook[2])
        self.assertGreater(gc.get_freeze_count(), 0)
        service.stopService()
        self.assertEqual(gc.get_freeze_count(), 0)

    def test_nothing_frozen_when_stopped_before_the_reactor_ran(self) -> None:
        reactor = MemoryReactor()
        service = CollectorTuning(reactor)
        service.startService()
        service.stopService()
        for hook in reactor.whenRunningHooks:
            hook[0](*hook[1], **hook[2])
        self.assertEqual(gc.get_freeze_count(), 0)
