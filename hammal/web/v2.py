"""
The ``/v2`` resource tree of the registry API.

``/v2/`` is the base (L{BaseResource}), ``/v2/auth`` and ``/v2/token`` the
token endpoint (L{hammal.web.auth}), and every other path a repository
(L{hammal.web.repository}), whose resource parses the tail because names
contain ``/``. The resources route and translate; the pull service behind
L{UpstreamSelector} holds the registry logic, and L{hammal.web.respond}
writes every answer.
"""

from __future__ import annotations

from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request

from hammal.pull.upstreams import UpstreamSelector
from hammal.replies import Document
from hammal.web.auth import TokenResource
from hammal.web.endpoint import API_VERSION, V2Endpoint, header_text, query_text, realm_query
from hammal.web.gate import Gate
from hammal.web.repository import RepositoryResource
from hammal.web.respond import write_document
from hammal.web.routes import Route, RouteKind

__all__ = ["API_VERSION", "BaseResource", "V2Resource"]


class BaseResource(V2Endpoint):
    """``/v2/``: the API version check clients start with (and log in at)."""

    def parse(self, request: Request) -> Route:
        return Route(RouteKind.BASE)

    async def serve(self, request: Request, route: Route) -> None:
        host = header_text(request, b"host")
        ns, upstream = query_text(request, b"ns"), query_text(request, b"upstream")
        if self.gate is not None:
            await self.gate.admit(request, None, realm_query(self.upstreams, ns, upstream, None))
        if ns is not None or upstream is not None or not self.upstreams.base_allowed(host):
            self.upstreams.select(host, ns, upstream, "")  # refuses what it must
        write_document(request, Document(200, [(b"content-type", [b"application/json"])], b"{}"))


class V2Resource(Resource):
    """``/v2``: routes to the base, the token endpoint or a repository."""

    def __init__(self, upstreams: UpstreamSelector, gate: Gate | None = None) -> None:
        super().__init__()
        self._base = BaseResource(upstreams, gate)
        self._token = TokenResource(upstreams, gate)
        self._repository = RepositoryResource(upstreams, gate)

    def render(self, request: Request) -> Any:
        """``/v2`` without its slash is the base too."""
        return self._base.render(request)

    def getChild(self, path: bytes, request: Request) -> Resource:
        if not request.postpath:
            if path == b"":
                return self._base
            if path in (b"auth", b"token"):
                return self._token
        return self._repository
