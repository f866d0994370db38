"""
Cache hits with ``os.sendfile``: the kernel moves the bytes from the page
cache to the socket, so a hit costs no userspace copies and no buffer
memory, however slow the client.

It works on plain TCP connections (not TLS) and cooperates with Twisted's
own buffering: bytes Twisted still holds (the response headers) go first;
when the socket is full, the transport is asked to tell us when it can
write again, exactly as it tells a paused producer.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from twisted.internet import tcp
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol

from hammal.cache.fetch import BlobFetch
from hammal.cache.follow import Bypass, FileFollower
from hammal.cache.rawsocket import RawSocket
from hammal.stream import TransferBroken

#: Bytes handed to one sendfile call.
_SLICE = 8 * 1024 * 1024
#: sendfile calls per reactor turn, so one fast client cannot starve others.
_CALLS_PER_TURN = 4
#: A connection's first sendfile, alone in its reactor turn: Linux lets a new
#: socket's send buffer take ~650 KiB at once, and thousands of clients
#: arriving together would each copy that before requests already under way
#: (a manifest GET) are answered.
_FIRST_SLICE = 128 * 1024


def tcp_transport(consumer: IConsumer) -> tcp.Connection | None:
    """
    The plain TCP connection under a twisted.web request, or L{None} when
    there is none (TLS, HTTP/2, a test double).
    """
    channel = getattr(consumer, "channel", None)
    transport: Any = getattr(channel, "transport", None)
    while isinstance(transport, ProtocolWrapper):
        if isinstance(transport, TLSMemoryBIOProtocol):
            return None
        transport = transport.transport
    if isinstance(transport, tcp.Connection) and hasattr(os, "sendfile"):
        return transport
    return None


class FileSender(FileFollower):
    """
    Sends a byte range of a blob to a request's TCP socket with sendfile.
    """

    def __init__(
        self,
        request: Any,
        transport: tcp.Connection,
        clock: IReactorTime,
        path: str,
        start: int,
        end: int,
        fetch: BlobFetch | None = None,
        bypass: Bypass | None = None,
    ) -> None:
        super().__init__(request, clock, path, start, end, fetch, bypass)
        self._socket = RawSocket(transport)
        self._first = True

    def _wait_for_socket(self) -> None:
        """Have the transport resume us once it has written all it holds."""
        self._paused = True
        self._socket.resume_when_drained()

    def _pump(self) -> None:
        self._scheduled = None
        if self._paused or self._stopped or self._fd is None:
            return
        if self._socket.buffered():
            self._wait_for_socket()
            return
        socket_fd = self._socket.fileno()
        for _ in range(_CALLS_PER_TURN):
            if self._failed_fetch():
                return
            limit = self._limit()
            if limit is None or self._offset >= limit:
                if self._delivered(limit):
                    self._finish(None)
                return  # the fetch's progress wakes us
            count = min(_FIRST_SLICE if self._first else _SLICE, limit - self._offset)
            try:
                sent = os.sendfile(socket_fd, self._fd, self._offset, count)
            except BlockingIOError:
                self._wait_for_socket()
                return
            except OSError as failure:
                if failure.errno == errno.EINTR:
                    continue
                self._finish(TransferBroken(f"sending to the client failed: {failure.strerror}"))
                return
            if sent == 0:
                self._local_failure("the cache file ended early")
                return
            self._offset += sent
            self._consumer.sentLength += sent
            self._consumer.channel.resetTimeout()
            if self._first:
                self._first = False
                break  # the rest in a later turn
        self._schedule()
