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

import attrs
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from hammal.errors import RegistryError, UpstreamBadResponse
from hammal.registry.client import REDIRECT_STATUSES, Trace, UpstreamClient, upstream_error
from hammal.registry.reference import Digest, Reference, upstream_name
from hammal.stream import expected_length
from hammal.web.headers import relayed_response_headers

#: The largest manifest or tag list hammal accepts from upstream.
MAX_DOCUMENT_SIZE = 8 * 1024 * 1024

HeaderList = list[tuple[bytes, list[bytes]]]


@attrs.frozen
class Document:
    """A complete small response: status, headers and body."""

    status: int
    headers: HeaderList
    body: bytes = b""
    length: int | None = None

    @property
    def content_length(self) -> int:
        return self.length if self.length is not None else len(self.body)


@attrs.frozen
class BlobReply:
    """
    A blob response whose body is still upstream.

    @ivar response: the live upstream response, or L{None} for HEAD.
    @ivar verify: the digest to check the body against (full bodies only).
    """

    status: int
    headers: HeaderList
    length: int | None
    response: IResponse | None
    verify: Digest | None


def _header(headers: HeaderList, name: bytes) -> bytes | None:
    for key, values in headers:
        if key == name and values:
            return values[0]
    return None


def _set_header(headers: HeaderList, name: bytes, value: bytes) -> HeaderList:
    return [(key, values) for key, values in headers if key != name] + [(name, [value])]


class PullProxy:
    """
    Answers pull requests from one upstream.

    @param blob_redirect: C{"follow"} streams blobs from wherever upstream
        redirects; C{"pass"} returns upstream's redirect to the client.
    """

    log = Logger()

    def __init__(self, client: UpstreamClient, library_prefix: bool, blob_redirect: str) -> None:
        self._client = client
        self._library_prefix = library_prefix
        self._follow_blob_redirects = blob_redirect == "follow"

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
        Fetch a manifest. The body is checked against the requested digest,
        or against upstream's ``Docker-Content-Digest`` for a tag; a HEAD
        that upstream answers without a digest is completed with a GET.
        """
        path = f"manifests/{reference}"
        response = await self._client.request(method, self.upstream_name(name), path, headers, trace)
        if response.code != 200:
            raise await self._error(response)
        relayed = relayed_response_headers(response.headers)
        if method == b"HEAD":
            announced = response.headers.getRawHeaders(b"content-length", [None])[0]
            digest = _header(relayed, b"docker-content-digest")
            if digest is not None and announced is not None and announced.isdigit():
                return Document(200, relayed, length=int(announced))
            document = await self.manifest(b"GET", name, reference, headers, trace)
            return Document(200, document.headers, length=len(document.body))
        body = await self._client.fetch_document(response, MAX_DOCUMENT_SIZE)
        announced_length = expected_length(response)
        if announced_length is not None and announced_length != len(body):
            raise UpstreamBadResponse(f"{self.upstream_host} sent a truncated manifest")
        actual = Digest.of(body)
        if isinstance(reference, Digest):
            if Digest.of(body, reference.algorithm) != reference:
                raise UpstreamBadResponse(
                    f"{self.upstream_host} sent a manifest that does not match {reference}"
                )
            actual = reference
        else:
            claimed = _header(relayed, b"docker-content-digest")
            if claimed is not None and claimed.decode("latin-1") != str(actual):
                raise UpstreamBadResponse(
                    f"{self.upstream_host} sent a manifest whose digest is not the"
                    f" announced {claimed.decode('latin-1')[:80]}"
                )
        relayed = _set_header(relayed, b"docker-content-digest", str(actual).encode())
        return Document(200, relayed, body)

    async def blob(
        self, method: bytes, name: str, digest: Digest, headers: Headers, trace: Trace
    ) -> BlobReply | Document:
        """
        Start fetching a blob. A full C{200} body is verified against
        C{digest} while it streams; a C{206} is relayed as upstream sent it.
        """
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
        relayed = relayed_response_headers(response.headers)
        relayed = _set_header(relayed, b"docker-content-digest", str(digest).encode())
        if not any(key == b"content-type" for key, _ in relayed):
            relayed.append((b"content-type", [b"application/octet-stream"]))
        if method == b"HEAD":
            announced = response.headers.getRawHeaders(b"content-length", [None])[0]
            length = int(announced) if announced and announced.isdigit() else None
            return BlobReply(response.code, relayed, length, None, None)
        length = expected_length(response)
        verify = digest if response.code == 200 else None
        return BlobReply(response.code, relayed, length, response, verify)

    async def tags(self, name: str, query: str, headers: Headers, trace: Trace) -> Document:
        """Fetch a tag list page; C{query} holds the validated C{n}/C{last}."""
        path = "tags/list" + (f"?{query}" if query else "")
        response = await self._client.request(b"GET", self.upstream_name(name), path, headers, trace)
        if response.code != 200:
            raise await self._error(response)
        body = await self._client.fetch_document(response, MAX_DOCUMENT_SIZE)
        return Document(200, relayed_response_headers(response.headers), body)
