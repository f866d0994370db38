"""
``/v2/auth`` and ``/v2/token``: where clients get the tokens hammal issues
(C{--auth token}) or, with C{--auth passthrough}, log in upstream.
"""

from __future__ import annotations

from twisted.web.server import Request

from hammal.errors import Unsupported
from hammal.web.endpoint import V2Endpoint, header_text, query_text
from hammal.web.respond import write_document
from hammal.web.routes import Route, RouteKind


class TokenResource(V2Endpoint):
    """The token endpoint; the gate decides what a login gets."""

    def parse(self, request: Request) -> Route:
        return Route(RouteKind.AUTH)

    async def serve(self, request: Request, route: Route) -> None:
        if self.gate is None:
            raise Unsupported("this mirror needs no token: it runs with --auth none")
        host = header_text(request, b"host")
        ns, upstream = query_text(request, b"ns"), query_text(request, b"upstream")
        proxy = self.upstreams.select(host, ns, upstream, "").proxy
        write_document(request, await self.gate.token_response(request, proxy))
