"""
Outbound requests through a forward proxy.

L{ProxyingAgent} picks, per request, how to reach the URL (the decision is
L{ProxyRules}'s):

- direct: hammal's ordinary L{Agent};
- C{http://} through a proxy: Twisted's L{ProxyAgent} (absolute-form
  request lines), with ``Proxy-Authorization`` from the proxy URL;
- C{https://} through a proxy: an L{Agent} whose connections are
  ``CONNECT host:port`` tunnels (L{TunnelEndpoint}) with TLS started inside
  the tunnel, verified against the *upstream's* host name -- the proxy sees
  only ciphertext, and its credentials go only in the ``CONNECT`` request.

Every wait is bounded: connecting to the proxy by the connect timeout, and
the proxy's answer to ``CONNECT`` by the same timeout.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, ProxyAgent
from twisted.web.http_headers import Headers
from twisted.web.iweb import (
    IAgent,
    IAgentEndpointFactory,
    IBodyProducer,
    IPolicyForHTTPS,
    IResponse,
)
from zope.interface import implementer

from hammal.stream import discard_body
from hammal.upstream.proxy_rules import ProxyRules, ProxyURL

#: The largest answer to CONNECT hammal reads (status line and headers).
MAX_CONNECT_RESPONSE = 16 * 1024


class TunnelError(error.ConnectError):
    """The proxy did not open a tunnel (refused, closed, or timed out)."""


def _authority(host: str, port: int) -> bytes:
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{port}".encode("ascii")


class _TunnelProtocol(Protocol):
    """
    Speaks to the proxy until the tunnel is open, then hands every byte to
    the protocol built for the destination (and its losses too).
    """

    def __init__(
        self,
        factory: IProtocolFactory,
        authority: bytes,
        authorization: bytes | None,
        opened: defer.Deferred[IProtocol],
        clock: Any,
        timeout: float,
        proxy_name: str,
    ) -> None:
        self._factory = factory
        self._authority = authority
        self._authorization = authorization
        self._opened = opened
        self._clock = clock
        self._timeout = timeout
        self._proxy_name = proxy_name
        self._buffer = b""
        self._inner: IProtocol | None = None
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        if self.transport is None:
            raise RuntimeError("hammal bug: expected self.transport is not None")
        lines = [b"CONNECT " + self._authority + b" HTTP/1.1", b"Host: " + self._authority]
        if self._authorization is not None:
            lines.append(b"Proxy-Authorization: " + self._authorization)
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n")
        self._timer = self._clock.callLater(self._timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        self._fail(f"proxy {self._proxy_name} did not answer CONNECT within {self._timeout:g}s")

    def _fail(self, message: str) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if not self._opened.called:
            self._opened.errback(TunnelError(string=message))
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def abort(self) -> None:
        """Give up on the tunnel (the connection attempt was cancelled)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def relayed_to(self) -> IProtocol | None:
        """
        The protocol every byte from the proxy goes to, unchanged and as it
        comes (nothing kept here), once the tunnel is open; L{None} before.
        """
        if self._buffer:
            return None
        return self._inner

    def dataReceived(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.dataReceived(data)
            return
        self._buffer += data
        head, separator, rest = self._buffer.partition(b"\r\n\r\n")
        if not separator:
            if len(self._buffer) > MAX_CONNECT_RESPONSE:
                self._fail(f"proxy {self._proxy_name} sent an oversized answer to CONNECT")
            return
        status_line = head.split(b"\r\n", 1)[0]
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or parts[1] != b"200":
            shown = status_line[:100].decode("latin-1", "replace")
            self._fail(f"proxy {self._proxy_name} refused CONNECT: {shown}")
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._buffer = b""
        if self.transport is None:
            raise RuntimeError("hammal bug: expected self.transport is not None")
        inner = self._factory.buildProtocol(self.transport.getPeer())
        if inner is None:
            self._fail("no protocol for the tunnel")
            return
        self._inner = inner
        inner.makeConnection(self.transport)
        self._opened.callback(inner)
        if rest:
            inner.dataReceived(rest)

    def connectionLost(self, reason: Failure = error.ConnectionDone()) -> None:  # type: ignore[assignment]
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._inner is not None:
            self._inner.connectionLost(reason)
        elif not self._opened.called:
            self._opened.errback(
                TunnelError(
                    string=(
                        f"proxy {self._proxy_name} closed the connection before the tunnel opened"
                    )
                )
            )


@implementer(IStreamClientEndpoint)
class TunnelEndpoint:
    """
    Connections to C{host}:C{port} through an HTTP proxy's ``CONNECT``.

    The protocol given to L{connect} sees the tunnel as its transport: wrap
    this endpoint with L{wrapClientTLS} for an ``https://`` destination.
    """

    def __init__(
        self,
        proxy_endpoint: IStreamClientEndpoint,
        proxy: ProxyURL,
        host: str,
        port: int,
        clock: Any,
        timeout: float,
    ) -> None:
        self._proxy_endpoint = proxy_endpoint
        self._proxy = proxy
        self._authority = _authority(host, port)
        self._clock = clock
        self._timeout = timeout

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        tunnel: list[_TunnelProtocol] = []

        def cancel(d: defer.Deferred[IProtocol]) -> None:
            connecting.cancel()
            for protocol in tunnel:
                protocol.abort()

        opened: defer.Deferred[IProtocol] = defer.Deferred(cancel)

        def build() -> _TunnelProtocol:
            protocol = _TunnelProtocol(
                protocolFactory,
                self._authority,
                self._proxy.authorization,
                opened,
                self._clock,
                self._timeout,
                self._proxy.safe_url,
            )
            tunnel.append(protocol)
            return protocol

        factory = Factory.forProtocol(build)
        factory.noisy = False  # not a log line per tunnel
        connecting = self._proxy_endpoint.connect(factory)

        def failed(failure: Failure) -> None:
            if not opened.called:
                opened.errback(failure)

        connecting.addErrback(failed)
        return opened


@implementer(IAgentEndpointFactory)
class _TunnelEndpointFactory:
    """Endpoints for an L{Agent}: TLS inside a CONNECT tunnel."""

    def __init__(
        self,
        reactor: Any,
        proxy: ProxyURL,
        tls_policy: IPolicyForHTTPS,
        connect_timeout: float,
    ) -> None:
        self._reactor = reactor
        self._proxy = proxy
        self._tls_policy = tls_policy
        self._connect_timeout = connect_timeout
        self._proxy_endpoint = HostnameEndpoint(
            reactor, proxy.host, proxy.port, timeout=connect_timeout
        )

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        tunnel = TunnelEndpoint(
            self._proxy_endpoint, self._proxy, host, uri.port, self._reactor, self._connect_timeout
        )
        if uri.scheme != b"https":
            return tunnel
        creator = self._tls_policy.creatorForNetloc(uri.host, uri.port)
        return wrapClientTLS(creator, tunnel)


@implementer(IAgent)
class _ProxyAuthorizingAgent:
    """
    Adapts absolute-form requests for a proxy: adds ``Proxy-Authorization``
    and folds repeated headers into one comma-separated line (RFC 9110
    5.3), since proxies such as tinyproxy keep only one line of each name
    -- a registry that saw one of a client's several ``Accept`` lines
    would answer with another manifest type.
    """

    def __init__(self, agent: IAgent, authorization: bytes | None, proxy_name: str) -> None:
        self._agent = agent
        self._authorization = authorization
        self._proxy_name = proxy_name

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> defer.Deferred[IResponse]:
        folded = Headers()
        for name, values in (headers or Headers()).getAllRawHeaders():
            folded.setRawHeaders(name, [b", ".join(values)] if len(values) > 1 else list(values))
        if self._authorization is not None:
            folded.setRawHeaders(b"proxy-authorization", [self._authorization])
        d = self._agent.request(method, uri, folded, bodyProducer)
        d.addCallback(self._refused_by_proxy)
        return d

    def _refused_by_proxy(self, response: IResponse) -> IResponse | defer.Deferred[IResponse]:
        """
        A 407 is the proxy's answer, not upstream's: a connection failure
        (hammal's 502), never relayed to a client that would think its own
        proxy wants credentials.
        """
        if response.code != 407:
            return response

        def refuse(_: object) -> IResponse:
            raise TunnelError(
                string=(
                    f"proxy {self._proxy_name} refused the request:"
                    " 407 Proxy Authentication Required"
                )
            )

        return discard_body(response).addCallback(refuse)


PoolFactory = Any
"""Builds a fresh L{HTTPConnectionPool} (one per way out)."""


@implementer(IAgent)
class ProxyingAgent:
    """
    Sends each request direct or through the proxy L{ProxyRules} names for
    its URL.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        rules: ProxyRules,
        direct: IAgent,
        make_pool: PoolFactory,
        connect_timeout: float,
        tls_policy: IPolicyForHTTPS | None = None,
    ) -> None:
        self._reactor = reactor
        self._rules = rules
        self._direct = direct
        self._make_pool = make_pool
        self._connect_timeout = connect_timeout
        self._tls_policy = tls_policy or BrowserLikePolicyForHTTPS()
        self._agents: dict[tuple[str, ProxyURL], IAgent] = {}

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> defer.Deferred[IResponse]:
        url = uri.decode("ascii", "replace")
        proxy = self._rules.proxy_for(url)
        if proxy is None:
            return self._direct.request(method, uri, headers, bodyProducer)
        scheme = "https" if url.lower().startswith("https:") else "http"
        return self._agent(scheme, proxy).request(method, uri, headers, bodyProducer)

    def _agent(self, scheme: str, proxy: ProxyURL) -> IAgent:
        agent = self._agents.get((scheme, proxy))
        if agent is not None:
            return agent
        pool: HTTPConnectionPool = self._make_pool()
        if scheme == "https":
            factory = _TunnelEndpointFactory(
                self._reactor, proxy, self._tls_policy, self._connect_timeout
            )
            agent = Agent.usingEndpointFactory(self._reactor, factory, pool)
        else:
            endpoint = HostnameEndpoint(
                self._reactor, proxy.host, proxy.port, timeout=self._connect_timeout
            )
            agent = _ProxyAuthorizingAgent(
                ProxyAgent(endpoint, self._reactor, pool), proxy.authorization, proxy.safe_url
            )
        self._agents[(scheme, proxy)] = agent
        return agent
