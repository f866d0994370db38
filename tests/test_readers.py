"""
Tests for L{hammal.cache.readers}: L{tcp_transport} (sendfile only on plain
TCP connections), L{BlobReader} and L{FileFollower} (ranges of complete
files, following a growing fill with the client's pauses, ending exactly
once, failures of the fill, of the client and of the cache file, going on
upstream through the bypass) and L{FileSender} over a real socket pair (the
first burst, the per-turn limit, Twisted's buffered bytes first, waiting on
a full socket).
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
from types import SimpleNamespace
from typing import Any, Callable, Iterator

from twisted.internet import tcp
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.trial.unittest import SynchronousTestCase

from hammal.cache import fetch as fetch_module
from hammal.cache import readers
from hammal.cache.fetch import BlobFetch
from hammal.cache.readers import _FIRST_SLICE, BlobReader, FileSender, tcp_transport
from hammal.cache.store import BlobStore
from hammal.cache.writes import LocalCacheError
from hammal.reference import Digest
from hammal.stream import TransferBroken
from tests.fakes import FakeConsumer
from tests.test_fetch import _HeldOffload, _Response


def request_over(transport: Any) -> Any:
    return SimpleNamespace(channel=SimpleNamespace(transport=transport))


class TransportDetectionTests(SynchronousTestCase):
    def test_plain_tcp(self) -> None:
        connection = tcp.Connection.__new__(tcp.Server)
        self.assertIs(tcp_transport(request_over(connection)), connection)

    def test_through_protocol_wrappers(self) -> None:
        connection = tcp.Connection.__new__(tcp.Server)
        wrapper = ProtocolWrapper(WrappingFactory(Factory.forProtocol(Protocol)), Protocol())
        wrapper.transport = connection
        self.assertIs(tcp_transport(request_over(wrapper)), connection)

    def test_not_under_tls(self) -> None:
        connection = tcp.Connection.__new__(tcp.Server)
        tls = TLSMemoryBIOProtocol.__new__(TLSMemoryBIOProtocol)
        tls.transport = connection
        self.assertIsNone(tcp_transport(request_over(tls)))

    def test_not_for_test_doubles(self) -> None:
        self.assertIsNone(tcp_transport(request_over(StringTransport())))
        self.assertIsNone(tcp_transport(object()))  # type: ignore[arg-type]


class _Consumer:
    """The request side of a FileSender: counts what was sent."""

    def __init__(self) -> None:
        self.sentLength = 0
        self.channel = SimpleNamespace(resetTimeout=lambda: None)
        self.producer: Any = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None


def one_turn(clock: Clock) -> None:
    """Run the calls due now, as one reactor turn would: not those they add."""
    due = [call for call in clock.getDelayedCalls() if call.getTime() <= clock.seconds()]
    for call in due:
        clock.calls.remove(call)
        call.called = 1
        call.func(*call.args, **call.kw)


class FirstBurstTests(SynchronousTestCase):
    """
    A connection's first sendfile is capped at _FIRST_SLICE and the rest
    waits for the next reactor turn: thousands of clients arriving together
    each copy little before requests already under way are served.
    """

    def test_first_burst_capped(self) -> None:
        sender_sock, reader_sock = socket.socketpair()
        self.addCleanup(sender_sock.close)
        self.addCleanup(reader_sock.close)
        sender_sock.setblocking(False)
        size = 3 * _FIRST_SLICE
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"z" * size)
        transport = SimpleNamespace(
            fileno=sender_sock.fileno,
            dataBuffer=b"",
            offset=0,
            _tempDataLen=0,
            producerPaused=False,
            startWriting=lambda: None,
        )
        clock = Clock()
        consumer = _Consumer()
        sender = FileSender(consumer, transport, clock, path, 0, size)  # type: ignore[arg-type]
        received: list[int] = []
        sender.done.addCallback(received.append)
        sender.begin()
        self.assertEqual(consumer.sentLength, 0)  # not in the request's own turn
        one_turn(clock)
        self.assertEqual(consumer.sentLength, _FIRST_SLICE)
        got = 0
        while got < size:
            try:
                got += len(reader_sock.recv(1 << 20, socket.MSG_DONTWAIT))
            except BlockingIOError:
                pass
            clock.advance(0)
        self.assertEqual(received, [size])


BLOB = bytes(range(256)) * 40  # 10240 bytes


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _until(done: Callable[[], bool], turns: int = 100_000) -> Iterator[None]:
    """Loop until C{done()}, a bounded number of times (a broken reader fails, not hangs)."""
    for _ in range(turns):
        if done():
            return
        yield
    raise AssertionError(f"not done after {turns} turns")


class _TurnClock(Clock):
    """
    A L{Clock} that can run one reactor turn: the calls due when the turn
    begins, not those they schedule (C{advance(0)} runs those too).
    """

    def turn(self) -> None:
        due = [call for call in self.calls if call.getTime() <= self.seconds()]
        for call in due:
            if call.active():
                self.calls.remove(call)
                call.called = 1
                call.func(*call.args, **call.kw)

    def settle(self) -> None:
        """Run turns until nothing is due (a reader waiting for news, or done)."""
        for _ in _until(lambda: not [c for c in self.calls if c.getTime() <= self.seconds()]):
            self.turn()


class _GrowingFile:
    """A fill as readers see it (L{GrowingFile}): the test writes and ends it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.size: int | None = None
        self.readable = 0
        self.complete = False
        self.verified = False
        self.failure: Any = None
        self.listeners: set[Callable[[], None]] = set()
        open(path, "wb").close()

    @property
    def written(self) -> int:
        return os.path.getsize(self.path)

    @property
    def sendable(self) -> int:
        """Like a sibling's fill: everything sendable is in the file."""
        return self.readable

    def buffered(self, offset: int, limit: int) -> memoryview | None:
        return None

    def subscribe(self, listener: Callable[[], None]) -> None:
        self.listeners.add(listener)

    def unsubscribe(self, listener: Callable[[], None]) -> None:
        self.listeners.discard(listener)

    def _notify(self) -> None:
        for listener in list(self.listeners):
            listener()

    def write(self, data: bytes, readable: bool = True) -> None:
        """Bytes reach the file; readable now, or held (the tail)."""
        with open(self.path, "ab") as f:
            f.write(data)
        if readable:
            self.readable = os.path.getsize(self.path)
        self._notify()

    def verify(self) -> None:
        """The digest matched: every byte is readable."""
        self.size = self.readable = os.path.getsize(self.path)
        self.verified = True
        self._notify()

    def commit(self) -> None:
        self.complete = True
        self._notify()

    def fail(self, failure: Exception) -> None:
        self.failure = failure
        self._notify()


