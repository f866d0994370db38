"""
The pull proxy: what hammal answers for manifests, blobs and tag lists,
decided from upstream's answers.

This module knows registries, not HTTP servers: it takes names, references
and the headers to send upstream, and returns L{Document}s (small bodies,
verified and held in memory) or L{BlobReply}s (a live upstream body for the
web layer to stream). Names are rewritten to upstream's (``library/``) here,
in one hop.
"""

from __future__ import annotations

from typing import Callable

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from hammal.cache.blobs import BlobCache
from hammal.cache.bypass import StartUpstream
from hammal.cache.layers import LayerKeeper
from hammal.cache.manifests import ManifestCache, accepted_types
from hammal.conditional import without_conditionals
from hammal.errors import (
    RegistryError,
    UpstreamBadResponse,
)
from hammal.headers import relayed_response_headers
from hammal.minrate import DEFAULT_MIN_RATE
from hammal.pull.referrers import Referrers, ReferrersCache
from hammal.pull.resuming import ResumingBody
from hammal.reference import Digest, Reference, upstream_name
from hammal.replies import (
    CACHE_MISS,
    CACHE_STALE,
    BlobReply,
    Document,
    find_header,
    replace_header,
)
from hammal.stream import BodySource, UpstreamBody, expected_length, not_a_blob
from hammal.upstream.client import (
    REDIRECT_STATUSES,
    RegistryClient,
    Trace,
    read_upstream_error,
)
from hammal.upstream.remote import MAX_DOCUMENT_SIZE, RemoteManifests

ManifestCacheFactory = Callable[[str, RemoteManifests], ManifestCache]
"""Builds the manifest cache for an upstream URL around its remote manifests."""


