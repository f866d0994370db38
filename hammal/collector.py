"""
Python's cyclic garbage collector, tuned for a server with thousands of
long-lived connections.

With the default thresholds (700, 10, 10) the collector runs a young
collection every 700 allocations and a full one each time the long-lived
objects grew by a quarter. Thousands of clients arriving together (each
connection holds ~100 objects: channel, request, headers, producers)
trigger full collections one after another while they arrive, each walking
every object of the process, the modules and functions of start-up
included: 1.4-1.9 s of pauses in the benchmark's 3,000-reader row, with
single collections of 200-700 ms on the event loop.

L{CollectorTuning} moves everything alive once the reactor runs (modules,
classes, the app) out of the collector's sight (C{gc.freeze}) and collects
young objects less often, so that fewer objects survive into the older
generations and full collections become rare.
"""

from __future__ import annotations

import gc
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger

#: Allocations (less deallocations) between young collections; older
#: generations every 20 and 10 of those. Python's default is (700, 10, 10).
THRESHOLDS = (50_000, 20, 10)

log = Logger()


class CollectorTuning(Service):
    """Sets L{THRESHOLDS} while running; freezes what start-up left once the reactor runs."""

    def __init__(self, reactor: Any, thresholds: tuple[int, int, int] = THRESHOLDS) -> None:
        self._reactor = reactor
        self._thresholds = thresholds
        self._previous: tuple[int, int, int] | None = None
        self._frozen = False

    def startService(self) -> None:
        super().startService()
        self._previous = gc.get_threshold()
        gc.set_threshold(*self._thresholds)
        self._reactor.callWhenRunning(self._freeze)

    def _freeze(self) -> None:
        if not self.running:
            return
        gc.collect()
        gc.freeze()
        self._frozen = True
        log.debug("{count} objects of start-up frozen", count=gc.get_freeze_count())

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            gc.set_threshold(*self._previous)
            self._previous = None
        if self._frozen:
            gc.unfreeze()
            self._frozen = False