class _Tail:
    """A bypass: records where upstream is asked to go on; the test ends it."""

    def __init__(self) -> None:
        self.asked: list[tuple[int, int | None]] = []
        self.delivered: Deferred[int] = Deferred()
        self.consumer: Any = None
        self.stopped = False

    def __call__(self, offset: int, end: int | None) -> "_Tail":
        self.asked.append((offset, end))
        return self

    def deliver(self, consumer: Any) -> Deferred[int]:
        self.consumer = consumer
        return self.delivered

    def stop(self) -> None:
        self.stopped = True


class _PausingConsumer(FakeConsumer):
    """A client whose buffer is full after every write: it pauses its producer."""

    def write(self, data: bytes) -> None:
        super().write(data)
        assert self.producer is not None
        self.producer.pauseProducing()


class BlobReaderTests(SynchronousTestCase):
    """L{BlobReader} and what it shares with every L{FileFollower}."""

    def setUp(self) -> None:
        self.clock = _TurnClock()
        self.path = self.mktemp()
        with open(self.path, "wb") as f:
            f.write(BLOB)
        self.consumer = FakeConsumer()
        self.fds = _fd_count()

    def reader(
        self,
        start: int = 0,
        end: int | None = len(BLOB),
        fetch: Any = None,
        chunk_size: int = 1024,
        bypass: Any = None,
        consumer: Any = None,
        path: str | None = None,
    ) -> BlobReader:
        reader = BlobReader(
            consumer or self.consumer,
            self.clock,
            path or self.path,
            start,
            end,
            fetch,
            chunk_size,
            bypass,
        )
        reader.begin()
        return reader

    def assertReleased(self, fetch: _GrowingFile | None = None) -> None:
        """The reader holds nothing: no file open, no timer, no subscription."""
        self.clock.settle()
        self.assertEqual(_fd_count(), self.fds)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        if fetch is not None:
            self.assertEqual(fetch.listeners, set())

    def test_range_of_a_complete_file(self) -> None:
        """A range of a stored blob: exact bytes, in chunks, then the count."""
        reader = self.reader(100, 5100, chunk_size=1000)
        self.clock.settle()
        self.assertIs(self.consumer.producer, reader)
        self.assertTrue(self.consumer.streaming)
        self.assertEqual(self.successResultOf(reader.done), 5000)
        self.assertEqual(self.consumer.received, BLOB[100:5100])
        self.assertEqual({len(chunk) for chunk in self.consumer.data}, {1000})
        self.assertReleased()

    def test_empty_range(self) -> None:
        """Nothing to send: done at once with 0."""
        reader = self.reader(10, 10)
        self.clock.settle()
        self.assertEqual(self.successResultOf(reader.done), 0)
        self.assertEqual(self.consumer.data, [])

    def test_to_the_end_of_a_stored_file(self) -> None:
        """
        No end given and no fill to follow (the fill committed before the
        reader began): the reader ends at the end of the file.
        """
        reader = self.reader(10240 - 300, None)
        self.clock.settle()
        self.assertEqual(self.successResultOf(reader.done), 300)
        self.assertEqual(self.consumer.received, BLOB[-300:])
        self.assertReleased()

    def test_sixteen_chunks_per_turn(self) -> None:
        """One reader sends at most 16 chunks in a reactor turn, then lets others run."""
        reader = self.reader(chunk_size=100)
        sent = [len(self.consumer.data)]  # begin() may send in its own turn
        for _ in _until(lambda: reader.done.called):
            self.clock.turn()
            sent.append(len(self.consumer.data))
        per_turn = [now - before for before, now in zip([0, *sent], sent)]
        self.assertEqual(max(per_turn), 16)
        self.assertEqual(len([count for count in per_turn if count]), 7)  # 103 chunks
        self.assertEqual(self.consumer.received, BLOB)

    def test_client_pauses_and_resumes(self) -> None:
        """A paused client gets nothing until it resumes, then the rest."""
        consumer = _PausingConsumer()
        reader = self.reader(chunk_size=4096, consumer=consumer)
        self.clock.settle()
        self.assertEqual(len(consumer.data), 1)
        self.clock.turn()
        self.assertEqual(len(consumer.data), 1)
        reader.resumeProducing()
        self.assertEqual(len(consumer.data), 1)  # in a turn of its own
        self.clock.turn()
        self.assertEqual(len(consumer.data), 2)
        for _ in _until(lambda: reader.done.called):
            reader.resumeProducing()
            self.clock.turn()
        self.assertEqual(len(consumer.data), 3)
        self.assertEqual(self.successResultOf(reader.done), len(BLOB))
        self.assertEqual(consumer.received, BLOB)

    def test_follows_a_growing_fill(self) -> None:
        """
        Following a fill: bytes go out as they become readable, held bytes
        (the tail) only once verified; the reader ends exactly once and
        forgets the fill.
        """
        fill = _GrowingFile(self.mktemp())
        reader = self.reader(0, None, fetch=fill)
        results: list[object] = []
        reader.done.addBoth(results.append)
        self.assertEqual(fill.listeners, {reader._progress})
        fill.write(BLOB[:3000])
        self.assertEqual(self.consumer.received, b"")  # in the next turn
        self.clock.turn()
        self.assertEqual(self.consumer.received, BLOB[:3000])
        fill.write(BLOB[3000:], readable=False)
        self.clock.turn()
        self.assertEqual(self.consumer.received, BLOB[:3000])
        self.assertNoResult(reader.done)
        fill.verify()
        self.clock.turn()
        self.assertEqual(results, [len(BLOB)])
        self.assertEqual(self.consumer.received, BLOB)
        self.assertReleased(fill)
        fill.commit()
        reader.stopProducing()  # the client leaving afterwards changes nothing
        self.clock.turn()
        self.assertEqual(results, [len(BLOB)])

    def test_ranged_follower_of_a_growing_fill(self) -> None:
        """A range ends at its end, before the fill does."""
        fill = _GrowingFile(self.mktemp())
        reader = self.reader(1000, 2000, fetch=fill)
        fill.write(BLOB[:1500])
        self.clock.turn()
        self.assertEqual(self.consumer.received, BLOB[1000:1500])
        fill.write(BLOB[1500:5000])
        self.clock.turn()
        self.assertEqual(self.successResultOf(reader.done), 1000)
        self.assertEqual(self.consumer.received, BLOB[1000:2000])
        self.assertReleased(fill)

    def test_paused_follower_not_woken_by_the_fill(self) -> None:
        """The fill growing does not wake a paused client's reader."""
        fill = _GrowingFile(self.mktemp())
        reader = self.reader(0, None, fetch=fill)
        self.clock.settle()
        reader.pauseProducing()
        fill.write(BLOB[:1000])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        reader.resumeProducing()
        self.clock.turn()
        self.assertEqual(self.consumer.received, BLOB[:1000])

    def test_fill_fails(self) -> None:
        """The fill failing upstream ends the reader with that failure."""
        fill = _GrowingFile(self.mktemp())
        tail = _Tail()
        reader = self.reader(0, None, fetch=fill, bypass=tail)
        fill.write(BLOB[:1000])
        self.clock.turn()
        broken = TransferBroken("upstream broke the transfer")
        fill.fail(broken)
        self.clock.turn()
        self.assertIs(self.failureResultOf(reader.done, TransferBroken).value, broken)
        self.assertEqual(tail.asked, [])  # upstream's failure is not bypassed
        self.assertReleased(fill)

    def test_fill_fails_locally_goes_on_upstream(self) -> None:
        """
        The fill failing for the cache's own reason: the rest of the range
        comes through the bypass, from the byte reached; the count covers both.
        """
        fill = _GrowingFile(self.mktemp())
        tail = _Tail()
        reader = self.reader(500, 9000, fetch=fill, bypass=tail)
        fill.write(BLOB[:2000])
        self.clock.turn()
        fill.fail(LocalCacheError("cannot write the cache file: No space left on device"))
        self.clock.turn()
        self.assertEqual(tail.asked, [(2000, 9000)])
        self.assertIs(tail.consumer, self.consumer)
        self.assertIsNone(self.consumer.producer)  # the tail registers its own
        self.assertNoResult(reader.done)
        tail.delivered.callback(7000)
        self.assertEqual(self.successResultOf(reader.done), 8500)
        self.assertReleased(fill)

    def test_fill_fails_locally_without_bypass(self) -> None:
        """Without a bypass a local failure ends the reader, saying why."""
        fill = _GrowingFile(self.mktemp())
        reader = self.reader(0, None, fetch=fill)
        fill.fail(LocalCacheError("cannot write the cache file: No space left on device"))
        self.clock.turn()
        failure = self.failureResultOf(reader.done, TransferBroken)
        self.assertEqual(
            failure.value.message,
            "cannot read the cache: cannot write the cache file: No space left on device",
        )

    def test_bypass_fails(self) -> None:
        """Upstream failing in the bypass fails the reader."""
        tail = _Tail()
        reader = self.reader(bypass=tail, path=self.mktemp())
        tail.delivered.errback(TransferBroken("upstream broke"))
        self.failureResultOf(reader.done, TransferBroken)

    def test_client_goes_away(self) -> None:
        """The client leaving ends the reader with TransferBroken; nothing more is read."""
        fill = _GrowingFile(self.mktemp())
        reader = self.reader(0, None, fetch=fill)
        fill.write(BLOB[:1000])
        reader.stopProducing()
        self.failureResultOf(reader.done, TransferBroken)
        self.assertReleased(fill)
        reader.resumeProducing()
        self.clock.turn()
        self.assertEqual(self.consumer.data, [])

    def test_client_goes_away_during_the_bypass(self) -> None:
        """The client leaving while upstream sends the rest stops upstream."""
        tail = _Tail()
        reader = self.reader(bypass=tail, path=self.mktemp())
        reader.stopProducing()
        self.assertTrue(tail.stopped)
        self.failureResultOf(reader.done, TransferBroken)

    def test_file_cannot_be_opened(self) -> None:
        """A stored blob gone (gc) is fetched from upstream, the whole range."""
        tail = _Tail()
        reader = self.reader(100, 200, bypass=tail, path=self.mktemp())
        self.assertEqual(tail.asked, [(100, 200)])
        tail.delivered.callback(100)
        self.assertEqual(self.successResultOf(reader.done), 100)

    def test_failed_fill_file_gone(self) -> None:
        """The file of a fill that failed upstream is gone: the fill's failure, no bypass."""
        fill = _GrowingFile(self.mktemp())
        broken = TransferBroken("upstream broke the transfer")
        fill.failure = broken
        os.unlink(fill.path)
        tail = _Tail()
        reader = self.reader(0, None, fetch=fill, bypass=tail, path=fill.path)
        self.assertIs(self.failureResultOf(reader.done).value, broken)
        self.assertEqual(tail.asked, [])

    def test_read_fails_goes_on_upstream(self) -> None:
        """A read error (EIO) mid-range: the rest from upstream, from where it broke."""
        real = os.pread
        reads: list[int] = []

        def failing(fd: int, size: int, offset: int) -> bytes:
            reads.append(offset)
            if len(reads) > 2:
                raise OSError(errno.EIO, "Input/output error")
            return real(fd, size, offset)

        self.patch(os, "pread", failing)
        tail = _Tail()
        reader = self.reader(chunk_size=1000, bypass=tail)
        self.clock.settle()
        self.assertEqual(tail.asked, [(2000, len(BLOB))])
        self.assertEqual(self.consumer.received, BLOB[:2000])
        tail.delivered.callback(len(BLOB) - 2000)
        self.assertEqual(self.successResultOf(reader.done), len(BLOB))
        self.assertReleased()

    def test_file_ends_early(self) -> None:
        """A file shorter than the range asked (truncated) is a local failure."""
        tail = _Tail()
        reader = self.reader(0, len(BLOB) + 100, bypass=tail)
        self.clock.settle()
        self.assertEqual(tail.asked, [(len(BLOB), len(BLOB) + 100)])
        self.assertNoResult(reader.done)

    def test_a_bug_ends_the_reader(self) -> None:
        """An unexpected exception while reading ends this reader only, logged."""

        def buggy(fd: int, size: int, offset: int) -> bytes:
            raise ValueError("a bug")

        self.patch(os, "pread", buggy)
        reader = self.reader()
        self.clock.settle()
        failure = self.failureResultOf(reader.done, TransferBroken)
        self.assertIn("internal error", failure.getErrorMessage())
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertReleased()


