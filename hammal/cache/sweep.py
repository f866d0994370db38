"""
The cache's periodic upkeep, as a service: temporaries of writers that died
are reclaimed within a minute (not only at the next start), and the
directory is brought back under C{--cache-max-size} and above the
free-space floor even when something else filled the disk. Walking the
directory happens off the event loop (C{offload}); only the decisions are
made on it.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from hammal.cache.fetch import Offload, run_here
from hammal.cache.store import BlobStore

#: Seconds between two sweeps.
SWEEP_INTERVAL = 60.0


class CacheSweep(Service):
    """Runs L{BlobStore.sweep} every C{interval} seconds while running."""

    log = Logger()

    def __init__(
        self,
        store: BlobStore,
        clock: IReactorTime,
        interval: float = SWEEP_INTERVAL,
        offload: Offload = run_here,
    ) -> None:
        self._store = store
        self._interval = interval
        self._offload = offload
        self._loop = LoopingCall(self._sweep)
        self._loop.clock = clock

    def startService(self) -> None:
        super().startService()
        # The store swept once when it opened: the first run waits a period.
        self._loop.start(self._interval, now=False)

    def stopService(self) -> None:
        if self._loop.running:
            self._loop.stop()
        return super().stopService()

    def _sweep(self) -> Deferred[Any]:
        """One sweep; the loop waits for it, and goes on whatever happened."""
        try:
            surveyed = self._offload(self._store.survey, self._store.digests())
        except Exception:
            surveyed = fail()  # the exception being handled
        surveyed.addCallback(self._store.sweep)
        surveyed.addErrback(self._failed)
        return surveyed

    def _failed(self, failure: Failure) -> None:
        self.log.failure("sweeping the cache directory failed", failure)
