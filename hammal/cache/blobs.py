"""
The pull-through blob cache: hits from disk, misses through one shared
L{BlobFetch} per digest, each client reading at its own pace.
"""

from __future__ import annotations

from typing import Callable

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from hammal import metrics
from hammal.cache.bypass import UpstreamTail
from hammal.cache.coordinate import LockFileCoordinator, hold_lease
from hammal.cache.fetch import BlobFetch, Offload, StartUpstream, run_here
from hammal.cache.growing import GrowingFill
from hammal.cache.pump import BodyPumps
from hammal.cache.readers import BlobReader, Bypass, FileSender, tcp_transport
from hammal.cache.sibling import SiblingFill
from hammal.cache.sources import FillSources
from hammal.cache.storage import BlobStorage
from hammal.cache.takeover import TakenOver
from hammal.cache.writes import LocalCacheError, WriteErrors
from hammal.conditional import range_applies
from hammal.errors import NotCachedUpstreamDown, UpstreamTimeout, UpstreamUnavailable
from hammal.minrate import DEFAULT_MIN_RATE
from hammal.ranges import content_range, parse_range
from hammal.reference import Digest
from hammal.replies import CACHE_COALESCED, CACHE_HIT, CACHE_MISS, BlobReply, HeaderList
from hammal.stream import BodySource, TransferBroken


@attrs.define(eq=False)
class Transfer:
    """
    A blob transfer in flight, as the status page shows it.

    @ivar clients: the addresses of the clients following it now.
    """

    fetch: GrowingFill
    upstream: str
    repository: str
    clients: list[str] = attrs.Factory(list)


def _client_of(consumer: IConsumer) -> str:
    """The peer address of the request a body goes to, if it is one."""
    get_address = getattr(consumer, "getClientAddress", None)
    address = get_address() if get_address is not None else None
    return str(getattr(address, "host", "-"))


class CachedBody:
    """
    A L{hammal.stream.BodySource} reading C{[start, end)} of a cached blob,
    or of a fetch in progress. The blob is pinned against eviction while it
    is read. Given C{start_upstream}, a cache that fails locally (the file
    gone, unreadable, or the fetch unable to write it) is bypassed: the rest
    comes from upstream.
    """

    def __init__(
        self,
        cache: BlobCache,
        digest: Digest,
        start: int,
        end: int | None,
        fetch: GrowingFill | None,
        start_upstream: StartUpstream | None = None,
        upstream: str = "upstream",
    ) -> None:
        self._cache = cache
        self._digest = digest
        self._start = start
        self._end = end
        self._fetch = fetch
        self._start_upstream = start_upstream
        self._upstream = upstream
        self._reader: BlobReader | FileSender | None = None

    def _bypass(self) -> Bypass | None:
        start_upstream = self._start_upstream
        if start_upstream is None:
            return None

        def bypass(offset: int, end: int | None) -> BodySource:
            if isinstance(self._fetch, SiblingFill) and self._cache.coordinator is not None:
                # The other process's fill died: one fill takes over (hammal.cache.takeover).
                return TakenOver(
                    self._cache, self._digest, offset, end, start_upstream, self._upstream
                )
            metrics.cache_bypasses.inc()
            return UpstreamTail(
                start_upstream,
                self._cache.clock,
                self._cache.read_timeout,
                self._upstream,
                offset,
                end,
                self._digest,
                self._cache.min_rate,
            )

        return bypass

    def deliver(self, consumer: IConsumer) -> Deferred[int]:
        store = self._cache.store
        if self._fetch is not None and self._fetch.complete:
            self._fetch = None  # committed already: read the stored blob
        path = self._fetch.path if self._fetch is not None else store.path(self._digest)
        transport = tcp_transport(consumer) if self._cache.use_sendfile else None
        reader: BlobReader | FileSender
        if self._end is not None and transport is not None:
            reader = FileSender(
                consumer,
                transport,
                self._cache.clock,
                path,
                self._start,
                self._end,
                self._fetch,
                self._bypass(),
            )
        else:
            reader = BlobReader(
                consumer,
                self._cache.clock,
                path,
                self._start,
                self._end,
                self._fetch,
                self._cache.chunk_size,
                self._bypass(),
            )
        self._reader = reader
        store.pin(self._digest)
        self._cache.readers += 1
        following = self._fetch
        client = _client_of(consumer)
        if following is not None:
            self._cache.attach(following, client)

        def release(result: object) -> object:
            store.unpin(self._digest)
            self._cache.readers -= 1
            if following is not None:
                self._cache.detach(following, client)
            return result

        reader.done.addBoth(release)
        reader.begin()
        return reader.done

    def stop(self) -> None:
        if self._reader is not None:
            self._reader.stopProducing()


