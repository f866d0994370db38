"""
Where a fill's bytes come from: L{hammal.cache.blobs.BlobCache.fill_sources}.

Without fill sources every fill goes upstream. L{ReadThrough} gives each
fill a source that asks the cache's storage first
(L{hammal.cache.storage.BlobStorage.read_through}: a tier beyond the local
directory, such as an S3 bucket, may hold the blob) and, only when the
blob is nowhere, goes upstream while the storage keeps a copy of the fill
(L{hammal.cache.storage.BlobStorage.keep}). In a cluster
(L{hammal.cluster.fill.ClusterFills}) the same source also looks for the
instance that holds the digest's fill lease before going upstream.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse

from hammal import metrics
from hammal.cache.bypass import StartUpstream
from hammal.cache.growing import GrowingFill
from hammal.cache.storage import BlobStorage
from hammal.reference import Digest

log = Logger()


class FillSource(Protocol):
    """Where one fill gets its bytes."""

    def start(self, offset: int, end: int | None = None) -> Deferred[IResponse]:
        """The blob's bytes from C{offset}: what the fill streams in (a L{StartUpstream})."""

    def attach(self, fetch: GrowingFill) -> None:
        """C{fetch} is the fill this source serves (called before it runs)."""


class FillSources(Protocol):
    """Gives each fill its L{FillSource}."""

    def for_fill(self, digest: Digest, start_upstream: StartUpstream) -> FillSource:
        """The source of a new fill of C{digest}; upstream is C{start_upstream}."""


class ReadThrough:
    """L{FillSources}: the storage's other tiers first, then upstream (see the module)."""

    def __init__(self, storage: BlobStorage) -> None:
        self.storage = storage

    def for_fill(self, digest: Digest, start_upstream: StartUpstream) -> "ReadThroughSource":
        """The source of one fill of C{digest}, upstream being C{start_upstream}."""
        return ReadThroughSource(self.storage, digest, start_upstream)


class ReadThroughSource:
    """
    The C{start(offset)} of one fill: the storage's copy while it has one,
    else upstream (from then on, resumes too) while the storage keeps the
    fill. L{attach} it to the fill before the fill runs.

    Subclasses look in more places before upstream (L{elsewhere}) and act
    once the storage settled its copy (L{kept}).
    """

    def __init__(self, storage: BlobStorage, digest: Digest, start_upstream: StartUpstream):
        self.storage = storage
        self.digest = digest
        self._upstream = start_upstream
        self._fetch: GrowingFill | None = None
        self._upstream_chosen = False
        self._keeping: Deferred[bool] | None = None

    def attach(self, fetch: GrowingFill) -> None:
        """Watch C{fetch}: when it ends and the storage settled its copy, call L{kept}."""
        self._fetch = fetch
        fetch.finished.addBoth(self._fill_ended)

    def start(self, offset: int, end: int | None = None) -> Deferred[IResponse]:
        """A response with the blob's bytes from C{offset}, from the best source."""
        if end is not None:  # a ranged read of its own: not a fill
            return Deferred.fromCoroutine(self._ranged(offset, end))
        return Deferred.fromCoroutine(self._start(offset))

    async def _ranged(self, offset: int, end: int) -> IResponse:
        return await self._upstream(offset, end)

    async def _start(self, offset: int) -> IResponse:
        if not self._upstream_chosen:
            response = await self.elsewhere(offset)
            if response is not None:
                return response
            self._upstream_chosen = True
            self._keep()
        metrics.cluster_fill_sources.labels("upstream").inc()
        return await self._upstream(offset)

    async def elsewhere(self, offset: int) -> IResponse | None:
        """The blob's bytes from C{offset} from anywhere but upstream, or L{None}."""
        return await self.storage.read_through(self.digest, offset)

    def kept(self, stored: bool) -> None:
        """The fill ended and the storage's copy is settled (C{stored}: kept)."""

    def _keep(self) -> None:
        if self._fetch is None or self._keeping is not None:
            return
        self._keeping = self.storage.keep(self._fetch)

    def _fill_ended(self, result: object) -> object:
        keeping = self._keeping if self._keeping is not None else succeed(False)
        keeping.addCallback(self.kept).addErrback(_log_failure)
        return result


def _log_failure(failure: Failure) -> None:
    log.failure("ending a fill's sources failed", failure)
