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
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from hammal.stream import TransferBroken

#: Bytes handed to one sendfile call.
_SLICE = 8 * 1024 * 1024
#: sendfile calls per reactor turn, so one fast client cannot starve others.
_CALLS_PER_TURN = 4


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


@implementer(IPushProducer)
class FileSender:
    """
    Sends bytes C{[start, end)} of C{path} to a request's TCP socket.

    @ivar done: fires with the byte count when everything was sent; fails
        with L{TransferBroken} when the client went away.
    """

    def __init__(
        self,
        request: Any,
        transport: tcp.Connection,
        clock: IReactorTime,
        path: str,
        start: int,
        end: int,
        fetch: Any = None,
    ) -> None:
        self.done: Deferred[int] = Deferred()
        self._request = request
        self._transport = transport
        self._clock = clock
        self._path = path
        self._start = start
        self._offset = start
        self._end = end
        self._fd: int | None = None
        self._paused = False
        self._waiting = False
        self._scheduled: IDelayedCall | None = None
        self._fetch = fetch

    def begin(self) -> None:
        try:
            self._fd = os.open(self._path, os.O_RDONLY)
        except OSError as failure:
            self._finish(TransferBroken(f"cannot read the cache file: {failure.strerror}"))
            return
        self._request.registerProducer(self, True)
        if self._fetch is not None:
            self._fetch.subscribe(self._progress)
        self._pump()

    def _progress(self) -> None:
        """The fetch being followed wrote more (or ended)."""
        if self._waiting:
            self._waiting = False
            self.resumeProducing()

    def _limit(self) -> int:
        """How far we may send now: a fetch in flight holds back its tail."""
        fetch = self._fetch
        if fetch is None or fetch.complete:
            return self._end
        return min(self._end, fetch.readable)

    # IPushProducer (called through the HTTP channel).

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self._fd is not None and (self._scheduled is None or not self._scheduled.active()):
            self._scheduled = self._clock.callLater(0, self._pump)

    def stopProducing(self) -> None:
        self._finish(TransferBroken("the client went away"))

    # Internals.

    def _buffered(self) -> int:
        transport = self._transport
        return len(transport.dataBuffer) - transport.offset + transport._tempDataLen

    def _wait_for_socket(self) -> None:
        """Have the transport resume us once it has written all it holds."""
        self._paused = True
        self._transport.producerPaused = True
        self._transport.startWriting()

    def _pump(self) -> None:
        self._scheduled = None
        if self._paused or self._fd is None:
            return
        if self._buffered():
            self._wait_for_socket()
            return
        socket_fd = self._transport.fileno()
        for _ in range(_CALLS_PER_TURN):
            if self._offset >= self._end:
                self._finish(None)
                return
            if self._fetch is not None and self._fetch.failure is not None:
                self._finish(self._fetch.failure)
                return
            limit = self._limit()
            if self._offset >= limit:
                self._waiting = True  # until the fetch writes more
                return
            try:
                sent = os.sendfile(
                    socket_fd, self._fd, self._offset, min(_SLICE, limit - self._offset)
                )
            except BlockingIOError:
                self._wait_for_socket()
                return
            except OSError as failure:
                if failure.errno == errno.EINTR:
                    continue
                self._finish(TransferBroken(f"sending to the client failed: {failure.strerror}"))
                return
            if sent == 0:
                self._finish(TransferBroken("the cache file ended early"))
                return
            self._offset += sent
            self._request.sentLength += sent
            self._request.channel.resetTimeout()
        self._scheduled = self._clock.callLater(0, self._pump)

    def _finish(self, failure: Exception | None) -> None:
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        self._scheduled = None
        if self._fetch is not None:
            self._fetch.unsubscribe(self._progress)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.done.called:
            return
        if failure is None:
            self.done.callback(self._offset - self._start)
        else:
            self.done.errback(failure)
