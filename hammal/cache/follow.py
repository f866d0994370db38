"""
The common part of everything that sends a byte range of a cache file to
a client: following a transfer in flight, pausing and resuming with the
client, and ending exactly once.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from zope.interface import implementer

from hammal.stream import TransferBroken

if TYPE_CHECKING:
    from hammal.cache.fetch import BlobFetch


@implementer(IPushProducer)
class FileFollower:
    """
    Bytes C{[start, end)} of C{path} (L{None} end: to the end of the blob),
    read from a complete cache file or behind a L{BlobFetch} as it grows.
    Subclasses move the bytes in L{_pump}.

    @ivar done: fires with the byte count once the range was delivered;
        fails with the fetch's error, or L{TransferBroken} when the client
        went away.
    """

    def __init__(
        self,
        consumer: Any,
        clock: IReactorTime,
        path: str,
        start: int,
        end: int | None,
        fetch: BlobFetch | None = None,
    ) -> None:
        self.done: Deferred[int] = Deferred()
        self._consumer = consumer
        self._clock = clock
        self._path = path
        self._start = start
        self._offset = start
        self._end = end
        self._fetch = fetch
        self._fd: int | None = None
        self._paused = False
        self._stopped = False
        self._scheduled: IDelayedCall | None = None

    def begin(self) -> None:
        """Open the file, register with the consumer and start sending."""
        try:
            self._fd = os.open(self._path, os.O_RDONLY)
        except OSError as failure:
            self._finish(TransferBroken(f"cannot read the cache file: {failure.strerror}"))
            return
        self._consumer.registerProducer(self, True)
        if self._fetch is not None:
            self._fetch.subscribe(self._progress)
        self._pump()

    # IPushProducer.

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        if self._stopped or self._fd is None:
            return
        self._paused = False
        self._schedule()

    def stopProducing(self) -> None:
        """The client went away."""
        self._stopped = True
        self._finish(TransferBroken("the client went away"))

    # For subclasses.

    def _pump(self) -> None:
        raise NotImplementedError()

    def _progress(self) -> None:
        """The fetch being followed wrote more, or ended."""
        if not self._paused:
            self._schedule()

    def _schedule(self) -> None:
        if self._scheduled is None or not self._scheduled.active():
            self._scheduled = self._clock.callLater(0, self._pump)

    def _failed_fetch(self) -> bool:
        """End with the fetch's failure, if it failed."""
        if self._fetch is not None and self._fetch.failure is not None:
            self._finish(self._fetch.failure)
            return True
        return False

    def _limit(self) -> int | None:
        """How far we may read now; L{None} while nothing more is known."""
        fetch = self._fetch
        if fetch is None or fetch.complete:
            if self._end is not None:
                return self._end
            return fetch.size if fetch is not None else None
        if fetch.failure is not None:
            return None
        if self._end is not None:
            return min(self._end, fetch.readable)
        return fetch.readable

    def _delivered(self, limit: int | None) -> bool:
        if self._end is not None:
            return self._offset >= self._end
        complete = self._fetch is None or self._fetch.complete
        return complete and limit is not None and self._offset >= limit

    def _finish(self, failure: Exception | None) -> None:
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        self._scheduled = None
        if self._fetch is not None:
            self._fetch.unsubscribe(self._progress)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.done.called:
            return
        if failure is None:
            self.done.callback(self._offset - self._start)
        else:
            self.done.errback(failure)
