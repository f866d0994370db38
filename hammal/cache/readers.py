"""
Everything that sends a byte range of a cache file to a client, in one
place: L{FileFollower} (the common part: following a transfer in flight,
pausing and resuming with the client, ending exactly once, going on from
upstream through a I{bypass} when the cache fails locally), L{BlobReader}
(C{pread} and C{write}: TLS, tests) and L{FileSender} (C{os.sendfile}: the
kernel moves the bytes from the page cache to the socket, so a hit costs no
userspace copies and no buffer memory, however slow the client).

L{FileSender} works on plain TCP connections (not TLS) and cooperates with
Twisted's own buffering: bytes Twisted still holds (the response headers) go
first; when the socket is full, the transport is asked to tell us when it can
write again, exactly as it tells a paused producer. The private transport
fields this needs are behind L{hammal.cache.rawsocket.RawSocket}.

Readers know a fill only as a L{GrowingFile}: a local
L{hammal.cache.fetch.BlobFetch} or a L{hammal.cache.sibling.SiblingFill}.
A reader ahead of a local fill's writer takes the bytes the fill holds in
memory (C{sendable}, C{buffered}) rather than wait for them to be written.
"""

from __future__ import annotations

import errno
import os
from typing import Any, Callable, Protocol

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from hammal.cache.rawsocket import RawSocket
from hammal.cache.writes import LocalCacheError, describe
from hammal.stream import BodySource, TransferBroken
from hammal.turns import QueuedCall, turn_queue


