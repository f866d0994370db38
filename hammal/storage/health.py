"""
How the object store is doing, as the cluster's fills and the manifest
store see it: a store that fails is skipped (never failing a pull), with a
warning once per outage and C{hammal_object_store_failures}.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from hammal import metrics

log = Logger()


class StoreHealth:
    """
    Counts the object store's failures and warns once per outage (the
    next success says it is back). After a failure, reads leave the store
    alone for C{retry_after} seconds, so that a store that hangs does not
    hold every pull up for its timeout.
    """

    def __init__(self, clock: IReactorTime, retry_after: float = 5.0) -> None:
        self.down = False
        self._clock = clock
        self._retry_after = retry_after
        self._skip_until = 0.0

    def usable(self) -> bool:
        """Whether to ask the store now (not within C{retry_after} of a failure)."""
        return self._clock.seconds() >= self._skip_until

    def failed(self, operation: str, reason: str) -> None:
        """The store failed C{operation} (read, upload)."""
        metrics.object_store_failures.labels(operation).inc()
        self._skip_until = self._clock.seconds() + self._retry_after
        if not self.down:
            self.down = True
            log.warn(
                "the object store failed ({operation}: {reason}); caching locally only",
                operation=operation,
                reason=reason,
            )

    def answered(self) -> None:
        """The store answered a request."""
        if self.down:
            self.down = False
            log.info("the object store answers again")
