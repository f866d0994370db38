"""
Small answers leave in the turn that produced them.

Twisted's TCP transport only buffers what is written to it and sends it
when the reactor next finds the socket writable: a manifest answered while
a request is handled goes out a turn later, and under load (thousands of
ready sockets handled a bounded number per turn, L{hammal.fairpoll}) a
whole round of the ready sockets later, doubling its latency.

L{send_now} sends what the request's plain TCP connection holds right away
(what the reactor would do in the next turn, C{doWrite}), when that is
safe: a connection still open and not closing, whose writes are not paused.
TLS and HTTP/2 connections, and anything not a Twisted TCP connection, are
left to the reactor.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.web.http import Request

#: Wrappers looked through to find the TCP connection (the connection
#: limit's wrapper, possibly another).
_MAX_WRAPPERS = 4


def tcp_connection(request: Request) -> tcp.Connection | None:
    """The plain TCP connection C{request} is written to, or L{None}."""
    transport: Any = getattr(getattr(request, "channel", None), "transport", None)
    for _ in range(_MAX_WRAPPERS + 1):
        if isinstance(transport, tcp.Connection):
            return transport
        if isinstance(transport, TLSMemoryBIOProtocol) or not isinstance(
            transport, ProtocolWrapper
        ):
            return None
        transport = transport.transport
    return None


def send_now(connection: tcp.Connection | None) -> None:
    """Send what C{connection} holds now rather than in the next turn."""
    if connection is None or not connection.connected:
        return
    if connection.disconnecting or connection._writeDisconnecting:
        return  # closing: the reactor's doWrite closes it once flushed
    if connection.producerPaused:
        return
    if not (len(connection.dataBuffer) - connection.offset or connection._tempDataLen):
        return
    # A failure (the peer gone) leaves the data buffered and the socket
    # registered for writing: the reactor's next doWrite meets it again and
    # closes the connection as it always does.
    connection.doWrite()
