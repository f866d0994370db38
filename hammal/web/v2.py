"""
The ``/v2/`` resource: routing and HTTP translation for the registry API.

It parses the path, checks the method, hands the work to the
L{PullProxy}, and writes what comes back: documents whole, blobs through a
a body source with backpressure. It holds no registry logic of its own.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from hammal import metrics
from hammal.errors import RegistryError, TagInvalid, Unsupported
from hammal.upstream.client import Trace
from hammal.conditional import etag, none_match, without_conditionals
from hammal.links import rewrite_links
from hammal.replies import BlobReply, Document, find_header, replace_header
from hammal.reference import parse_tag
from hammal.web.errors import abort_client, write_error
from hammal.headers import upstream_request_headers
from hammal.upstreams import UpstreamSelector
from hammal.web.gate import Admission, Gate
from hammal.web.routes import Route, RouteKind, parse_route

API_VERSION = b"registry/2.0"


class V2Resource(Resource):
    """Everything below ``/v2``."""

    isLeaf = True
    log = Logger()

    def __init__(self, upstreams: UpstreamSelector, gate: Gate | None = None) -> None:
        super().__init__()
        self._upstreams = upstreams
        self._gate = gate

    def render(self, request: Request) -> Any:
        request.setHeader(b"docker-distribution-api-version", API_VERSION)
        work = Deferred.fromCoroutine(self._serve(request))
        request.notifyFinish().addErrback(lambda _: work.cancel())
        return NOT_DONE_YET

    async def _serve(self, request: Request) -> None:
        try:
            if self._gate is not None:
                self._gate.check_rules(request)
            route = parse_route(request.path)
            _set_route_kind(request, route.kind.value)
            if request.method not in (b"GET", b"HEAD"):
                request.setHeader(b"allow", b"GET, HEAD")
                raise Unsupported("hammal is a pull-only mirror: only GET and HEAD are allowed")
            await self._dispatch(request, route)
        except RegistryError as error:
            write_error(request, error)
        except CancelledError:
            return
        except Exception:
            self.log.failure("unexpected error serving {path}", path=request.uri[:512])
            write_error(request, RegistryError("internal error"))

    async def _dispatch(self, request: Request, route: Route) -> None:
        host = _text(request.getHeader(b"host"))
        ns, upstream = _query_text(request, b"ns"), _query_text(request, b"upstream")
        if route.kind is RouteKind.AUTH:
            if self._gate is None:
                raise Unsupported("this mirror needs no token: it runs with --auth none")
            proxy = self._upstreams.select(host, ns, upstream, "").proxy
            _write_document(request, await self._gate.token_response(request, proxy))
            return
        admission = Admission()
        realm_query = self._realm_query(ns, upstream, route)
        if self._gate is not None:
            repository = None if route.kind is RouteKind.BASE else route.name
            admission = await self._gate.admit(request, repository, realm_query)
        if route.kind is RouteKind.BASE:
            if ns is not None or upstream is not None or not self._upstreams.base_allowed(host):
                self._upstreams.select(host, ns, upstream, "")  # refuses what it must
            _write_document(request, Document(200, [(b"content-type", [b"application/json"])], b"{}"))
            return
        selection = self._upstreams.select(host, ns, upstream, route.name)
        proxy, name = selection.proxy, selection.name
        if hasattr(request, "upstream_host"):
            request.upstream_host = proxy.upstream_host
        if hasattr(request, "repository"):
            request.repository = proxy.upstream_name(name)
        headers = upstream_request_headers(request.requestHeaders)
        trace: Trace = getattr(request, "trace", None) or Trace()
        if admission.upstream_authorization is not None:
            assert self._gate is not None
            await self._gate.confirm_access(
                request,
                proxy,
                admission.upstream_authorization,
                name,
                _upstream_path(route),
                headers,
                route.name,
                realm_query,
            )
            headers.setRawHeaders(b"authorization", [admission.upstream_authorization])
        # Conditionals are answered here, from the digest: upstream work may
        # be shared, and a 304 meant for one client would fail the others.
        # (A blob's If-Range stays: the pull logic honours it.)
        headers.removeHeader(b"if-none-match")
        if route.kind is RouteKind.MANIFEST:
            assert route.reference is not None
            headers = without_conditionals(headers)
            headers.removeHeader(b"range")
            document = await proxy.manifest(request.method, name, route.reference, headers, trace)
            _set_cache_status(request, document.cache_status)
            _write_document(request, _conditional(request, document))
        elif route.kind is RouteKind.TAGS:
            headers = without_conditionals(headers)
            document = await proxy.tags(name, _tags_query(request), headers, trace)
            routing = [(k, v) for k, v in (("ns", ns), ("upstream", upstream)) if v is not None]
            links = rewrite_links(document.headers, route.name, routing)
            _write_document(request, attrs.evolve(document, headers=links))
        elif route.kind is RouteKind.REFERRERS:
            artifact_type = _query_text(request, b"artifactType")
            document = await proxy.referrers(name, route.digest, artifact_type, headers, trace)
            _set_cache_status(request, document.cache_status)
            _write_document(request, document)
        else:
            reply = await proxy.blob(request.method, name, route.digest, headers, trace)
            if isinstance(reply, Document):
                _set_cache_status(request, reply.cache_status)
                _write_document(request, reply)
            elif reply.status in (200, 206) and none_match(request.requestHeaders, str(route.digest)):
                if reply.body is not None:
                    reply.body.stop()
                _set_cache_status(request, reply.cache_status)
                _write_document(request, _not_modified(str(route.digest)))
            else:
                await self._stream(request, _with_etag(reply, str(route.digest)))

    def _realm_query(self, ns: str | None, upstream: str | None, route: Route) -> str:
        """
        The query that routes a login to the registry this request pulls
        from, for the challenge's realm: ``?ns=``/``?upstream=`` as given,
        or the registry of a path prefix.
        """
        if upstream is not None:
            return "?" + urlencode([("upstream", upstream)])
        if ns is None and route.kind is not RouteKind.BASE:
            ns = self._upstreams.registry_prefix(route.name)
        return "?" + urlencode([("ns", ns)]) if ns is not None else ""

    async def _stream(self, request: Request, reply: BlobReply) -> None:
        _start_response(request, reply.status, reply.headers, reply.length)
        _set_cache_status(request, reply.cache_status)
        if reply.body is None:
            request.finish()
            return
        request.write(b"")  # headers now: clients give up on slow ones
        try:
            await reply.body.deliver(request)
        except CancelledError:
            reply.body.stop()
            raise
        except RegistryError as error:
            request.unregisterProducer()
            if not getattr(request, "_disconnected", False):
                self.log.warn(
                    "aborting {path}: {error}", path=request.uri[:512], error=error.message
                )
                abort_client(request)
            return
        request.unregisterProducer()
        if not getattr(request, "_disconnected", False):
            request.finish()


def _set_route_kind(request: Request, kind: str) -> None:
    if hasattr(request, "route_kind"):
        request.route_kind = kind


def _upstream_path(route: Route) -> str:
    """The upstream path that proves read access to what C{route} asks for."""
    if route.kind is RouteKind.MANIFEST:
        return f"manifests/{route.reference}"
    if route.kind is RouteKind.BLOB:
        return f"blobs/{route.reference}"
    if route.kind is RouteKind.REFERRERS:
        return f"manifests/{route.reference}"  # the subject
    return "tags/list"


def _text(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value is not None else None


def _query_text(request: Request, name: bytes) -> str | None:
    values = (request.args or {}).get(name)
    return values[0].decode("latin-1") if values else None


def _set_cache_status(request: Request, status: str) -> None:
    request.setHeader(b"cache-status", status.encode())
    outcome = metrics.outcome_of(status)
    metrics.cache_responses.labels(getattr(request, "route_kind", "-"), outcome).inc()
    if hasattr(request, "cache_status"):
        request.cache_status = outcome


def _start_response(
    request: Request, status: int, headers: list[tuple[bytes, list[bytes]]], length: int | None
) -> None:
    request.setResponseCode(status)
    for name, values in headers:
        request.responseHeaders.setRawHeaders(name, values)
    if length is not None:
        request.setHeader(b"content-length", b"%d" % length)


def _write_document(request: Request, document: Document) -> None:
    if getattr(request, "_disconnected", False):
        return
    # A 304 has no body, and no length unless the 200's (RFC 9110 8.6).
    length = None if document.status == 304 else document.content_length
    _start_response(request, document.status, document.headers, length)
    if document.body:
        request.write(document.body)
    request.finish()


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
