"""
The root of the resource tree: ``/v2`` for the registry API, ``/healthz``
for orchestrators, and a short text at ``/``.
"""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from twisted.web.resource import Resource
from twisted.web.server import Request

from hammal.access.rules import AccessRules
from hammal.errors import NotFound, RegistryError, Unsupported
from hammal.web.forwarded import forwarding_headers
from hammal.web.front import FrontPage
from hammal.web.respond import error_body


class _Text(Resource):
    isLeaf = True

    def __init__(self, body: bytes, content_type: bytes = b"text/plain; charset=utf-8") -> None:
        super().__init__()
        self._body = body
        self._content_type = content_type

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", self._content_type)
        request.setHeader(b"cache-control", b"no-store")
        return self._body

    render_HEAD = render_GET


class MetricsResource(Resource):
    """``/metrics``: hammal's Prometheus registry, rendered on request."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self._registry)


class _ReadOnly(Resource):
    """
    Guards a GET/HEAD-only leaf: other methods get an OCI-style JSON 405
    instead of twisted.web's HTML page.
    """

    isLeaf = True

    def __init__(self, wrapped: Resource) -> None:
        super().__init__()
        self._wrapped = wrapped

    def render(self, request: Request) -> Any:
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return _error_page(request, Unsupported("only GET and HEAD are allowed here"))
        return self._wrapped.render(request)


class _Root(Resource):
    """The root: unknown paths get a JSON 404, not twisted.web's HTML."""

    def getChild(self, path: bytes, request: Request) -> Resource:
        return _Missing()


class _Missing(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        return _error_page(request, NotFound("no such page on this mirror"))


def _error_page(request: Request, error: RegistryError) -> bytes:
    body = error_body(error)
    request.setResponseCode(error.status)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    request.setHeader(b"content-length", b"%d" % len(body))
    return body


Guard = Callable[[Request], None]
"""Refuses a request by raising L{RegistryError} (a L{Denied}), else returns."""


class _Guarded(Resource):
    """A leaf served only to requests its guard lets through."""

    isLeaf = True

    def __init__(self, wrapped: Resource, guard: Guard) -> None:
        super().__init__()
        self._wrapped = wrapped
        self._guard = guard

    def render(self, request: Request) -> Any:
        try:
            self._guard(request)
        except RegistryError as error:
            return _error_page(request, error)
        return self._wrapped.render(request)


def address_guard(rules: AccessRules) -> Guard:
    """A L{Guard} applying the address rules of C{rules}."""

    def guard(request: Request) -> None:
        peer = str(getattr(request.getClientAddress(), "host", ""))
        rules.check_address(peer, forwarding_headers(request))

    return guard


def build_root(
    v2: Resource,
    ready: Resource,
    metrics: Resource | None,
    front: Resource | None = None,
    guard: Guard | None = None,
) -> Resource:
    """
    The resource tree hammal serves; C{metrics} is left out when it has a
    listener of its own. C{guard} (the C{--allow-ip}/C{--deny-ip} rules)
    keeps C{/readyz} and C{/metrics} from clients who may not pull;
    C{/healthz} says nothing but "ok" and stays open to every prober.
    """

    def guarded(resource: Resource) -> Resource:
        return resource if guard is None else _Guarded(resource, guard)

    root = _Root()
    root.putChild(b"", _ReadOnly(front or FrontPage()))
    root.putChild(b"v2", v2)
    root.putChild(b"healthz", _ReadOnly(_Text(b"ok\n")))
    root.putChild(b"readyz", _ReadOnly(guarded(ready)))
    if metrics is not None:
        root.putChild(b"metrics", _ReadOnly(guarded(metrics)))
    return root
