"""
What hammal records about one request while serving it: one typed record,
reached through L{state_of}, for the resources that fill it in and the
access log, metrics and status page that read it.
"""

from __future__ import annotations

import attrs
from twisted.python.components import Componentized
from twisted.web.server import Request

from hammal.upstream.client import Trace


@attrs.define
class RequestState:
    """
    One request's record.

    @ivar route: the route it took (``manifest``, ``blob``, ...).
    @ivar upstream: the upstream host that served it.
    @ivar repository: the repository, as named upstream.
    @ivar trace: what it cost upstream.
    @ivar cache_status: hit, miss, ... as the metrics name it.
    @ivar request_id: the id in the access log and ``X-Request-Id``.
    @ivar started_at: when it arrived (0: not counted as in flight).
    @ivar aborted_by_server: hammal dropped the connection (not the client).
    """

    route: str = "-"
    upstream: str = "-"
    repository: str = ""
    trace: Trace = attrs.Factory(Trace)
    cache_status: str = "-"
    request_id: str = ""
    started_at: float = 0.0
    aborted_by_server: bool = False


def state_of(request: Request) -> RequestState:
    """
    C{request}'s record, made on first use. A request that cannot hold
    components (a test double) gets a fresh record each time, which nobody
    reads.
    """
    # An attribute of the request: it is read several times per request,
    # and Componentized's adapter lookup showed on the cache-hit path.
    state: RequestState | None = getattr(request, "_hammal_state", None)
    if state is not None:
        return state
    if not isinstance(request, Componentized):
        return RequestState()
    state = RequestState()
    request._hammal_state = state  # type: ignore[attr-defined]
    return state


def client_gone(request: Request) -> bool:
    """
    Whether C{request}'s client has disconnected (nothing can be written).

    True also while the connection is being torn down: Twisted stops the
    transport's producer (a blob body, which then fails) before it tells
    the channel and the request that the connection was lost.
    """
    if getattr(request, "_disconnected", False):
        return True
    channel = getattr(request, "channel", None)
    transport = getattr(channel, "transport", None)
    return bool(getattr(transport, "disconnected", False))