class _Request:
    """
    The request side of a L{FileSender} over a real TCP connection: the
    producer goes to the transport, as twisted.web's request and channel
    pass it on.
    """

    def __init__(self, transport: tcp.Connection) -> None:
        self.sentLength = 0
        self.timeouts_reset = 0
        self.channel = SimpleNamespace(transport=transport, resetTimeout=self._reset)
        self._transport = transport

    def _reset(self) -> None:
        self.timeouts_reset += 1

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._transport.unregisterProducer()


class FileSenderTests(SynchronousTestCase):
    """
    L{FileSender} on a real Twisted TCP connection over a socket pair
    (driven by a L{MemoryReactor} and a L{Clock}: the test plays the
    reactor's part, calling C{doWrite} when the socket may be written).
    """

    def setUp(self) -> None:
        ours, self.theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(self.theirs.close)
        self.theirs.setblocking(False)
        self.reactor = MemoryReactor()
        self.transport = tcp.Connection(ours, Protocol(), self.reactor)  # type: ignore[arg-type]
        self.transport.connected = True
        self.request = _Request(self.transport)
        self.clock = _TurnClock()
        self.path = self.mktemp()
        self.received = b""

    def sender(self, blob: bytes, start: int = 0, end: int | None = None, **kw: Any) -> FileSender:
        with open(self.path, "wb") as f:
            f.write(blob)
        self.assertIs(tcp_transport(self.request), self.transport)  # type: ignore[arg-type]
        sender = FileSender(
            self.request,
            self.transport,
            self.clock,
            self.path,
            start,
            len(blob) if end is None else end,
            **kw,
        )
        sender.begin()
        return sender

    def read(self) -> bytes:
        """What the client side can read now."""
        while True:
            try:
                data = self.theirs.recv(1 << 20)
            except BlockingIOError:
                break
            if not data:
                break
            self.received += data
        return self.received

    def test_range_sent(self) -> None:
        """A range goes out exact, counted on the request, its idle timeout reset."""
        sender = self.sender(BLOB, 1000, 9000)
        for _ in _until(lambda: sender.done.called):
            self.clock.turn()
        self.assertEqual(self.successResultOf(sender.done), 8000)
        self.assertEqual(self.read(), BLOB[1000:9000])
        self.assertEqual(self.request.sentLength, 8000)
        self.assertGreater(self.request.timeouts_reset, 0)

    def test_twisted_buffer_first(self) -> None:
        """
        Bytes Twisted still holds (the response headers) reach the socket
        before the file's: the sender waits for the transport to resume it.
        """
        self.transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        calls: list[int] = []
        real = os.sendfile
        self.patch(os, "sendfile", lambda *a: calls.append(a[3]) or real(*a))
        sender = self.sender(BLOB)
        self.clock.settle()
        self.assertEqual(calls, [])
        self.assertTrue(self.transport.producerPaused)
        self.assertIn(self.transport, self.reactor.getWriters())
        self.transport.doWrite()  # the reactor: the socket is writable
        self.assertNotIn(self.transport, self.reactor.getWriters())
        for _ in _until(lambda: sender.done.called):
            self.clock.turn()
        self.assertEqual(self.read(), b"HTTP/1.1 200 OK\r\n\r\n" + BLOB)

    def test_first_burst_then_calls_per_turn(self) -> None:
        """
        The first sendfile is capped at _FIRST_SLICE and alone in its turn;
        then at most _CALLS_PER_TURN calls of a slice each per turn.
        """
        self.patch(readers, "_FIRST_SLICE", 100)
        self.patch(readers, "_SLICE", 1000)
        per_turn: list[list[int]] = [[]]
        real = os.sendfile

        def counting(out: int, in_: int, offset: int, count: int) -> int:
            per_turn[-1].append(count)
            return real(out, in_, offset, count)

        self.patch(os, "sendfile", counting)
        sender = self.sender(BLOB)
        for _ in _until(lambda: sender.done.called):
            per_turn.append([])
            self.clock.turn()
        turns = [calls for calls in per_turn if calls]  # begin() may send in a turn of its own
        self.assertEqual(turns, [[100], [1000] * 4, [1000] * 4, [1000, 1000, 140]])
        self.assertEqual(self.read(), BLOB)

    def test_whole_in_the_first_send_finishes_in_that_turn(self) -> None:
        """
        A response whose every byte went in the first sendfile (a config
        blob) is finished in the same turn: a client that read it all and
        closed at once must not find the request still open (it was logged
        as a 499 the client aborted).
        """
        small = BLOB[:705]
        sender = self.sender(small)
        turns = 0
        for _ in _until(lambda: self.request.sentLength == len(small)):
            self.clock.turn()
            turns += 1
        self.assertTrue(sender.done.called, f"sent all in turn {turns}, not finished in it")
        self.assertEqual(self.successResultOf(sender.done), len(small))
        self.assertEqual(self.read(), small)

    def test_full_socket_waits_for_the_transport(self) -> None:
        """
        A full socket (EAGAIN): the sender asks the transport to resume it
        once writable, sends nothing meanwhile, and goes on when resumed.
        """
        self.theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        blob = os.urandom(1 << 20)
        waits = 0
        sender = self.sender(blob)
        for _ in _until(lambda: sender.done.called):
            self.clock.turn()
            if self.transport.producerPaused:
                waits += 1
                self.assertIn(self.transport, self.reactor.getWriters())
                self.assertEqual(self.clock.getDelayedCalls(), [])
                self.read()
                self.transport.doWrite()
                self.assertFalse(self.transport.producerPaused)
            self.read()
        self.assertEqual(self.read(), blob)
        self.assertGreater(waits, 0)

    def test_client_gone(self) -> None:
        """The client's socket closed: the sender ends with TransferBroken."""
        sender = self.sender(BLOB * 100)
        for _ in _until(lambda: self.request.sentLength > 0):
            self.clock.turn()
        self.assertEqual(self.request.sentLength, readers._FIRST_SLICE)
        self.theirs.close()
        for _ in _until(lambda: sender.done.called):
            self.clock.turn()
        failure = self.failureResultOf(sender.done, TransferBroken)
        self.assertIn("sending to the client failed", failure.getErrorMessage())

    def test_client_goes_away(self) -> None:
        """The transport stopping its producer ends the sender; nothing more is sent."""
        sender = self.sender(BLOB)
        sent = self.request.sentLength
        sender.stopProducing()
        self.failureResultOf(sender.done, TransferBroken)
        self.clock.turn()
        self.assertEqual(self.request.sentLength, sent)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_file_ends_early_goes_on_upstream(self) -> None:
        """A cache file shorter than the range (sendfile sends 0) goes on through the bypass."""
        tail = _Tail()
        sender = self.sender(BLOB, 0, len(BLOB) + 50, bypass=tail)
        for _ in _until(lambda: bool(tail.asked)):
            self.clock.turn()
        self.assertEqual(tail.asked, [(len(BLOB), len(BLOB) + 50)])
        self.assertIsNone(self.transport.producer)
        tail.delivered.callback(50)
        self.assertEqual(self.successResultOf(sender.done), len(BLOB) + 50)

    def test_fill_fails(self) -> None:
        """A sender following a fill that fails upstream ends with that failure."""
        fill = _GrowingFile(self.mktemp())
        sender = FileSender(self.request, self.transport, self.clock, fill.path, 0, len(BLOB), fill)
        sender.begin()
        fill.write(BLOB[:5000])
        self.clock.turn()
        broken = TransferBroken("upstream broke the transfer")
        fill.fail(broken)
        self.clock.turn()
        self.assertIs(self.failureResultOf(sender.done).value, broken)
        self.assertEqual(self.read(), BLOB[:5000])
        self.assertEqual(fill.listeners, set())

    def test_follows_a_growing_fill(self) -> None:
        """A sender following a fill sends what is readable and ends once verified."""
        fill = _GrowingFile(self.mktemp())
        with open(self.path, "wb"):
            pass
        sender = FileSender(self.request, self.transport, self.clock, fill.path, 0, len(BLOB), fill)
        sender.begin()
        fill.write(BLOB[:5000])
        self.clock.turn()
        self.clock.turn()
        self.assertEqual(self.read(), BLOB[:5000])
        fill.write(BLOB[5000:], readable=False)
        self.clock.turn()
        self.assertEqual(self.read(), BLOB[:5000])
        fill.verify()
        for _ in _until(lambda: sender.done.called):
            self.clock.turn()
        self.assertEqual(self.read(), BLOB)
        self.assertEqual(fill.listeners, set())


