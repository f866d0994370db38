"""
OCI 1.1 referrers: ``GET /v2/<name>/referrers/<digest>[?artifactType=T]``.

The answer is an image index listing the manifests (signatures, SBOMs,
attestations) whose ``subject`` is C{digest}. hammal asks upstream's
referrers API; where upstream has none (a ``404``, as from Distribution 2.8)
it reads the referrers tag schema instead, the ``<alg>-<hex>`` tag holding
such an index that clients of registries without the API push themselves.
Either way the client gets the API's answer: ``200`` with an index, empty
when nothing refers to the digest, filtered by ``artifactType`` with
``OCI-Filters-Applied`` saying so.

Answers are kept like a tag: trusted for the manifest TTL, then asked
again, and served stale (for up to C{stale_if_error}) when upstream fails.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any, Awaitable, Callable
from urllib.parse import urlencode

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from hammal.coalesce import Coalescer
from hammal.errors import (
    TooManyRequests,
    UpstreamBadResponse,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from hammal.reference import Digest
from hammal.replies import (
    CACHE_COALESCED,
    CACHE_HIT,
    CACHE_MISS,
    CACHE_STALE,
    STALE_WARNING,
    Document,
)
from hammal.upstream.client import RegistryClient, Trace, upstream_error

OCI_INDEX = "application/vnd.oci.image.index.v1+json"

#: The largest referrers index hammal accepts from upstream.
MAX_INDEX_SIZE = 4 * 1024 * 1024

_TRANSIENT = (UpstreamUnavailable, UpstreamTimeout, TooManyRequests)

FetchTag = Callable[[str, str, Headers, Trace], Awaitable[Document]]
"""Fetches a manifest by tag from upstream: (upstream name, tag, headers, trace)."""


def fallback_tag(digest: Digest) -> str:
    """The referrers tag schema's tag for C{digest}: ``sha256-<hex>``."""
    return f"{digest.algorithm}-{digest.hex}"


def referrers_index(descriptors: list[dict[str, Any]]) -> bytes:
    """An OCI image index of C{descriptors}, as the API answers."""
    document = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}
    return json.dumps(document, separators=(",", ":")).encode()


def _descriptors(body: bytes, where: str) -> list[dict[str, Any]]:
    try:
        document = json.loads(body)
    except ValueError:
        raise UpstreamBadResponse(f"{where} sent a referrers index that is not JSON")
    manifests = document.get("manifests") if isinstance(document, dict) else None
    if manifests is None:
        manifests = []
    if not isinstance(manifests, list) or not all(isinstance(d, dict) for d in manifests):
        raise UpstreamBadResponse(f"{where} sent a referrers index without a manifests list")
    return manifests


def _answer(descriptors: list[dict[str, Any]], artifact_type: str | None) -> Document:
    headers: list[tuple[bytes, list[bytes]]] = [(b"content-type", [OCI_INDEX.encode()])]
    if artifact_type is not None:
        descriptors = [d for d in descriptors if d.get("artifactType") == artifact_type]
        headers.append((b"oci-filters-applied", [b"artifactType"]))
    return Document(200, headers, referrers_index(descriptors))


@attrs.frozen
class _Entry:
    document: Document
    fetched_at: float


class ReferrersCache:
    """
    Referrers answers in memory, least recently used out first, bounded by
    their total size.
    """

    def __init__(
        self,
        clock: IReactorTime,
        ttl: float = 300.0,
        stale_if_error: float = 86400.0,
        max_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        self.clock = clock
        self.ttl = ttl
        self.stale_if_error = stale_if_error
        self._max_bytes = max_bytes
        self._bytes = 0
        self._entries: OrderedDict[tuple[str, ...], _Entry] = OrderedDict()
        self.work: Coalescer[Document] = Coalescer(name="referrers")

    def get(self, key: tuple[str, ...]) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: tuple[str, ...], document: Document) -> None:
        self._drop(key)
        self._entries[key] = _Entry(document, self.clock.seconds())
        self._bytes += len(document.body)
        while self._bytes > self._max_bytes and self._entries:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: tuple[str, ...]) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= len(entry.document.body)


