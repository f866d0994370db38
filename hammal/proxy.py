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
from hammal.cache.fetch import BlobFetch, StartUpstream
from hammal.cache.layers import LayerKeeper
from hammal.cache.writes import LocalCacheError
from hammal.cache.manifests import FetchManifest, HeadDigest, ManifestCache, accepted_types
from hammal.conditional import range_applies, without_conditionals
from hammal.errors import (
    NotCachedUpstreamDown,
    RegistryError,
    UpstreamBadResponse,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from hammal.upstream.client import REDIRECT_STATUSES, RegistryClient, Trace, upstream_error
from hammal.reference import Digest, Reference, upstream_name
from hammal.upstream.schema1 import digested_content
from hammal.replies import (
    CACHE_COALESCED,
    CACHE_HIT,
    CACHE_MISS,
    CACHE_STALE,
    BlobReply,
    Document,
    HeaderList,
    find_header,
    replace_header,
)
from hammal.stream import TransferBroken, UpstreamBody, expected_length, not_a_blob
from hammal.headers import relayed_response_headers
from hammal.ranges import content_range, parse_range
from hammal.referrers import Referrers, ReferrersCache

ManifestCacheFactory = Callable[[str, FetchManifest, HeadDigest], ManifestCache]
"""Builds the manifest cache for an upstream URL around the proxy's fetchers."""

#: The largest manifest or tag list hammal accepts from upstream.
MAX_DOCUMENT_SIZE = 8 * 1024 * 1024


class PullProxy:
    """
    Answers pull requests from one upstream.

    @param blob_redirect: C{"follow"} streams blobs from wherever upstream
        redirects; C{"pass"} returns upstream's redirect to the client.
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
    ) -> None:
        self._client = client
        self._library_prefix = library_prefix
        self._follow_blob_redirects = blob_redirect == "follow"
        self._clock = clock
        self._blobs = blobs if self._follow_blob_redirects else None
        self._layers = LayerKeeper(self._blobs.store, clock) if self._blobs is not None else None
        self._manifests = (
            manifests(client.upstream.url, self._fetch_manifest, self._head_digest)
            if manifests is not None
            else None
        )
        self._referrers = Referrers(client, self._fetch_tag, referrers)

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
        try:
            body = await self._client.fetch_document(response, 64 * 1024)
        except RegistryError:
            body = b""
        return upstream_error(response, body, self.upstream_host)

    async def manifest(
        self, method: bytes, name: str, reference: Reference, headers: Headers, trace: Trace
    ) -> Document:
        """
        Answer for a manifest: through the cache when the client accepts
        the types hammal caches, else straight from upstream.
        """
        accepted = accepted_types(headers.getRawHeaders(b"accept", []))
        if self._manifests is None or not accepted:
            return await self._upstream_manifest(method, name, reference, headers, trace)
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
        """The OCI 1.1 referrers index of C{digest} (see L{hammal.referrers})."""
        return await self._referrers.get(
            self.upstream_name(name), digest, artifact_type, headers, trace
        )

    async def _fetch_tag(self, upstream_name: str, tag: str, headers: Headers, trace: Trace) -> Document:
        return await self._upstream_manifest(b"GET", upstream_name, tag, headers, trace, True)

    async def _fetch_manifest(
        self, upstream_name: str, reference: Reference, headers: Headers, trace: Trace
    ) -> Document:
        return await self._upstream_manifest(b"GET", upstream_name, reference, headers, trace, True)

    async def _head_digest(
        self, upstream_name: str, tag: str, headers: Headers, trace: Trace
    ) -> str | None:
        response = await self._client.request(
            b"HEAD", upstream_name, f"manifests/{tag}", headers, trace
        )
        if response.code != 200:
            raise await self._error(response)
        await self._client.discard(response)
        digest = response.headers.getRawHeaders(b"docker-content-digest", [None])[0]
        return digest.decode("latin-1") if digest else None

    async def _upstream_manifest(
        self,
        method: bytes,
        name: str,
        reference: Reference,
        headers: Headers,
        trace: Trace,
        name_is_upstream: bool = False,
    ) -> Document:
        """
        Fetch a manifest from upstream. The body is checked against the
        requested digest, or against upstream's ``Docker-Content-Digest``
        for a tag (for a signed schema 1 manifest: its JWS payload, as
        upstream computes it); a HEAD that upstream answers without a digest
        is completed with a GET.
        """
        if not name_is_upstream:
            name = self.upstream_name(name)
        path = f"manifests/{reference}"
        response = await self._client.request(method, name, path, headers, trace)
        if response.code != 200:
            raise await self._error(response)
        relayed = relayed_response_headers(response.headers)
        if method == b"HEAD":
            announced = response.headers.getRawHeaders(b"content-length", [None])[0]
            digest = find_header(relayed, b"docker-content-digest")
            if digest is not None and announced is not None and announced.isdigit():
                return Document(200, relayed, length=int(announced))
            document = await self._upstream_manifest(b"GET", name, reference, headers, trace, True)
            return Document(200, document.headers, length=len(document.body))
        body = await self._client.fetch_document(response, MAX_DOCUMENT_SIZE)
        announced_length = expected_length(response)
        if announced_length is not None and announced_length != len(body):
            raise UpstreamBadResponse(f"{self.upstream_host} sent a truncated manifest")
        media_type = (find_header(relayed, b"content-type") or b"").decode("latin-1")
        try:
            content = digested_content(body, media_type)
        except UpstreamBadResponse as failure:
            raise UpstreamBadResponse(f"{self.upstream_host} sent {failure.message}")
        actual = Digest.of(content)
        if isinstance(reference, Digest):
            if Digest.of(content, reference.algorithm) != reference:
                raise UpstreamBadResponse(
                    f"{self.upstream_host} sent a manifest that does not match {reference}"
                )
            actual = reference
        else:
            claimed = find_header(relayed, b"docker-content-digest")
            if claimed is not None and claimed.decode("latin-1") != str(actual):
                raise UpstreamBadResponse(
                    f"{self.upstream_host} sent a manifest whose digest is not the"
                    f" announced {claimed.decode('latin-1')[:80]}"
                )
        # A tag's body with neither a digest nor a length may have been cut
        # short by a connection close: pass it on, but never cache it.
        vouched = (
            isinstance(reference, Digest)
            or find_header(relayed, b"docker-content-digest") is not None
            or announced_length is not None
        )
        relayed = replace_header(relayed, b"docker-content-digest", str(actual).encode())
        return Document(200, relayed, body, vouched=vouched)

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
        verify = digest if response.code == 200 else None
        body = UpstreamBody(response, self._clock, self._client.read_timeout, verify, self.upstream_host)
        return BlobReply(response.code, relayed, expected_length(response), body)

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
        The answer through the cache, or L{None} to go straight upstream,
        or upstream's answer to a fetch the cache refused, to relay as is.
        """
        requested_range = headers.getRawHeaders(b"range", [None])[0]
        if not range_applies(headers, str(digest)):
            requested_range = None  # If-Range names other content: all of it
        # The fill is shared: nothing of one client's request goes with it.
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
                )
            )

        size = blobs.store.size(digest)
        if size is not None:
            blobs.store.touch(digest)
            return self._cache_reply(
                blobs,
                method,
                digest,
                size,
                requested_range,
                None,
                CACHE_HIT,
                b"application/octet-stream",
                start,
            )
        running = blobs.in_flight(digest)
        if method == b"HEAD" and (running is None or running.size is None):
            return None
        if running is None and not blobs.has_room():
            blobs.write_errors.record("blob", str(digest), "the cache disk is nearly full")
            return None
        fetch, joined = blobs.fetch(digest, start, self.upstream_host, upstream_name)
        try:
            await fetch.when_started()
        except LocalCacheError:
            # The cache cannot take it: straight from upstream, on the
            # fetch's own answer when it is what this client asked for.
            if method == b"GET" and requested_range is None:
                return fetch.take_response()
            return None
        except (UpstreamUnavailable, UpstreamTimeout) as failure:
            stale_layer = self._layers is not None and self._layers.named_by_stale(digest)
            if not stale_layer or isinstance(failure, TransferBroken):
                raise
            # The client was given a stale manifest: say what is missing.
            raise NotCachedUpstreamDown(
                f"layer {digest} of a manifest served stale is not in this mirror's cache,"
                f" and {self.upstream_host} cannot serve it now ({failure.message})",
                detail={"digest": str(digest)},
                headers={"Retry-After": "30"},
            )
        return self._cache_reply(
            blobs,
            method,
            digest,
            fetch.size,
            requested_range,
            fetch,
            CACHE_COALESCED if joined else CACHE_MISS,
            fetch.content_type,
            start,
        )

    def _cache_reply(
        self,
        blobs: BlobCache,
        method: bytes,
        digest: Digest,
        size: int | None,
        requested_range: bytes | None,
        fetch: BlobFetch | None,
        cache_status: str,
        content_type: bytes,
        start_upstream: StartUpstream | None = None,
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
            else blobs.body(digest, start, end, fetch, start_upstream, self.upstream_host)
        )
        return BlobReply(status, headers, length, body, cache_status)

    async def tags(self, name: str, query: str, headers: Headers, trace: Trace) -> Document:
        """Fetch a tag list page; C{query} holds the validated C{n}/C{last}."""
        path = "tags/list" + (f"?{query}" if query else "")
        response = await self._client.request(b"GET", self.upstream_name(name), path, headers, trace)
        if response.code != 200:
            raise await self._error(response)
        body = await self._client.fetch_document(response, MAX_DOCUMENT_SIZE)
        return Document(200, relayed_response_headers(response.headers), body)
