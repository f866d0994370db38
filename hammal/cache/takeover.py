"""
When the process filling a blob dies, one process takes the fill over.

A reader following another process's fill (L{hammal.cache.sibling}) that
ends without the blob stored goes on, at the byte it reached, with the
fill that replaces it rather than each reader asking upstream for its own
rest: the first reader of this process to get there asks the blob cache
for the fill again, which takes the lock the kernel released (one process
of the machine wins; the others follow it), and every reader of this
process joins that one fill. A replacement that cannot start (upstream
failing, the disk full) leaves the reader to upstream, uncached, as any
local failure does.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.logger import Logger

from hammal import metrics
from hammal.cache.bypass import StartUpstream, UpstreamTail
from hammal.cache.growing import GrowingFill
from hammal.cache.storage import BlobStorage
from hammal.cache.writes import LocalCacheError
from hammal.reference import Digest
from hammal.stream import BodySource, TransferBroken


class FillingCache(Protocol):
    """What a takeover needs of the blob cache (L{hammal.cache.blobs.BlobCache})."""

    store: BlobStorage
    clock: IReactorTime
    read_timeout: float
    min_rate: int

    def body(
        self,
        digest: Digest,
        start: int,
        end: int | None,
        fetch: GrowingFill | None = None,
        start_upstream: StartUpstream | None = None,
        upstream: str = "upstream",
    ) -> BodySource:
        """A body source for bytes C{[start, end)} of a stored or filling blob."""

    def fetch(
        self, digest: Digest, start_upstream: StartUpstream, upstream: str, repository: str = ""
    ) -> tuple[GrowingFill, bool]:
        """The fill of C{digest}, joined or started."""


log = Logger()


class TakenOver:
    """
    A L{BodySource} for bytes C{[offset, end)} of C{digest}, from the fill
    that replaces one that died: delivered once that fill has started.
    """

    def __init__(
        self,
        cache: FillingCache,
        digest: Digest,
        offset: int,
        end: int | None,
        start_upstream: StartUpstream,
        upstream: str,
    ) -> None:
        self._cache = cache
        self._digest = digest
        self._offset = offset
        self._end = end
        self._start_upstream = start_upstream
        self._upstream = upstream
        self._body: BodySource | None = None
        self._stopped = False

    def deliver(self, consumer: IConsumer) -> Deferred[int]:
        return Deferred.fromCoroutine(self._deliver(consumer))

    async def _deliver(self, consumer: IConsumer) -> int:
        if self._cache.store.size(self._digest) is not None:
            # Stored meanwhile (by the fill that took over): read it.
            self._body = self._cache.body(
                self._digest, self._offset, self._end, None, self._start_upstream, self._upstream
            )
            return await self._body.deliver(consumer)
        fill, joined = self._cache.fetch(self._digest, self._start_upstream, self._upstream)
        log.info(
            "the process filling {digest} stopped: {how} at byte {offset}",
            digest=str(self._digest),
            how="following the fill that took over"
            if joined
            else "this process takes the fill over",
            offset=self._offset,
        )
        try:
            await fill.when_started()
        except LocalCacheError:
            # Not cached (upstream's refusal, any other error, is the client's answer too).
            if self._stopped:
                raise TransferBroken("the client went away")
            metrics.cache_bypasses.inc()
            self._body = UpstreamTail(
                self._start_upstream,
                self._cache.clock,
                self._cache.read_timeout,
                self._upstream,
                self._offset,
                self._end,
                self._digest,
                self._cache.min_rate,
            )
            return await self._body.deliver(consumer)
        if self._stopped:
            raise TransferBroken("the client went away")
        self._body = self._cache.body(
            self._digest, self._offset, self._end, fill, self._start_upstream, self._upstream
        )
        return await self._body.deliver(consumer)

    def stop(self) -> None:
        self._stopped = True
        if self._body is not None:
            self._body.stop()