class Referrers:
    """
    Referrers answers for one upstream.

    @param fetch_tag: fetches the fallback tag's index (through hammal's
        manifest path, so it is verified like any manifest).
    @param cache: where answers are kept; L{None} asks upstream every time.
    """

    log = Logger()

    def __init__(
        self,
        client: RegistryClient,
        fetch_tag: FetchTag,
        cache: ReferrersCache | None = None,
    ) -> None:
        self._client = client
        self._fetch_tag = fetch_tag
        self._cache = cache

    async def get(
        self,
        name: str,
        digest: Digest,
        artifact_type: str | None,
        headers: Headers,
        trace: Trace,
    ) -> Document:
        """The referrers of C{digest} in upstream repository C{name}."""
        cache = self._cache
        if cache is None:
            return await self._fetch(name, digest, artifact_type, headers, trace)
        key = (self._client.upstream.url, name, str(digest), artifact_type or "")
        entry = cache.get(key)
        age = cache.clock.seconds() - entry.fetched_at if entry is not None else 0.0
        if entry is not None and age < cache.ttl:
            return attrs.evolve(entry.document, cache_status=CACHE_HIT)
        joined = key in cache.work
        try:
            document = await cache.work.run(
                key,
                lambda: self._fetch_and_keep(key, name, digest, artifact_type, headers, trace),
            )
        except _TRANSIENT as failure:
            if entry is None or age >= cache.ttl + cache.stale_if_error:
                raise
            self.log.warn(
                "serving stale referrers of {digest} ({age:.0f}s old): {error}",
                digest=str(digest),
                age=age,
                error=failure.message,
            )
            return attrs.evolve(
                entry.document,
                headers=entry.document.headers + [(b"warning", [STALE_WARNING])],
                cache_status=CACHE_STALE,
            )
        return attrs.evolve(document, cache_status=CACHE_COALESCED if joined else CACHE_MISS)

    async def _fetch_and_keep(
        self,
        key: tuple[str, ...],
        name: str,
        digest: Digest,
        artifact_type: str | None,
        headers: Headers,
        trace: Trace,
    ) -> Document:
        document = await self._fetch(name, digest, artifact_type, headers, trace)
        if self._cache is None:
            raise RuntimeError("hammal bug: expected self._cache is not None")
        self._cache.put(key, document)
        return document

    async def _fetch(
        self,
        name: str,
        digest: Digest,
        artifact_type: str | None,
        headers: Headers,
        trace: Trace,
    ) -> Document:
        where = self._client.upstream.host
        path = f"referrers/{digest}"
        if artifact_type is not None:
            path += "?" + urlencode({"artifactType": artifact_type})
        asked = headers.copy()
        asked.setRawHeaders(b"accept", [OCI_INDEX.encode()])
        asked.removeHeader(b"range")
        response = await self._client.request(b"GET", name, path, asked, trace)
        body = await self._client.fetch_document(response, MAX_INDEX_SIZE)
        if response.code == 200:
            # Filtered here whether or not upstream did: the same answer either way.
            return _answer(_descriptors(body, where), artifact_type)
        if response.code != 404:
            raise upstream_error(response, body, where)
        return await self._from_tag_schema(name, digest, artifact_type, headers, trace)

    async def _from_tag_schema(
        self,
        name: str,
        digest: Digest,
        artifact_type: str | None,
        headers: Headers,
        trace: Trace,
    ) -> Document:
        """Upstream has no referrers API: read the ``<alg>-<hex>`` tag's index."""
        asked = headers.copy()
        asked.setRawHeaders(b"accept", [OCI_INDEX.encode()])
        asked.removeHeader(b"range")
        try:
            index = await self._fetch_tag(name, fallback_tag(digest), asked, trace)
        except UpstreamError as failure:
            if failure.status == 404:
                return _answer([], artifact_type)
            raise
        return _answer(_descriptors(index.body, self._client.upstream.host), artifact_type)
