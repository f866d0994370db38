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
left to the reactor. The connection is found as the cache readers find
it (L{hammal.cache.readers.tcp_transport}).
"""

from __future__ import annotations

from twisted.internet import tcp


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
