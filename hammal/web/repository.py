"""
``/v2/<name>/...``: a repository's manifests, blobs, tags and referrers.

Names contain ``/``, so this resource takes the whole tail of the path and
L{parse_route} decides what it asks for. It admits the client through the
gate, picks the pull service, and writes what comes back; the registry
logic lives in the pull service.
"""

from __future__ import annotations

from urllib.parse import urlencode

import attrs
from twisted.web.server import Request

from hammal.conditional import etag, none_match, without_conditionals
from hammal.errors import TagInvalid
from hammal.headers import upstream_request_headers
from hammal.links import rewrite_links
from hammal.reference import parse_tag
from hammal.replies import BlobReply, Document, find_header, replace_header
from hammal.web.endpoint import (
    V2Endpoint,
    header_text,
    query_text,
    realm_query,
    set_cache_status,
)
from hammal.web.gate import Admission
from hammal.web.respond import write_document, write_stream
from hammal.web.routes import Route, RouteKind, parse_route
from hammal.web.state import state_of


class RepositoryResource(V2Endpoint):
    """Everything under ``/v2/`` that names a repository."""

    def parse(self, request: Request) -> Route:
        return parse_route(request.path)

    async def serve(self, request: Request, route: Route) -> None:
        host = header_text(request, b"host")
        ns, upstream = query_text(request, b"ns"), query_text(request, b"upstream")
        admission = Admission()
        realm = realm_query(self.upstreams, ns, upstream, route.name)
        if self.gate is not None:
            admission = await self.gate.admit(request, route.name, realm)
        selection = self.upstreams.select(host, ns, upstream, route.name)
        proxy, name = selection.proxy, selection.name
        state = state_of(request)
        state.upstream = proxy.upstream_host
        state.repository = proxy.upstream_name(name)
        headers = upstream_request_headers(request.requestHeaders)
        trace = state.trace
        if admission.upstream_authorization is not None:
            if self.gate is None:
                raise RuntimeError("hammal bug: expected self.gate is not None")
            await self.gate.confirm_access(
                request,
                proxy,
                admission.upstream_authorization,
                name,
                _upstream_path(route),
                headers,
                route.name,
                realm,
            )
            headers.setRawHeaders(b"authorization", [admission.upstream_authorization])
        # Conditionals are answered here, from the digest: upstream work may
        # be shared, and a 304 meant for one client would fail the others.
        # (A blob's If-Range stays: the pull logic honours it.)
        headers.removeHeader(b"if-none-match")
        if route.kind is RouteKind.MANIFEST:
            if route.reference is None:
                raise RuntimeError("hammal bug: expected route.reference is not None")
            headers = without_conditionals(headers)
            headers.removeHeader(b"range")
            document = await proxy.manifest(request.method, name, route.reference, headers, trace)
            set_cache_status(request, document.cache_status)
            write_document(request, _conditional(request, document))
        elif route.kind is RouteKind.TAGS:
            headers = without_conditionals(headers)
            document = await proxy.tags(name, _tags_query(request), headers, trace)
            routing = [(k, v) for k, v in (("ns", ns), ("upstream", upstream)) if v is not None]
            links = rewrite_links(document.headers, route.name, routing)
            write_document(request, attrs.evolve(document, headers=links))
        elif route.kind is RouteKind.REFERRERS:
            artifact_type = query_text(request, b"artifactType")
            document = await proxy.referrers(name, route.digest, artifact_type, headers, trace)
            set_cache_status(request, document.cache_status)
            write_document(request, document)
        else:
            reply = await proxy.blob(request.method, name, route.digest, headers, trace)
            if isinstance(reply, Document):
                set_cache_status(request, reply.cache_status)
                write_document(request, reply)
            elif reply.status in (200, 206) and none_match(
                request.requestHeaders, str(route.digest)
            ):
                if reply.body is not None:
                    reply.body.stop()
                set_cache_status(request, reply.cache_status)
                write_document(request, _not_modified(str(route.digest)))
            else:
                set_cache_status(request, reply.cache_status)
                await write_stream(request, _with_etag(reply, str(route.digest)))


def _upstream_path(route: Route) -> str:
    """The upstream path that proves read access to what C{route} asks for."""
    if route.kind is RouteKind.MANIFEST:
        return f"manifests/{route.reference}"
    if route.kind is RouteKind.BLOB:
        return f"blobs/{route.reference}"
    if route.kind is RouteKind.REFERRERS:
        return f"manifests/{route.reference}"  # the subject
    return "tags/list"


def _not_modified(digest: str) -> Document:
    return Document(
        304,
        [(b"etag", [etag(digest)]), (b"docker-content-digest", [digest.encode()])],
    )


def _conditional(request: Request, document: Document) -> Document:
    """A manifest with its ``ETag``, or ``304`` when the client has it already."""
    digest = find_header(document.headers, b"docker-content-digest")
    if document.status != 200 or digest is None:
        return document
    text = digest.decode("latin-1")
    if none_match(request.requestHeaders, text):
        return _not_modified(text)
    return attrs.evolve(document, headers=replace_header(document.headers, b"etag", etag(text)))


def _with_etag(reply: BlobReply, digest: str) -> BlobReply:
    if reply.status not in (200, 206):
        return reply
    return attrs.evolve(reply, headers=replace_header(reply.headers, b"etag", etag(digest)))


def _tags_query(request: Request) -> str:
    """The validated ``n`` and ``last`` parameters of a tag-list request."""
    args = request.args or {}
    query: list[tuple[str, str]] = []
    n = args.get(b"n")
    if n:
        text = n[0].decode("latin-1")
        if not text.isdigit() or len(text) > 6:
            raise TagInvalid("n must be a non-negative integer")
        query.append(("n", text))
    last = args.get(b"last")
    if last:
        query.append(("last", parse_tag(last[0].decode("latin-1"))))
    return urlencode(query)
