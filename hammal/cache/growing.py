"""
What the blob cache knows of a fill in progress: L{GrowingFill}.

A fill is either this process's own upstream transfer
(L{hammal.cache.fetch.BlobFetch}) or another process's, followed through
its growing file (L{hammal.cache.sibling.SiblingFill}). The blob cache, its
readers, the status page and a cluster's peer endpoint use only what both
offer, so neither is ever taken for the other; both tell their news
through L{FillNews}.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from twisted.internet.defer import Deferred
from twisted.web.iweb import IResponse

from hammal.cache.readers import GrowingFile
from hammal.reference import Digest


class GrowingFill(GrowingFile, Protocol):
    """
    A fill that readers can follow (a L{GrowingFile}) and the blob cache can
    wait for, join and show.

    @ivar path: the file to read while it grows (the committed blob's once
        complete).
    @ivar written: bytes in the file so far.
    @ivar finished: fires once the fill ended, either way.
    """

    digest: Digest
    path: str
    written: int
    content_type: bytes
    finished: Deferred[None]

    def when_started(self) -> Deferred[Any]:
        """Fires (with the fill) once its file can be followed; fails as the fill does."""

    def take_response(self) -> IResponse | None:
        """
        Upstream's unread answer of a fill the cache refused, for one
        waiter to stream uncached; L{None} when there is none to take.
        """


class FillNews:
    """
    How a fill tells its followers: listeners called whenever it grows or
    ends, and the waiters of L{GrowingFill.when_started}. Shared by every
    kind of fill.
    """

    def __init__(self) -> None:
        self._listeners: set[Callable[[], None]] = set()
        self._start_waiters: list[Deferred[Any]] = []

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call C{listener} whenever the file grows or the fill ends."""
        self._listeners.add(listener)

    def unsubscribe(self, listener: Callable[[], None]) -> None:
        """Stop calling C{listener}."""
        self._listeners.discard(listener)

    def _notify(self) -> None:
        for listener in list(self._listeners):
            listener()

    def _wait_for_start(self) -> Deferred[Any]:
        """A waiter for L{_started_now} or L{_start_failed}."""
        d: Deferred[Any] = Deferred()
        self._start_waiters.append(d)
        return d

    def _started_now(self) -> None:
        """The file can be followed: every waiter gets the fill."""
        waiters, self._start_waiters = self._start_waiters, []
        for d in waiters:
            d.callback(self)

    def _start_failed(self, failure: Exception) -> None:
        """The fill failed before it could be followed: every waiter gets C{failure}."""
        waiters, self._start_waiters = self._start_waiters, []
        for d in waiters:
            d.errback(failure)
