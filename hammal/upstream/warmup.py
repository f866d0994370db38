"""
Each configured upstream is asked ``/v2/`` once when hammal starts, as
Distribution's pull-through cache does: the first cold pull then finds the
upstream's challenge known and a pooled connection, and goes straight to
the token realm instead of meeting a ``401`` first (see
L{hammal.upstream.client.UpstreamClient.warm_up}).
"""

from __future__ import annotations

from typing import Protocol, Sequence

from twisted.application.service import Service
from twisted.internet.defer import Deferred

__all__ = ["UpstreamWarmUp"]


class _WarmsUp(Protocol):
    async def warm_up(self) -> None: ...


class UpstreamWarmUp(Service):
    """
    Warms up C{clients} once when started; stopping cancels what still
    runs (each warm-up is bounded by its client's deadline anyway).
    """

    name = "upstream-warm-up"

    def __init__(self, clients: Sequence[_WarmsUp]) -> None:
        self._clients = list(clients)
        self._running: list[Deferred[None]] = []

    def startService(self) -> None:
        super().startService()
        for client in self._clients:
            d = Deferred.fromCoroutine(client.warm_up())
            self._running.append(d)
            d.addBoth(self._ended, d)

    def _ended(self, result: object, d: Deferred[None]) -> None:
        if d in self._running:
            self._running.remove(d)

    def stopService(self) -> None:
        super().stopService()
        for d in list(self._running):
            d.cancel()
