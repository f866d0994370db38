"""
The HTTP site: a request type that carries what the access log reports,
and one access-log event per request, finished or aborted.
"""

from __future__ import annotations

import io
import itertools
import re
import secrets
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from hammal import metrics
from hammal.classpoll import ARRIVING, INTERACTIVE, classify
from hammal.status.recorder import StatusRecorder
from hammal.web.forwarded import Forwarded, ForwardedHeaders
from hammal.web.state import state_of

#: Module-level so that its namespace stays "hammal.access" (a Logger on a
#: class takes the class's name).
_access_log = Logger(namespace="hammal.access")

#: The largest request body accepted (token requests are the only bodies).
MAX_REQUEST_BODY = 64 * 1024

_BODY_TOO_LARGE = (
    b"HTTP/1.1 413 Content Too Large\r\nContent-Type: application/json\r\n"
    b"Connection: close\r\nContent-Length: 90\r\n\r\n"
    b'{"errors":[{"code":"SIZE_INVALID","message":"request bodies are limited to 65536 bytes"}]}'
)

_ID_PREFIX = secrets.token_hex(4)
_ID_COUNTER = itertools.count()


def _new_request_id() -> str:
    """A unique id: a random per-process prefix and a counter (no syscall)."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFFFF:08x}"


_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")


class HammalRequest(Request):
    """
    A request that remembers when it started, which route it took and what
    it cost upstream.
    """

    clock: IReactorTime | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._access_logged = False
        self._body_bytes = 0
        self._body_refused = False
        self.forwarded: Forwarded | None = None

    def gotLength(self, length: int | None) -> None:
        """
        Request bodies stay in memory and small: a pull-only registry needs
        none, and twisted.web would spool large ones to a temporary file.
        """
        self.content = io.BytesIO()
        self._body_bytes = 0
        if length is not None and length > MAX_REQUEST_BODY:
            self._refuse_body()

    def handleContentChunk(self, data: bytes) -> None:
        self._body_bytes += len(data)
        if self._body_bytes > MAX_REQUEST_BODY:
            self._refuse_body()
            return
        if self.content is None:
            raise RuntimeError("hammal bug: expected self.content is not None")
        self.content.write(data)

    def _refuse_body(self) -> None:
        """Answer 413 at once and drop the connection: no body is read or kept."""
        if self._body_refused:
            return
        self._body_refused = True
        transport = self.channel.transport if self.channel is not None else None
        if transport is not None:
            transport.write(_BODY_TOO_LARGE)
            transport.loseConnection()

    def process(self) -> None:
        state = state_of(self)
        if self.clock is not None:
            state.started_at = self.clock.seconds()
        given = (self.getHeader(b"x-request-id") or b"").decode("latin-1")
        state.request_id = given if _REQUEST_ID.match(given) else _new_request_id()
        self.setHeader(b"x-request-id", state.request_id.encode())
        metrics.in_flight_requests.inc()
        site = getattr(self.channel, "site", None)
        if isinstance(site, HammalSite):
            site.active_requests += 1
            if site.forwarded is not None:
                self.forwarded = site.forwarded.apply(self)
        super().process()

    def isSecure(self) -> bool:
        """The scheme the client used: a trusted proxy's word, else the transport's."""
        if self.forwarded is not None and self.forwarded.scheme is not None:
            return self.forwarded.scheme == "https"
        return bool(super().isSecure())

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        site = getattr(self.channel, "site", None) or getattr(self, "site", None)
        if isinstance(site, HammalSite):
            site.log_access(self, aborted=True)


#: nginx's status for a request whose client closed the connection first.
CLIENT_CLOSED_REQUEST = 499


def _limited_channel(
    max_headers: int | None, max_header_bytes: int | None
) -> type[http.HTTPChannel]:
    """
    An L{http.HTTPChannel} with this site's request header limits (L{None}:
    Twisted's own), so that the limits stay with the site rather than
    changing every channel in the process.
    """

    class _LimitedChannel(http.HTTPChannel):
        _arriving = False

        def connectionMade(self) -> None:
            super().connectionMade()
            # Until its first response is done, behind the connections
            # already answered (hammal.classpoll).
            self._arriving = classify(self.transport, ARRIVING)

        def requestDone(self, request: http.Request) -> None:
            super().requestDone(request)
            if self._arriving:
                self._arriving = False
                classify(self.transport, INTERACTIVE)

    if max_headers is not None:
        _LimitedChannel.maxHeaders = max_headers
    if max_header_bytes is not None:
        _LimitedChannel.totalHeadersSize = max_header_bytes
    return _LimitedChannel


class HammalSite(Site):
    """
    A L{Site} that writes structured access-log events.

    @ivar status: told of every finished request, for the status page.
    """

    status: StatusRecorder | None = None

    def __init__(
        self,
        resource: IResource,
        clock: IReactorTime,
        forwarded: ForwardedHeaders | None = None,
        max_headers: int | None = None,
        max_header_bytes: int | None = None,
        **kwargs: Any,
    ) -> None:
        # Connection timeouts on the same clock as everything else (tests
        # drive a Clock; production passes the reactor).
        kwargs.setdefault("reactor", clock)
        super().__init__(resource, **kwargs)
        self._channel = _limited_channel(max_headers, max_header_bytes)
        self.forwarded = forwarded
        self.noisy = False
        self.active_requests = 0
        self._clock = clock

        class _ClockedRequest(HammalRequest):
            pass

        _ClockedRequest.clock = clock
        self.requestFactory = _ClockedRequest

    def protocol(self) -> Any:
        """
        Twisted's HTTP/1.1-or-HTTP/2 protocol around this site's limited
        channel (Twisted's own factory always builds a plain L{http.HTTPChannel}).
        """
        return http._GenericHTTPChannelProtocol(self._channel())

    def log(self, request: http.Request) -> None:
        """Called by twisted.web as a request finishes."""
        self.log_access(request, aborted=False)

    def log_access(self, request: http.Request, aborted: bool) -> None:
        """Emit the access-log event for C{request}, once."""
        if not isinstance(request, HammalRequest) or request._access_logged:
            return
        request._access_logged = True
        state = state_of(request)
        if state.started_at:
            metrics.in_flight_requests.dec()
            self.active_requests -= 1
        duration = self._clock.seconds() - state.started_at if state.started_at else 0.0
        route = state.route
        status = request.code
        if aborted and not state.aborted_by_server:
            status = CLIENT_CLOSED_REQUEST  # not the 200 it would have been
        metrics.labelled(metrics.requests, route, str(status)).inc()
        metrics.labelled(metrics.response_bytes, route).inc(request.sentLength)
        metrics.labelled(metrics.request_duration, route).observe(duration)
        if self.status is not None:
            self.status.request_finished(
                route,
                request.method.decode("latin-1"),
                request.code,
                request.sentLength,
                state.cache_status,
                state.upstream,
                state.repository,
            )
        client = _client_address(request)
        method = _printable(request.method.decode("latin-1"))
        path = _printable(request.uri.decode("latin-1")[:1024])
        # The line is built here, once: a one-field format keeps twisted's
        # formatter cheap (it was a third of a cached request's cost); the
        # fields are still in the event for JSON logs.
        line = (
            f'{client} "{method} {path}" {status} {request.sentLength}'
            f" {duration * 1000:.1f}ms route={route} upstream={state.upstream}"
            f" upstream_attempts={state.trace.attempts} cache={state.cache_status}"
            f" id={state.request_id}{' aborted' if aborted else ''}"
        )
        _access_log.info(
            "{access}",
            access=line,
            request_id=state.request_id,
            upstream=state.upstream,
            client=client,
            method=method,
            path=path,
            status=status,
            bytes=request.sentLength,
            duration_ms=round(duration * 1000, 3),
            route=route,
            attempts=state.trace.attempts,
            cache=state.cache_status,
            aborted=aborted,
        )


_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _printable(text: str) -> str:
    """Control characters escaped, so a request cannot forge log lines."""
    return _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _client_address(request: HammalRequest) -> str:
    forwarded = request.forwarded
    if forwarded is not None and forwarded.client is not None:
        return _printable(str(forwarded.client))
    address = request.getClientAddress()
    host = str(getattr(address, "host", "-"))
    # IPv4 clients of a dual-stack port arrive IPv4-mapped: log them as IPv4.
    return host[7:] if host.startswith("::ffff:") and "." in host else host
