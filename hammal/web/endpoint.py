"""
What every resource under ``/v2`` shares: the API version header, the
access rules, the pull-only method check, errors written as OCI JSON, and
work cancelled when the client leaves.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from hammal import metrics
from hammal.errors import RegistryError, Unsupported
from hammal.pull.upstreams import UpstreamSelector
from hammal.web.gate import Gate
from hammal.web.respond import write_error
from hammal.web.routes import Route
from hammal.web.state import state_of

API_VERSION = b"registry/2.0"

_log = Logger(namespace="hammal.web.v2")


class V2Endpoint(Resource):
    """
    A leaf resource of the registry API. Subclasses parse their path into
    a L{Route} (L{parse}) and answer in L{serve}; raising a
    L{RegistryError} answers with it.
    """

    isLeaf = True

    def __init__(self, upstreams: UpstreamSelector, gate: Gate | None) -> None:
        super().__init__()
        self.upstreams = upstreams
        self.gate = gate

    def render(self, request: Request) -> Any:
        request.setHeader(b"docker-distribution-api-version", API_VERSION)
        work = Deferred.fromCoroutine(self._serve(request))
        request.notifyFinish().addErrback(lambda _: work.cancel())
        return NOT_DONE_YET

    async def _serve(self, request: Request) -> None:
        try:
            if self.gate is not None:
                self.gate.check_rules(request)
            route = self.parse(request)
            set_route_kind(request, route.kind.value)
            if request.method not in (b"GET", b"HEAD"):
                request.setHeader(b"allow", b"GET, HEAD")
                raise Unsupported("hammal is a pull-only mirror: only GET and HEAD are allowed")
            await self.serve(request, route)
        except RegistryError as error:
            write_error(request, error)
        except CancelledError:
            return
        except Exception:
            _log.failure("unexpected error serving {path}", path=request.uri[:512])
            write_error(request, RegistryError("internal error"))

    def parse(self, request: Request) -> Route:
        """
        What C{request}'s path asks for, validated before anything else
        happens.

        @raise RegistryError: for a path that names nothing valid.
        """
        raise NotImplementedError

    async def serve(self, request: Request, route: Route) -> None:
        """Answer C{request}: the rules and the method have been checked."""
        raise NotImplementedError


def realm_query(
    upstreams: UpstreamSelector, ns: str | None, upstream: str | None, name: str | None
) -> str:
    """
    The query that routes a login to the registry a request pulls from,
    for the challenge's realm: ``?ns=``/``?upstream=`` as given, or the
    registry of repository C{name}'s path prefix.
    """
    if upstream is not None:
        return "?" + urlencode([("upstream", upstream)])
    if ns is None and name is not None:
        ns = upstreams.registry_prefix(name)
    return "?" + urlencode([("ns", ns)]) if ns is not None else ""


def set_route_kind(request: Request, kind: str) -> None:
    """Tell the access log which route C{request} took."""
    state_of(request).route = kind


def set_cache_status(request: Request, status: str) -> None:
    """The ``Cache-Status`` header, its metric and the access log's field."""
    request.setHeader(b"cache-status", status.encode())
    outcome = metrics.outcome_of(status)
    state = state_of(request)
    metrics.labelled(metrics.cache_responses, state.route, outcome).inc()
    state.cache_status = outcome


def header_text(request: Request, name: bytes) -> str | None:
    """A request header as text."""
    value = request.getHeader(name)
    return value.decode("latin-1") if value is not None else None


def query_text(request: Request, name: bytes) -> str | None:
    """The first value of query parameter C{name}, as text."""
    values = (request.args or {}).get(name)
    return values[0].decode("latin-1") if values else None
