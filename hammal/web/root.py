"""
The root of the resource tree: ``/v2`` for the registry API, ``/healthz``
for orchestrators, and a short text at ``/``.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from twisted.web.resource import Resource
from twisted.web.server import Request

from hammal.web.front import FrontPage


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


def build_root(
    v2: Resource, ready: Resource, metrics: Resource | None, front: Resource | None = None
) -> Resource:
    """
    The resource tree hammal serves; C{metrics} is left out when it has a
    listener of its own.
    """
    root = Resource()
    root.putChild(b"", front or FrontPage())
    root.putChild(b"v2", v2)
    root.putChild(b"healthz", _Text(b"ok\n"))
    root.putChild(b"readyz", ready)
    if metrics is not None:
        root.putChild(b"metrics", metrics)
    return root
