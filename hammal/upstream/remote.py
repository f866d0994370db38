"""
The upstream side of manifests: GETs verified against their digest and
HEADs for a tag's digest, for the manifest cache (its remote store, as in
distribution's proxy) and for pulls the cache does not take.
"""

from __future__ import annotations

from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from hammal.errors import RegistryError, UpstreamBadResponse
from hammal.headers import relayed_response_headers
from hammal.reference import Digest, Reference, upstream_name
from hammal.replies import Document, find_header, replace_header
from hammal.stream import expected_length
from hammal.upstream.client import RegistryClient, Trace, read_upstream_error
from hammal.upstream.schema1 import digested_content

#: The largest manifest or tag list hammal accepts from upstream.
MAX_DOCUMENT_SIZE = 8 * 1024 * 1024


class RemoteManifests:
    """Manifests from one upstream, through C{client}."""

    def __init__(self, client: RegistryClient, library_prefix: bool) -> None:
        self._client = client
        self._library_prefix = library_prefix

    @property
    def upstream_host(self) -> str:
        return self._client.upstream.host

    def upstream_name(self, name: str) -> str:
        """The name upstream knows C{name} by."""
        return upstream_name(name, self._library_prefix)

    async def _error(self, response: IResponse) -> RegistryError:
        return await read_upstream_error(self._client, response)

    async def fetch(
        self, upstream_name: str, reference: Reference, headers: Headers, trace: Trace
    ) -> Document:
        """GET the manifest C{reference} of C{upstream_name}, verified."""
        return await self.get(b"GET", upstream_name, reference, headers, trace, True)

    async def head_digest(
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

    async def get(
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
            document = await self.get(b"GET", name, reference, headers, trace, True)
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