class FollowFromMemoryTests(SynchronousTestCase):
    """
    A FileSender following a fill sends what arrived from upstream at once,
    from memory, without waiting for the writer thread; it goes on from
    the file for what was written.
    """

    def test_first_chunk_sent_before_it_is_written(self) -> None:
        sender_sock, reader_sock = socket.socketpair()
        self.addCleanup(sender_sock.close)
        self.addCleanup(reader_sock.close)
        sender_sock.setblocking(False)
        chunks = [bytes([n]) * 50_000 for n in range(1, 5)]
        blob = b"".join(chunks)
        root = self.mktemp()
        store = BlobStore(root)
        os.makedirs(os.path.join(root, "tmp"), exist_ok=True)
        clock = Clock()
        offload = _HeldOffload()
        response = _Response(len(blob))
        fetch = BlobFetch(
            Digest.parse("sha256:" + hashlib.sha256(blob).hexdigest()),
            store,
            clock,
            lambda offset: succeed(response),
            read_timeout=30,
            resumes=0,
            upstream="upstream.test",
            offload=offload,
        )
        Deferred.fromCoroutine(fetch.run())
        transport = SimpleNamespace(
            fileno=sender_sock.fileno,
            dataBuffer=b"",
            offset=0,
            _tempDataLen=0,
            producerPaused=False,
            startWriting=lambda: None,
        )
        consumer = _Consumer()
        sender = FileSender(
            consumer,
            transport,  # type: ignore[arg-type]
            clock,
            fetch.path,
            0,
            len(blob),
            fetch=fetch,
        )
        received: list[int] = []
        sender.done.addCallback(received.append)
        sender.begin()

        def read() -> bytes:
            got = b""
            while True:
                try:
                    got += reader_sock.recv(1 << 20, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    return got

        response.send(chunks[0])
        clock.advance(0)
        self.assertEqual(fetch.written, 0)  # no write job ran
        self.assertEqual(read(), chunks[0])
        for chunk in chunks[1:]:
            response.send(chunk)
        offload.run_only(fetch_module._write_and_hash)  # then sent from the file
        got = b""
        for _ in range(20):
            clock.advance(0)
            got += read()
        self.assertEqual(got, blob[50_000:-1])  # the last byte waits for the digest
        response.end()
        offload.run_all()
        for _ in range(20):
            clock.advance(0)
            got += read()
        self.assertEqual(got, blob[50_000:])
        self.assertEqual(received, [len(blob)])