class BlobCache:
    """
    Coordinates the storage of committed blobs (a
    L{hammal.cache.storage.BlobStorage}: which one, it never knows) and the
    fills in flight.

    @ivar fetches_started: upstream fetches begun (for tests and metrics).
    """

    log = Logger()

    def __init__(
        self,
        store: BlobStorage,
        clock: IReactorTime,
        read_timeout: float,
        resumes: int,
        chunk_size: int = 256 * 1024,
        offload: Offload = run_here,
        deadline: float | None = None,
        write_errors: WriteErrors | None = None,
        hold_tail: bool = True,
        coordinator: LockFileCoordinator | None = None,
        hash_offload: Offload | None = None,
        pumps: BodyPumps | None = None,
        min_rate: int = DEFAULT_MIN_RATE,
    ) -> None:
        self.store = store
        #: Shares fills with the other processes of the cache directory.
        self.coordinator = coordinator
        self.clock = clock
        self.chunk_size = chunk_size
        self.read_timeout = read_timeout
        self.write_errors = write_errors if write_errors is not None else WriteErrors(clock)
        self._read_timeout = read_timeout
        self._resumes = resumes
        self._offload = offload
        self._deadline = deadline
        #: Whether a fill's last chunk waits for the digest (see BlobFetch).
        self.hold_tail = hold_tail
        #: Where a fill that does not hold its tail hashes (see BlobFetch).
        self._hash_offload = hash_offload
        #: Where fills read long upstream bodies off the event loop (see BlobFetch).
        self._pumps = pumps
        #: Bytes per second a fill's upstream body must bring (see BlobFetch),
        #: and a bypass's (L{UpstreamTail}).
        self.min_rate = min_rate
        self._fetches: dict[str, GrowingFill] = {}
        self._transfers: dict[GrowingFill, Transfer] = {}
        self.fetches_started = 0
        self.readers = 0
        #: Where fills get their bytes besides upstream (the storage's
        #: other tiers, a cluster's peers: L{hammal.cache.sources});
        #: L{None}: straight upstream.
        self.fill_sources: FillSources | None = None
        #: Cache hits on plain TCP go out with os.sendfile.
        self.use_sendfile = True

    def has_room(self) -> bool:
        """Whether the disk has space for new transfers (above the free-space floor)."""
        return self.store.has_room()

    def in_flight(self, digest: Digest) -> GrowingFill | None:
        """The running fetch of C{digest}, if any."""
        fetch = self._fetches.get(str(digest))
        if fetch is None or fetch.failure is not None or fetch.complete:
            return None
        return fetch

    def fetch(
        self, digest: Digest, start_upstream: StartUpstream, upstream: str, repository: str = ""
    ) -> tuple[GrowingFill, bool]:
        """
        The fetch of C{digest}: the one in flight (C{True}: joined) or a new
        one started now (C{False}). A fetch runs to its end whoever leaves.
        C{repository} is only for the status page.
        """
        running = self.in_flight(digest)
        if running is not None:
            return running, True
        # One process of this machine fills a blob (the lock file); the
        # others follow its file. The one that fills asks the cluster, if
        # any, where the bytes come from.
        lease = None
        if self.coordinator is not None:
            lease = self.coordinator.try_acquire(digest)
            if lease is None:
                return self._follow_sibling(digest, upstream, repository), True
        source = None
        if self.fill_sources is not None:
            source = self.fill_sources.for_fill(digest, start_upstream)
            start_upstream = source.start
        fetch = BlobFetch(
            digest,
            self.store,
            self.clock,
            start_upstream,
            self._read_timeout,
            self._resumes,
            upstream,
            self._offload,
            self._deadline,
            self.write_errors,
            hold_tail=self.hold_tail,
            hash_offload=self._hash_offload,
            pumps=self._pumps,
            min_rate=self.min_rate,
        )
        key = str(digest)
        self._fetches[key] = fetch
        self._transfers[fetch] = Transfer(fetch, upstream, repository)
        self.fetches_started += 1
        metrics.blob_fetches.inc()

        def forget(_: object) -> None:
            self._transfers.pop(fetch, None)
            if self._fetches.get(key) is fetch:
                del self._fetches[key]

        fetch.finished.addBoth(forget)
        if lease is not None:
            hold_lease(fetch, lease)
        if source is not None:
            source.attach(fetch)
        Deferred.fromCoroutine(fetch.run())
        return fetch, False

    def _follow_sibling(self, digest: Digest, upstream: str, repository: str) -> SiblingFill:
        """Another process fills C{digest}: follow its file instead of going upstream."""
        if self.coordinator is None:
            raise RuntimeError("a sibling fill is followed without a coordinator")
        sibling = SiblingFill(
            digest,
            self.store,
            self.coordinator.current_holder,
            self.clock,
            stall=self._deadline if self._deadline is not None else 4 * self._read_timeout,
        )
        key = str(digest)
        self._fetches[key] = sibling
        self._transfers[sibling] = Transfer(sibling, upstream, repository)
        metrics.sibling_fills.inc()

        def forget(_: object) -> None:
            self._transfers.pop(sibling, None)
            if self._fetches.get(key) is sibling:
                del self._fetches[key]

        sibling.finished.addBoth(forget)
        sibling.start()
        return sibling

    def attach(self, fetch: GrowingFill, client: str) -> None:
        """C{client} follows C{fetch} (for the status page)."""
        transfer = self._transfers.get(fetch)
        if transfer is not None:
            transfer.clients.append(client)

    def detach(self, fetch: GrowingFill, client: str) -> None:
        """C{client} no longer follows C{fetch}."""
        transfer = self._transfers.get(fetch)
        if transfer is not None and client in transfer.clients:
            transfer.clients.remove(client)

    def transfers(self) -> list[Transfer]:
        """The upstream transfers in flight now, oldest first."""
        return list(self._transfers.values())

    def body(
        self,
        digest: Digest,
        start: int,
        end: int | None,
        fetch: GrowingFill | None = None,
        start_upstream: StartUpstream | None = None,
        upstream: str = "upstream",
    ) -> CachedBody:
        """
        A body source for bytes C{[start, end)}, going on from upstream
        through C{start_upstream} if the cache fails locally.
        """
        return CachedBody(self, digest, start, end, fetch, start_upstream, upstream)

    async def serve(
        self,
        method: bytes,
        digest: Digest,
        headers: Headers,
        start: StartUpstream,
        upstream_host: str,
        upstream_name: str,
        stale_layer: Callable[[Digest], bool] | None = None,
    ) -> BlobReply | IResponse | None:
        """
        Answer a client's request for blob C{digest}: a hit from disk, a
        miss or a join of the fetch in flight, the range the client asked
        for (C{headers}' C{Range} and C{If-Range}). L{None} means "go
        straight upstream"; an L{IResponse} is upstream's answer to a fetch
        the cache refused, to relay as is.

        @param start: starts the upstream request for bytes from an offset.
        @param stale_layer: whether a manifest served stale names C{digest}
            (a failed fetch then says what is missing).
        """
        requested_range = headers.getRawHeaders(b"range", [None])[0]
        if not range_applies(headers, str(digest)):
            requested_range = None  # If-Range names other content: all of it
        size = self.store.size(digest)
        if size is not None:
            self.store.touch(digest)
            return self._reply(
                method,
                digest,
                size,
                requested_range,
                None,
                CACHE_HIT,
                b"application/octet-stream",
                start,
                upstream_host,
            )
        running = self.in_flight(digest)
        if method == b"HEAD" and (running is None or running.size is None):
            return None
        if running is None and not self.has_room():
            self.write_errors.record("blob", str(digest), "the cache disk is nearly full")
            return None
        fetch, joined = self.fetch(digest, start, upstream_host, upstream_name)
        try:
            await fetch.when_started()
        except LocalCacheError:
            # The cache cannot take it: straight from upstream, on the
            # fetch's own answer when it is what this client asked for.
            if method == b"GET" and requested_range is None:
                return fetch.take_response()
            return None
        except (UpstreamUnavailable, UpstreamTimeout) as failure:
            named_stale = stale_layer is not None and stale_layer(digest)
            if not named_stale or isinstance(failure, TransferBroken):
                raise
            # The client was given a stale manifest: say what is missing.
            raise NotCachedUpstreamDown(
                f"layer {digest} of a manifest served stale is not in this mirror's cache,"
                f" and {upstream_host} cannot serve it now ({failure.message})",
                detail={"digest": str(digest)},
                headers={"Retry-After": "30"},
            )
        return self._reply(
            method,
            digest,
            fetch.size,
            requested_range,
            fetch,
            CACHE_COALESCED if joined else CACHE_MISS,
            fetch.content_type,
            start,
            upstream_host,
        )

    def _reply(
        self,
        method: bytes,
        digest: Digest,
        size: int | None,
        requested_range: bytes | None,
        fetch: GrowingFill | None,
        cache_status: str,
        content_type: bytes,
        start_upstream: StartUpstream | None = None,
        upstream_host: str = "upstream",
    ) -> BlobReply:
        headers: HeaderList = [
            (b"content-type", [content_type]),
            (b"docker-content-digest", [str(digest).encode()]),
            (b"accept-ranges", [b"bytes"]),
        ]
        status, start, end = 200, 0, size
        if size is not None:
            selected = parse_range(requested_range, size)
            if selected is not None:
                status, (start, end) = 206, selected
                headers.append((b"content-range", [content_range(start, end, size)]))
        length = None if end is None else end - start
        body = (
            None
            if method == b"HEAD"
            else self.body(digest, start, end, fetch, start_upstream, upstream_host)
        )
        return BlobReply(status, headers, length, body, cache_status)
