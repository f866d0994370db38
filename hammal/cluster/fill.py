"""
Where a fill's bytes come from when hammal runs as a cluster: the blob
cache's storage, the instance that holds the digest's fill lease, or
upstream.

The blob cache fills a digest through one L{hammal.cache.fetch.BlobFetch},
which asks a C{start(offset)} callable for a response to stream into the
cache file (again with the offset reached, to resume). L{ClusterFills}
gives each fill such a callable (L{ClusterSource.start}, a
L{hammal.cache.sources.ReadThroughSource} with the lease between the
storage and upstream) that tries, in order (after the lock file that picks
one process of the machine, L{hammal.cache.coordinate}):

1. the storage's other tiers (L{hammal.cache.storage.BlobStorage.read_through};
   with C{--storage s3://...} the bucket: a blob stored there was verified
   by whoever stored it, it streams from there with C{Range});
2. the fill lease (C{--redis} and C{--cluster-advertise}): if another
   instance holds it, the bytes stream from that instance's peer endpoint
   with C{Range}; while the holder cannot serve yet (or is dead and its
   lease not yet expired) the source waits and asks again, and once the
   lease is free it takes it, then asks the storage again (the holder may
   have stored the blob meanwhile);
3. upstream, with the lease held (or a local one when Redis is down). The
   storage keeps a copy of a fill that goes upstream
   (L{hammal.cache.storage.BlobStorage.keep}: S3 uploads it as it grows and
   completes the upload only after the digest matched), and the lease is
   released after that is settled, so that a peer that finds the lease
   free finds the object stored.

Redis failing never turns a pull into an error: the lease falls back to
per-instance single flight (L{hammal.cluster.lease}); nor does the storage's
bucket (L{hammal.storage.blobs}).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse

from hammal import metrics
from hammal.cache.blobs import BlobCache
from hammal.cache.bypass import StartUpstream
from hammal.cache.growing import GrowingFill
from hammal.cache.sources import ReadThroughSource
from hammal.cache.storage import BlobStorage
from hammal.cluster.lease import FillLeases, HeldElsewhere, Lease
from hammal.cluster.peer import GrowingFile, PeerClient, PeerError
from hammal.errors import DigestInvalid
from hammal.reference import Digest

log = Logger()


class ClusterFills:
    """
    The cluster's sources for the blob cache's fills (see the module).

    @param storage: the blob cache's storage.
    @param leases: the fill leases, or L{None} without a cluster.
    @param peers: the client for other instances' peer endpoints.
    @param poll: seconds between looks while another instance holds the
        lease but cannot serve (yet), or a dead holder's lease runs out.
    """

    def __init__(
        self,
        clock: IReactorTime,
        storage: BlobStorage,
        leases: FillLeases | None = None,
        peers: PeerClient | None = None,
        poll: float = 0.25,
    ) -> None:
        self.clock = clock
        self.storage = storage
        self.leases = leases
        self.peers = peers
        self.poll = poll

    def for_fill(self, digest: Digest, start_upstream: StartUpstream) -> "ClusterSource":
        """The source of one fill of C{digest}, upstream being C{start_upstream}."""
        return ClusterSource(self, digest, start_upstream)


class ClusterSource(ReadThroughSource):
    """
    The C{start(offset)} of one fill (see the module); L{attach} it to the
    fill it serves before the fill runs.
    """

    def __init__(self, cluster: ClusterFills, digest: Digest, start_upstream: StartUpstream):
        super().__init__(cluster.storage, digest, start_upstream)
        self._cluster = cluster
        self._lease: Lease | None = None

    async def elsewhere(self, offset: int) -> IResponse | None:
        """The storage's copy, else the lease holder's, else (the lease ours) the storage's."""
        response = await self.storage.read_through(self.digest, offset)
        if response is not None:
            return response
        if self._cluster.leases is not None and self._lease is None:
            response = await self._from_holder(offset)
            if response is not None:
                return response
            # Ours now: it may have been stored since we looked.
            return await self.storage.read_through(self.digest, offset)
        return None

    async def _from_holder(self, offset: int) -> IResponse | None:
        """
        The holder's bytes from C{offset}, or L{None} to go upstream: we
        hold the lease now, or the holder refuses our signature.
        """
        cluster = self._cluster
        if cluster.leases is None:
            raise RuntimeError("a holder is asked for without leases")
        digest = str(self.digest)
        while True:
            got = await cluster.leases.acquire(digest)
            if isinstance(got, Lease):
                self._lease = got
                return None
            if not isinstance(got, HeldElsewhere):
                raise RuntimeError(f"unexpected lease answer {got!r}")
            if got.holder != cluster.leases.advertise and cluster.peers is not None:
                try:
                    response = await cluster.peers.fetch(got.holder, digest, offset)
                except PeerError as e:
                    if e.status in (401, 403):
                        # Another cluster key: that instance will not serve
                        # us, however long we wait. Fetch it ourselves.
                        log.warn(
                            "peer {peer} refused our cluster signature; fetching {digest}"
                            " without it (is --cluster-key-file the same everywhere?)",
                            peer=got.holder,
                            digest=digest,
                        )
                        return None
                    log.debug(
                        "peer {peer} cannot serve {digest} yet: {error}",
                        peer=got.holder,
                        digest=digest,
                        error=str(e),
                    )
                else:
                    metrics.cluster_fill_sources.labels("peer").inc()
                    log.info(
                        "streaming {digest} from {peer} at {offset}",
                        digest=digest,
                        peer=got.holder,
                        offset=offset,
                    )
                    return response
            await deferLater(cluster.clock, cluster.poll, lambda: None)

    def kept(self, stored: bool) -> None:
        """The storage settled its copy: free the lease (peers now find the blob stored)."""
        if self._lease is not None:
            self._lease.release()


def peer_lookup(blobs: BlobCache) -> Any:
    """
    The peer endpoint's lookup over this instance's blob cache: a fill in
    flight (followed while it grows) or a stored blob, by digest.
    """

    def lookup(text: str) -> GrowingFile | None:
        try:
            digest = Digest.parse(text)
        except DigestInvalid:
            return None
        fetch = blobs.in_flight(digest)
        if fetch is not None and fetch.size is not None and fetch.written > 0:
            return _growing(fetch)
        size = blobs.store.size(digest)
        if size is None:
            return None
        return GrowingFile(blobs.store.path(digest), size, lambda: size, lambda: succeed(None))

    return lookup


def _growing(fetch: GrowingFill) -> GrowingFile:
    size = fetch.size
    if size is None:
        raise RuntimeError("a growing file is asked for before its size is known")

    def when_done() -> Deferred[None]:
        d: Deferred[None] = Deferred()

        def ended(result: object) -> object:
            if fetch.verified:
                d.callback(None)
            else:
                d.errback(Failure(fetch.failure or RuntimeError("the fill failed")))
            return result

        fetch.finished.addBoth(ended)
        return d

    def subscribe(listener: Any) -> Any:
        fetch.subscribe(listener)
        return lambda: fetch.unsubscribe(listener)

    return GrowingFile(fetch.path, size, lambda: fetch.written, when_done, subscribe)
