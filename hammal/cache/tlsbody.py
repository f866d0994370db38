"""
The private parts of Twisted's TLS client connection that a pump thread
needs to read a response body past it, behind one small adapter.

Over TLS, twisted.web's HTTP client reads a body through a
L{TLSMemoryBIOProtocol}: the reactor reads ciphertext from the TCP socket,
writes it into the pyOpenSSL L{Connection}'s memory BIO and delivers every
record it can decrypt at once. So once the reactor stopped reading the
socket and the read under way was delivered, the only state of the stream
is inside that L{Connection} (a record's first bytes, perhaps a decrypted
record not read yet): a thread that goes on feeding it what the socket
has, and reading what it decrypts, continues the stream exactly.

That holds only while nothing else uses the L{Connection}: L{TLSBody.problem}
says why a connection cannot be taken over (the handshake not done,
bytes Twisted still has to send, a closing connection), and the pump
thread must be the only one to touch the L{Connection} until it ended;
L{TLSBody.abort} then drops the connection on the event loop (its body
was read past the HTTP client: it can carry no other request).

Twisted has no public API for these; keeping them here means one place
(and one test, tests/test_tlsbody.py) to change when Twisted does.
"""

from __future__ import annotations

from OpenSSL.SSL import Connection
from twisted.internet import tcp
from twisted.internet.endpoints import _WrappingProtocol
from twisted.protocols.tls import TLSMemoryBIOProtocol

from hammal.cache.rawsocket import RawSocket

__all__ = ["TLSBody", "tls_body_connection"]


class TLSBody:
    """A TLS connection over TCP, seen from code that takes its reading over."""

    def __init__(self, tls: TLSMemoryBIOProtocol, connection: tcp.Connection) -> None:
        self._tls = tls
        self.tcp = connection

    def connection(self) -> Connection:
        """The pyOpenSSL connection (memory BIOs) that decrypts the stream."""
        connection: Connection = self._tls._tlsConnection
        return connection

    def problem(self) -> str | None:
        """
        Why the stream's reading cannot be handed to another thread now,
        or L{None} when it can (once the event loop stopped reading the
        socket): the handshake done, the connection open, and nothing for
        Twisted to send on it (what OpenSSL has to send, the pump sends).
        """
        tls, connection = self._tls, self.tcp
        try:
            if tls._tlsConnection is None or not tls._handshakeDone:
                return "the TLS handshake is not done"
            if tls._lostTLSConnection or tls._aborted or tls.disconnecting:
                return "the TLS connection is closing"
            if _reads_for(connection.protocol) is not tls:
                return "TLS is not over the TCP connection alone"
            if not connection.connected or connection.disconnecting:
                return "the TCP connection is closing"
            if tls._appSendBuffer or tls._producer is not None:
                return "Twisted has bytes to send over TLS"
            aggregator = getattr(tls, "_aggregator", None)
            if aggregator is not None and (aggregator._buffer or aggregator._scheduled):
                return "Twisted has bytes to send over TLS"
            if RawSocket(connection).buffered():
                return "Twisted has bytes to send on the socket"
        except AttributeError as missing:
            return f"Twisted's TLS layer changed ({missing})"
        return None

    def abort(self) -> None:
        """Drop the connection (on the event loop, once no thread uses it)."""
        if getattr(self._tls, "_tlsConnection", None) is None:
            self.tcp.abortConnection()  # TLS is down already (Twisted lets its state go)
            return
        self._tls.abortConnection()


def _reads_for(protocol: object) -> object:
    """
    The protocol the TCP connection's bytes go to, past the layers that
    hand them on unchanged as they come, keeping nothing: an endpoint's
    wrapper, an open C{CONNECT} tunnel (its C{relayed_to}).
    """
    for _ in range(_MOST_LAYERS):
        if isinstance(protocol, _WrappingProtocol):
            protocol = protocol._wrappedProtocol
            continue
        relayed_to = getattr(protocol, "relayed_to", None)
        if not callable(relayed_to):
            return protocol
        protocol = relayed_to()
    return None


#: Layers between a TCP connection and its TLS layer looked through.
_MOST_LAYERS = 4


def tls_body_connection(transport: object) -> TLSBody | None:
    """
    The TLS connection under the transport twisted.web's HTTP client gives
    a response body's protocol (a C{TransportProxyProducer} around it), or
    L{None} when there is none (plain TCP, a test double, the response
    over already).
    """
    tls = getattr(transport, "_producer", None)
    if not isinstance(tls, TLSMemoryBIOProtocol):
        return None
    connection = tls.transport
    if not isinstance(connection, tcp.Connection):
        return None
    return TLSBody(tls, connection)
