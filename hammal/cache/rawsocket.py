"""
The private parts of a Twisted TCP connection that sendfile needs, behind
one small adapter: what is still buffered in Twisted, the socket's file
descriptor, and asking to be resumed once Twisted has written it all.

Twisted has no public API for these; keeping them here means one place
(and one test, tests/test_rawsocket.py) to change when Twisted does.
"""

from __future__ import annotations

from twisted.internet import tcp


class RawSocket:
    """A L{tcp.Connection} seen from code writing to its socket directly."""

    def __init__(self, transport: tcp.Connection) -> None:
        self._transport = transport

    def fileno(self) -> int:
        """The socket's file descriptor."""
        return int(self._transport.fileno())

    def buffered(self) -> int:
        """Bytes Twisted holds for this socket and has not written yet."""
        transport = self._transport
        return len(transport.dataBuffer) - transport.offset + transport._tempDataLen

    def resume_when_drained(self) -> None:
        """
        Pause the registered producer until Twisted has written what it
        holds; the transport then calls its C{resumeProducing}.
        """
        self._transport.producerPaused = True
        self._transport.startWriting()


def body_connection(transport: object) -> tcp.Connection | None:
    """
    The plain TCP connection under the transport twisted.web's HTTP client
    gives a response body's protocol (a C{TransportProxyProducer} around
    it), or L{None} when there is none (TLS, a test double, the response
    over already).
    """
    connection = getattr(transport, "_producer", None)
    if isinstance(connection, tcp.Connection):
        return connection
    return None
