"""
Which addresses an upstream's redirect may lead hammal to.

An upstream, a mirror or an ``?upstream=`` host may answer with a redirect to
anywhere; followed blindly, a 307 to ``http://169.254.169.254/latest/...``
or ``http://127.0.0.1:6379/`` makes hammal fetch (and serve, and cache) what
only hammal's own network can reach. So redirects from an upstream on a
public address are followed only to public addresses, and the check is made
on the address of the connection actually opened, after DNS: a name that
resolved to a public address when it was looked at may resolve to a private
one a moment later. An upstream that is itself on a loopback, link-local or
private address is in the same trust zone as those addresses: its redirects
are followed there (an in-house registry and its in-house storage).

Every new upstream connection goes through L{CheckedEndpointFactory}: the
one for upstream requests records whether each host was reached on an
internal address (L{PeerZones}); the one for redirects of public upstreams
(its own connection pool) refuses internal addresses before a byte of the
request is written.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IProtocol, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.web.client import URI, BrowserLikePolicyForHTTPS
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

#: Bytes read from an upstream socket at once, whatever --buffer-size sets
#: for client connections: upstream bodies are large, upstream connections
#: few (pooled), so four times fewer reads at the default 256K cost little.
UPSTREAM_READ_SIZE = 1024 * 1024

Origin = tuple[str, str, int]
"""(scheme, host, port) of a URL, as connection pools key connections."""


class InternalAddressRefused(Exception):
    """A redirect led to a loopback, link-local or private address."""

    def __init__(self, host: str, address: str) -> None:
        super().__init__(f"{host} is at {address}, an internal address")
        self.host = host
        self.address = address


def is_internal_address(text: str) -> bool:
    """
    Whether C{text} (an IP address) is loopback, link-local, private or
    otherwise not a public unicast address. IPv4 mapped into IPv6 counts as
    the IPv4 address it holds.
    """
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return True
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return (
        not address.is_global
        or address.is_loopback
        or address.is_link_local
        or address.is_private
        or address.is_multicast
        or address.is_unspecified
    )


class AddressPolicy:
    """
    Decides which connected addresses are internal. Tests substitute one
    that sees a loopback test server as public.
    """

    def internal(self, host: str, port: int) -> bool:
        """Whether a connection to C{host} (an IP address) on C{port} is internal."""
        return is_internal_address(host)


class PeerZones:
    """
    Whether each origin was last reached on an internal address, as seen on
    the connections actually made to it. Bounded: it holds configured
    upstreams and the hosts they redirect to.
    """

    def __init__(self, max_entries: int = 4096) -> None:
        self._zones: dict[Origin, bool] = {}
        self._max_entries = max_entries

    def record(self, origin: Origin, internal: bool) -> None:
        self._zones.pop(origin, None)
        self._zones[origin] = internal
        while len(self._zones) > self._max_entries:
            del self._zones[next(iter(self._zones))]

    def internal(self, origin: Origin) -> bool | None:
        """L{True} if C{origin} was last reached on an internal address, L{None} if never."""
        return self._zones.get(origin)


@implementer(IStreamClientEndpoint)
class _CheckedEndpoint:
    """
    Connects through C{endpoint}, then looks at the peer address before the
    connection is handed to the HTTP client (before any request is sent).
    """

    log = Logger()

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        origin: Origin,
        policy: AddressPolicy,
        refuse_internal: bool,
        zones: PeerZones | None,
    ) -> None:
        self._endpoint = endpoint
        self._origin = origin
        self._policy = policy
        self._refuse_internal = refuse_internal
        self._zones = zones

    def connect(self, protocolFactory: Any) -> Deferred[IProtocol]:
        d: Deferred[IProtocol] = self._endpoint.connect(protocolFactory)
        return d.addCallback(self._check)

    def _check(self, protocol: Any) -> Any:
        peer = protocol.transport.getPeer()
        address, port = getattr(peer, "host", ""), getattr(peer, "port", 0)
        internal = self._policy.internal(address, port)
        if self._zones is not None:
            self._zones.record(self._origin, internal)
        if internal and self._refuse_internal:
            protocol.transport.abortConnection()
            raise InternalAddressRefused(self._origin[1], address)
        _widen_reads(protocol.transport)
        return protocol

    def __repr__(self) -> str:
        scheme, host, port = self._origin
        return f"<checked {scheme}://{host}:{port}>"


@implementer(IAgentEndpointFactory)
class CheckedEndpointFactory:
    """
    Endpoints for an L{twisted.web.client.Agent}: TCP for ``http``, TLS over
    TCP for ``https`` (as Agent's own), each checked on the address it
    connects to.

    @param refuse_internal: fail connections to internal addresses with
        L{InternalAddressRefused} (for following redirects of public
        upstreams).
    @param zones: where to record the zone of every connection made.
    """

    def __init__(
        self,
        reactor: Any,
        tls_policy: IPolicyForHTTPS | None = None,
        connect_timeout: float | None = None,
        policy: AddressPolicy | None = None,
        refuse_internal: bool = False,
        zones: PeerZones | None = None,
    ) -> None:
        self._reactor = reactor
        self._tls_policy = tls_policy if tls_policy is not None else BrowserLikePolicyForHTTPS()
        self._connect_timeout = connect_timeout
        self._policy = policy if policy is not None else AddressPolicy()
        self._refuse_internal = refuse_internal
        self._zones = zones

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        if uri.scheme not in (b"http", b"https"):
            raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")
        host = uri.host.decode("ascii")
        kwargs: dict[str, Any] = {}
        if self._connect_timeout is not None:
            kwargs["timeout"] = self._connect_timeout
        endpoint: IStreamClientEndpoint = _tcp_endpoint(self._reactor, host, uri.port, kwargs)
        if uri.scheme == b"https":
            creator = self._tls_policy.creatorForNetloc(uri.host, uri.port)
            endpoint = wrapClientTLS(creator, endpoint)
        origin = (uri.scheme.decode("ascii"), host.strip("[]").lower(), uri.port)
        return _CheckedEndpoint(endpoint, origin, self._policy, self._refuse_internal, self._zones)


def _tcp_endpoint(
    reactor: Any, host: str, port: int, kwargs: dict[str, Any]
) -> IStreamClientEndpoint:
    """
    A TCP endpoint for C{host}: an IP address (with or without brackets) is
    connected to directly, since L{HostnameEndpoint} would "resolve" it on
    the thread pool (a round trip per new connection); a name is resolved.
    """
    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        address = ipaddress.ip_address(literal)
    except ValueError:  # a name, or a scoped IPv6 address
        return HostnameEndpoint(reactor, host, port, **kwargs)
    if address.version == 4:
        return TCP4ClientEndpoint(reactor, literal, port, **kwargs)
    return TCP6ClientEndpoint(reactor, literal, port, **kwargs)


def _widen_reads(transport: Any) -> None:
    """Read at least L{UPSTREAM_READ_SIZE} at once from this upstream socket (under TLS too)."""
    while isinstance(transport, ProtocolWrapper):
        transport = transport.transport
    if isinstance(transport, tcp.Connection) and transport.bufferSize < UPSTREAM_READ_SIZE:
        transport.bufferSize = UPSTREAM_READ_SIZE
