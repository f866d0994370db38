"""
Following a fill that another process of this machine runs.

When another process sharing the cache directory holds a digest's fill
(L{hammal.cache.coordinate}), this one does not go upstream: a
L{SiblingFill} follows the holder's growing temporary file, polling its
size every L{POLL_INTERVAL} seconds. Like a local
L{hammal.cache.fetch.BlobFetch} it is a L{hammal.cache.growing.GrowingFill}
(and tells its news through the same L{hammal.cache.growing.FillNews}),
so the blob cache and the existing followers (C{pread} or C{sendfile})
serve it unchanged.

The last byte is held back until the blob is in the store (the holder
commits only what it verified), so no client sees a blob complete that
was not verified. The temporary file is held open and read through
C{/proc/self/fd}: the holder renaming it into the store, or removing it,
does not take it from under the readers. When the holder goes without
committing (its fill failed, or the process died), the fill fails as a
I{local} one: every reader goes on at the byte it reached with the one
fill that takes over (L{hammal.cache.takeover}), exact bytes.
"""

from __future__ import annotations

import os
from typing import Callable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IResponse

from hammal.cache.coordinate import FillHolder
from hammal.cache.growing import FillNews
from hammal.cache.storage import BlobStorage
from hammal.cache.writes import LocalCacheError
from hammal.errors import RegistryError, UpstreamTimeout
from hammal.reference import Digest

#: Seconds between two looks at the holder's file.
POLL_INTERVAL = 0.02

HolderLookup = Callable[[Digest], "FillHolder | None"]
"""Who fills a digest now (answered at once), or L{None}."""


class SiblingFill(FillNews):
    """
    A fill run by another process, seen through its growing file.

    @param holder: who fills the digest (L{LockFileCoordinator.current_holder}).
    @param stall: seconds without news (no announcement, no growth) after
        which the followers give up with a timeout.
    """

    log = Logger()

    def __init__(
        self,
        digest: Digest,
        store: BlobStorage,
        holder: HolderLookup,
        clock: IReactorTime,
        stall: float,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self.digest = digest
        self.store = store
        self._holder = holder
        self._clock = clock
        self._stall = stall
        self._poll_interval = poll_interval
        self.size: int | None = None
        self.written = 0
        self.readable = 0
        self.verified = False
        self.complete = False
        self.failure: RegistryError | None = None
        self.content_type = b"application/octet-stream"
        self.path = ""
        self._where = ""
        self.upstream_requests = 0
        self._fd: int | None = None
        FillNews.__init__(self)
        self._call: IDelayedCall | None = None
        self._news_at = clock.seconds()
        self.finished: Deferred[None] = Deferred()

    # What readers and the blob cache use (a GrowingFill).

    @property
    def sendable(self) -> int:
        """What readers may take: the file holds all of it (no bytes in memory here)."""
        return self.readable

    def buffered(self, offset: int, limit: int) -> memoryview | None:
        """Nothing is held in memory: every byte comes from the file."""
        return None

    def when_started(self) -> Deferred[SiblingFill]:
        """Fires once the holder's file can be followed (or the blob is stored)."""
        if self._fd is not None or self.complete:
            return succeed(self)
        if self.failure is not None:
            return fail(self.failure)
        return self._wait_for_start()

    def take_response(self) -> IResponse | None:
        """Nothing to hand over: the upstream answer is the holder's."""
        return None

    # Following.

    def start(self) -> None:
        """Look at once, then every poll interval until the fill ends."""
        self._look()

    def _look(self) -> None:
        self._call = None
        try:
            ended = self._step()
        except OSError as failure:
            self._fail(
                LocalCacheError(f"cannot follow the fill of another process: {failure.strerror}")
            )
            return
        if not ended:
            self._call = self._clock.callLater(self._poll_interval, self._look)

    def _step(self) -> bool:
        """One look; C{True} once the fill ended (either way)."""
        if self._stored():
            return True
        holder = self._holder(self.digest)
        if holder is None:
            # Gone: committed just now (renamed before the lock went), or not.
            if self._stored():
                return True
            self._fail(LocalCacheError("the process filling it stopped before the blob was stored"))
            return True
        if holder.where is not None and self._fd is None:
            try:
                self._fd = os.open(holder.where, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return False  # renamed into the store or removed: the next look tells
            self._where = holder.where
            self.path = f"/proc/self/fd/{self._fd}"
            self.size = holder.size
            self.content_type = holder.content_type
            self._news_at = self._clock.seconds()
            self._grew()
            self._started_now()
        elif self._fd is not None:
            self._grew()
        if self._clock.seconds() - self._news_at > self._stall:
            self._fail(
                UpstreamTimeout(
                    f"the fill of {self.digest} by another process made no progress"
                    f" for {self._stall:g} seconds"
                )
            )
            return True
        return False

    def _grew(self) -> None:
        if self._fd is None:
            raise RuntimeError("a sibling's file grew before it was opened")
        written = os.fstat(self._fd).st_size
        if written == self.written:
            return
        self.written = written
        self._news_at = self._clock.seconds()
        # The last byte only once verified (stored): see the module.
        last = self.size if self.size is not None else written
        self.readable = max(self.readable, min(written, last - 1))
        self._notify()

    def _stored(self) -> bool:
        size = self.store.size(self.digest)
        if size is None:
            return False
        self.size = self.written = self.readable = size
        self.verified = self.complete = True
        if self._fd is None:
            self.path = self.store.path(self.digest)
        self._started_now()
        self._notify()
        self._end()
        return True

    def _fail(self, failure: RegistryError) -> None:
        self.failure = failure
        self._start_failed(failure)
        self._notify()
        self._end()

    def _end(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if not self.finished.called:
            self.finished.callback(None)
        # Readers opened their own descriptors (through /proc/self/fd) already.
        self._clock.callLater(0, self._close)

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            # Never the descriptor's number again: it may name another file now.
            self.path = self.store.path(self.digest) if self.complete else self._where