class PullService:
    """
    Answers pull requests from one upstream.

    @param blob_redirect: C{"follow"} streams blobs from wherever upstream
        redirects; C{"pass"} returns upstream's redirect to the client.
    @param resumes: how many times a blob relayed uncached is resumed with
        C{Range} when upstream breaks it mid-body (C{--retries}).
    @param min_rate: the bytes per second a blob relayed uncached must
        bring over each read-timeout window (C{--upstream-min-rate}; 0: no
        floor), as a fill's must.
    """

    log = Logger()

    def __init__(
        self,
        client: RegistryClient,
        library_prefix: bool,
        blob_redirect: str,
        clock: IReactorTime,
        blobs: BlobCache | None = None,
        manifests: ManifestCacheFactory | None = None,
        referrers: ReferrersCache | None = None,
        resumes: int = 0,
        min_rate: int = DEFAULT_MIN_RATE,
    ) -> None:
        self._client = client
        self._resumes = resumes
        self._min_rate = min_rate
        self._library_prefix = library_prefix
        self._follow_blob_redirects = blob_redirect == "follow"
        self._clock = clock
        self._remote = RemoteManifests(client, library_prefix)
        self._blobs = blobs if self._follow_blob_redirects else None
        self._layers = LayerKeeper(self._blobs.store, clock) if self._blobs is not None else None
        self._manifests = (
            manifests(client.upstream.url, self._remote) if manifests is not None else None
        )
        self._referrers = Referrers(client, self._remote.fetch, referrers)

    @property
    def client(self) -> RegistryClient:
        """The upstream this proxy pulls from."""
        return self._client

    @property
    def library_prefix(self) -> bool:
        return self._library_prefix

    @property
    def upstream_host(self) -> str:
        return self._client.upstream.host

    def upstream_name(self, name: str) -> str:
        """The name upstream knows C{name} by."""
        return upstream_name(name, self._library_prefix)

    async def _error(self, response: IResponse) -> RegistryError:
        return await read_upstream_error(self._client, response)

    async def manifest(
        self, method: bytes, name: str, reference: Reference, headers: Headers, trace: Trace
    ) -> Document:
        """
        Answer for a manifest: through the cache when the client accepts
        the types hammal caches, else straight from upstream.
        """
        accepted = accepted_types(headers.getRawHeaders(b"accept", []))
        if self._manifests is None or not accepted:
            return await self._remote.get(method, name, reference, headers, trace)
        document = await self._manifests.get(
            self.upstream_name(name), reference, accepted, headers, trace
        )
        if self._layers is not None and document.cache_status != CACHE_MISS:
            self._layers.served(
                (find_header(document.headers, b"docker-content-digest") or b"").decode("latin-1"),
                (find_header(document.headers, b"content-type") or b"").decode("latin-1"),
                document.body,
                stale=document.cache_status == CACHE_STALE,
            )
        if method == b"HEAD":
            return attrs.evolve(document, body=b"", length=len(document.body))
        return document

    async def referrers(
        self, name: str, digest: Digest, artifact_type: str | None, headers: Headers, trace: Trace
    ) -> Document:
        """The OCI 1.1 referrers index of C{digest} (see L{hammal.pull.referrers})."""
        return await self._referrers.get(
            self.upstream_name(name), digest, artifact_type, headers, trace
        )

    async def blob(
        self, method: bytes, name: str, digest: Digest, headers: Headers, trace: Trace
    ) -> BlobReply | Document:
        """
        Answer for a blob: from the cache, from a fetch in flight, or
        straight from upstream. A full C{200} body is verified against
        C{digest} while it streams.
        """
        response: IResponse | None = None
        if self._blobs is not None:
            cached = await self._cached_blob(method, name, digest, headers, trace, self._blobs)
            if isinstance(cached, BlobReply):
                return cached
            response = cached  # the cache's refused fetch, handed over (or None)
        if response is None:
            response = await self._client.request(
                method,
                self.upstream_name(name),
                f"blobs/{digest}",
                headers,
                trace,
                follow_redirects=self._follow_blob_redirects,
            )
        if response.code in REDIRECT_STATUSES and not self._follow_blob_redirects:
            await self._client.fetch_document(response, 64 * 1024)
            location = response.headers.getRawHeaders(b"location", [b""])[0]
            relayed = relayed_response_headers(response.headers)
            relayed.append((b"location", [location]))
            return Document(response.code, relayed)
        if response.code not in (200, 206):
            raise await self._error(response)
        if not_a_blob(response):
            await self._client.discard(response)
            raise UpstreamBadResponse(f"{self.upstream_host} sent a web page instead of a blob")
        relayed = relayed_response_headers(response.headers)
        relayed = replace_header(relayed, b"docker-content-digest", str(digest).encode())
        if not any(key == b"content-type" for key, _ in relayed):
            relayed.append((b"content-type", [b"application/octet-stream"]))
        if method == b"HEAD":
            announced = response.headers.getRawHeaders(b"content-length", [None])[0]
            length = int(announced) if announced and announced.isdigit() else None
            return BlobReply(response.code, relayed, length, None)
        body: BodySource
        if response.code == 200:
            body = ResumingBody(
                response,
                self._starter(name, digest, headers, trace),
                self._clock,
                self._client.read_timeout,
                digest,
                self._resumes,
                self.upstream_host,
                min_rate=self._min_rate,
            )
        else:
            body = UpstreamBody(
                response,
                self._clock,
                self._client.read_timeout,
                None,
                self.upstream_host,
                min_rate=self._min_rate,
            )
        return BlobReply(response.code, relayed, expected_length(response), body)

    def _starter(self, name: str, digest: Digest, headers: Headers, trace: Trace) -> StartUpstream:
        """
        Starts upstream requests for blob C{digest} from an offset (fills,
        resumes): the client's headers without its conditionals and range.
        """
        upstream_headers = without_conditionals(headers)
        upstream_headers.removeHeader(b"range")
        upstream_name = self.upstream_name(name)

        def start(offset: int, end: int | None = None) -> Deferred[IResponse]:
            attempt_headers = upstream_headers.copy()
            if end is not None:
                attempt_headers.setRawHeaders(b"range", [b"bytes=%d-%d" % (offset, end - 1)])
            elif offset:
                attempt_headers.setRawHeaders(b"range", [b"bytes=%d-" % offset])
            return Deferred.fromCoroutine(
                self._client.request(
                    b"GET",
                    upstream_name,
                    f"blobs/{digest}",
                    attempt_headers,
                    trace,  # resumes count against the client that started the fetch
                    follow_redirects=self._follow_blob_redirects,
                )
            )

        return start

    async def _cached_blob(
        self,
        method: bytes,
        name: str,
        digest: Digest,
        headers: Headers,
        trace: Trace,
        blobs: BlobCache,
    ) -> BlobReply | IResponse | None:
        """
        The answer through the cache (which decides hit, miss, range and
        fill), or L{None} to go straight upstream, or upstream's answer to a
        fetch the cache refused, to relay as is.
        """
        # The fill is shared: nothing of one client's request goes with it.
        start = self._starter(name, digest, headers, trace)
        layers = self._layers
        return await blobs.serve(
            method,
            digest,
            headers,
            start,
            self.upstream_host,
            self.upstream_name(name),
            stale_layer=None if layers is None else layers.named_by_stale,
        )

    async def tags(self, name: str, query: str, headers: Headers, trace: Trace) -> Document:
        """Fetch a tag list page; C{query} holds the validated C{n}/C{last}."""
        path = "tags/list" + (f"?{query}" if query else "")
        response = await self._client.request(
            b"GET", self.upstream_name(name), path, headers, trace
        )
        if response.code != 200:
            raise await self._error(response)
        body = await self._client.fetch_document(response, MAX_DOCUMENT_SIZE)
        return Document(200, relayed_response_headers(response.headers), body)
