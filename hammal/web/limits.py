"""
Connection accounting and limits in front of the site: every client
connection is counted, and past C{max_connections} a new one is answered
with a clean ``503`` and closed instead of being left to time out.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IAddress, IProtocolNegotiationFactory
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from hammal import metrics
from hammal.errors import RegistryError
from hammal.web.respond import error_body


class ServerBusy(RegistryError):
    code = "TOOMANYREQUESTS"
    status = 503


def _busy_response() -> bytes:
    body = error_body(ServerBusy("hammal is at its connection limit; retry shortly"))
    head = (
        b"HTTP/1.1 503 Service Unavailable\r\n"
        b"Content-Type: application/json; charset=utf-8\r\n"
        b"Retry-After: 1\r\n"
        b"Connection: close\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    return head + body


class _Refusal(Protocol):
    def connectionMade(self) -> None:
        if self.transport is None:
            raise RuntimeError("hammal bug: expected self.transport is not None")
        self.transport.write(_busy_response())
        self.transport.loseConnection()


#: The answer to a TLS ClientHello on a plain-HTTP port: clients that probe
#: HTTPS first (skopeo, podman with insecure registries) fall back to HTTP at
#: once instead of waiting out their TLS handshake timeout.
_NOT_TLS = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n"
    b"Content-Length: 30\r\n\r\nthis port speaks plain HTTP.\r\n"
)
_TLS_HANDSHAKE = 0x16


class _CountedProtocol(ProtocolWrapper):
    _first = True

    def connectionMade(self) -> None:
        metrics.open_connections.inc()
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        if self._first and data:
            self._first = False
            if data[0] == _TLS_HANDSHAKE:
                if self.transport is None:
                    raise RuntimeError("hammal bug: expected self.transport is not None")
                self.transport.write(_NOT_TLS)
                self.transport.loseConnection()
                return
        super().dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        metrics.open_connections.dec()
        super().connectionLost(reason)


#: What hammal speaks over TLS. HTTP/1.1 only: cache hits go out with
#: sendfile on the connection itself, which HTTP/2's framing rules out.
#: Clients offering C{h2} too (curl, browsers, docker, containerd) choose it.
ALPN_PROTOCOLS = [b"http/1.1"]


@implementer(IProtocolNegotiationFactory)
class ConnectionLimit(WrappingFactory):
    """
    Wraps the site's factory: counts connections, refuses those beyond
    C{max_connections} (L{None}: no limit).

    It answers Twisted's ALPN question itself: without
    L{IProtocolNegotiationFactory} on the factory that TLS wraps, Twisted's
    select callback finds no common protocol and every client offering ALPN
    is refused with an C{internal_error} alert.
    """

    protocol = _CountedProtocol
    noisy = False
    log = Logger()

    def __init__(self, wrapped: Any, max_connections: int | None) -> None:
        super().__init__(wrapped)
        self.max_connections = max_connections
        self._warned = False

    def acceptableProtocols(self) -> list[bytes]:
        """The protocols offered to TLS clients by ALPN."""
        return list(ALPN_PROTOCOLS)

    def buildProtocol(self, addr: IAddress | None) -> Any:
        if self.max_connections is not None and len(self.protocols) >= self.max_connections:
            if not self._warned:
                self.log.warn(
                    "refusing connections beyond --max-connections {limit}",
                    limit=self.max_connections,
                )
                self._warned = True
            return _Refusal()
        self._warned = False
        return super().buildProtocol(addr)