class GrowingFile(Protocol):
    """
    What a follower needs of the fetch filling the file it reads (a
    L{hammal.cache.fetch.BlobFetch}): how far it got, whether it ended, and
    word when it moves on.
    """

    size: int | None
    #: Bytes in the file.
    written: int
    #: Bytes readers may take from the file.
    readable: int
    complete: bool
    verified: bool
    failure: Any

    @property
    def sendable(self) -> int:
        """Bytes readers may take, from the file or (past C{written}) from memory."""

    def buffered(self, offset: int, limit: int) -> memoryview | None:
        """
        Bytes from C{offset} (before C{limit}) received but not in the file
        yet, or L{None} when they are in the file (or not held here).
        """

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call C{listener} whenever the file grows or the fetch ends."""

    def unsubscribe(self, listener: Callable[[], None]) -> None:
        """Stop calling C{listener}."""


Bypass = Callable[[int, "int | None"], BodySource]
"""C{bypass(offset, end)}: bytes C{[offset, end)} of the blob from upstream, uncached."""


@implementer(IPushProducer)
class FileFollower:
    """
    Bytes C{[start, end)} of C{path} (L{None} end: to the end of the blob),
    read from a complete cache file or behind a L{BlobFetch} as it grows.
    Subclasses move the bytes in L{_pump}.

    When the file fails for a local reason (it cannot be opened or read,
    or the fetch being followed could not write it) and a C{bypass} is
    given, the rest of the range comes from upstream instead.

    @ivar done: fires with the byte count once the range was delivered;
        fails with the fetch's error, or L{TransferBroken} when the client
        went away.
    """

    log = Logger()

    def __init__(
        self,
        consumer: Any,
        clock: IReactorTime,
        path: str,
        start: int,
        end: int | None,
        fetch: GrowingFile | None = None,
        bypass: Bypass | None = None,
    ) -> None:
        self.done: Deferred[int] = Deferred()
        self._consumer = consumer
        self._clock = clock
        self._path = path
        self._start = start
        self._offset = start
        self._end = end
        self._fetch = fetch
        self._fd: int | None = None
        self._paused = False
        self._stopped = False
        self._scheduled: IDelayedCall | QueuedCall | None = None
        self._bypass = bypass
        self._tail: BodySource | None = None
        self._registered = False

    def begin(self) -> None:
        """Open the file, register with the consumer and start sending."""
        try:
            self._fd = os.open(self._path, os.O_RDONLY)
        except OSError as failure:
            if not self._failed_fetch():  # gone with a failed fetch: its failure
                self._local_failure(describe(failure))
            return
        self._consumer.registerProducer(self, True)
        self._registered = True
        if self._fetch is not None:
            self._fetch.subscribe(self._progress)
        self._schedule()  # the first send in a later turn, after the headers

    # IPushProducer.

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        if self._stopped or self._fd is None:
            return
        self._paused = False
        self._schedule()

    def stopProducing(self) -> None:
        """The client went away."""
        self._stopped = True
        self._finish(TransferBroken("the client went away"))
        if self._tail is not None:
            self._tail.stop()

    # For subclasses.

    def _pump(self) -> None:
        raise NotImplementedError()

    def _progress(self) -> None:
        """The fetch being followed wrote more, or ended."""
        if not self._paused:
            self._schedule()

    def _schedule(self) -> None:
        # Through the clock's turn queue: thousands of readers woken at once
        # send a bounded number per turn, between other requests.
        if self._scheduled is None or not self._scheduled.active():
            self._scheduled = turn_queue(self._clock).call(self._run_pump)

    def _run_pump(self) -> None:
        """L{_pump}, whose failures end this reader (never the reactor's turn)."""
        try:
            self._pump()
        except OSError as failure:
            self._scheduled = None
            self._local_failure(describe(failure))
        except Exception:
            self._scheduled = None
            self.log.failure("reading a cache file failed")
            self._finish(TransferBroken("internal error reading the cache"))

    def _failed_fetch(self) -> bool:
        """End with the fetch's failure, if it failed (go on uncached if that was local)."""
        failure = self._fetch.failure if self._fetch is not None else None
        if failure is None:
            return False
        if isinstance(failure, LocalCacheError):
            self._local_failure(failure.message)
        else:
            self._finish(failure)
        return True

    def _local_failure(self, reason: str) -> None:
        """
        The cache file failed us, not upstream: the rest of the range comes
        from upstream (the bytes sent so far are exactly upstream's).
        """
        if self.done.called or self._stopped:
            return
        self._release()
        if self._bypass is None:
            self._finish(TransferBroken(f"cannot read the cache: {reason}"))
            return
        if self._registered:
            self._consumer.unregisterProducer()
            self._registered = False
        sent = self._offset - self._start
        self._tail = self._bypass(self._offset, self._end)
        self._tail.deliver(self._consumer).addCallbacks(
            lambda count: self._finish_tail(sent + count), self._finish_tail
        )

    def _finish_tail(self, result: Any) -> None:
        if not self.done.called:
            if isinstance(result, int):
                self.done.callback(result)
            else:
                self.done.errback(result)

    def _limit(self) -> int | None:
        """How far we may read now; L{None} while nothing more is known."""
        fetch = self._fetch
        if fetch is None or fetch.complete or fetch.verified:
            if self._end is not None:
                return self._end
            if fetch is not None:
                return fetch.size
            # A stored blob read to its end (its fill committed before we began).
            return os.fstat(self._fd).st_size if self._fd is not None else None
        if fetch.failure is not None:
            return None
        # a local fill also lets us have what it holds in memory
        sendable = fetch.sendable
        if self._end is not None:
            return min(self._end, sendable)
        return sendable

    def _in_file(self, limit: int) -> int:
        """
        Up to where, before C{limit}, the file holds the bytes; beyond it
        they are still in the fill's memory (L{_buffered}).
        """
        fetch = self._fetch
        if fetch is None or fetch.complete or fetch.verified:
            return limit
        return min(limit, fetch.written)

    def _buffered(self, limit: int) -> memoryview | None:
        """The bytes from our offset the fill has received and not written yet."""
        if self._fetch is None:
            return None
        return self._fetch.buffered(self._offset, limit)

    def _delivered(self, limit: int | None) -> bool:
        if self._end is not None:
            return self._offset >= self._end
        complete = self._fetch is None or self._fetch.complete or self._fetch.verified
        return complete and limit is not None and self._offset >= limit

    def _release(self) -> None:
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        self._scheduled = None
        if self._fetch is not None:
            self._fetch.unsubscribe(self._progress)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _finish(self, failure: Exception | None) -> None:
        self._release()
        if self.done.called:
            return
        if failure is None:
            self.done.callback(self._offset - self._start)
        else:
            self.done.errback(failure)


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
        fetch: GrowingFile | None = None,
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
            most = _FIRST_SLICE if self._first else _SLICE
            in_file = self._in_file(limit)
            try:
                if self._offset < in_file:
                    count = min(most, in_file - self._offset)
                    sent = os.sendfile(socket_fd, self._fd, self._offset, count)
                else:
                    data = self._buffered(limit)
                    if data is None:
                        return  # the fetch's progress wakes us
                    sent = os.write(socket_fd, data[:most])
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
                if self._offset >= limit and self._delivered(limit):
                    # All of it in one send: finished now, not in a later
                    # turn in which the client may have read it and left.
                    self._finish(None)
                    return
                break  # the rest in a later turn
        self._schedule()


class BlobReader(FileFollower):
    """
    Streams a byte range of a blob to C{consumer} with C{pread} and
    C{write}: for consumers sendfile cannot serve (TLS, tests).
    """

    def __init__(
        self,
        consumer: IConsumer,
        clock: IReactorTime,
        path: str,
        start: int,
        end: int | None,
        fetch: GrowingFile | None = None,
        chunk_size: int = 256 * 1024,
        bypass: Bypass | None = None,
    ) -> None:
        super().__init__(consumer, clock, path, start, end, fetch, bypass)
        self._chunk_size = chunk_size

    def _pump(self) -> None:
        self._scheduled = None
        for _ in range(16):
            if self._paused or self._stopped or self._fd is None or self._failed_fetch():
                return
            limit = self._limit()
            if limit is None or self._offset >= limit:
                if self._delivered(limit):
                    self._finish(None)
                return
            in_file = self._in_file(limit)
            if self._offset < in_file:
                count = min(self._chunk_size, in_file - self._offset)
                data = os.pread(self._fd, count, self._offset)
            else:
                view = self._buffered(limit)
                if view is None:
                    return  # the fetch's progress wakes us
                data = bytes(view[: self._chunk_size])
            if not data:
                self._local_failure("the cache file ended early")
                return
            self._offset += len(data)
            self._consumer.write(data)
        self._schedule()
