"""
How the object store is doing, as the cluster's fills and the manifest
store see it: a store that fails is skipped (never failing a pull), with a
warning once per outage and C{hammal_object_store_failures}.
"""

from __future__ import annotations

from twisted.logger import Logger

from hammal import metrics

log = Logger()


class StoreHealth:
    """
    Counts the object store's failures and warns once per outage (the
    next success says it is back).
    """

    def __init__(self) -> None:
        self.down = False

    def failed(self, operation: str, reason: str) -> None:
        """The store failed C{operation} (read, upload)."""
        metrics.object_store_failures.labels(operation).inc()
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
