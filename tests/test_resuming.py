"""
Tests for L{hammal.pull.resuming.ResumingBody}: a blob relayed uncached
goes on with C{Range} when upstream breaks mid-body, one seamless and
verified body for the client.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IProducer
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from hammal.cache.bypass import UpstreamTail
from hammal.minrate import DEFAULT_MIN_RATE
from hammal.pull.resuming import ResumingBody
from hammal.reference import Digest
from hammal.stream import TransferBroken
from tests.fakes import FakeConsumer, FakeProducerTransport

CHUNKS = [b"a" * 1000, b"b" * 1000, b"c" * 1000, b"d" * 500]
DATA = b"".join(CHUNKS)
DIGEST = Digest.of(DATA)
IDLE = 5.0


class StrictConsumer(FakeConsumer):
    """Refuses a second producer before the first is unregistered, as twisted.web does."""

    def __init__(self) -> None:
        super().__init__()
        self.registrations = 0

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        if self.producer is not None:
            raise RuntimeError("a producer is registered already")
        self.registrations += 1
        super().registerProducer(producer, streaming)  # type: ignore[arg-type]


class FakeResponse:
    """An upstream answer whose body the test feeds by hand."""

    def __init__(
        self, code: int = 200, length: Any = len(DATA), content_range: str | None = None
    ) -> None:
        self.code = code
        self.length = length
        self.headers = Headers({b"content-type": [b"application/octet-stream"]})
        if content_range is not None:
            self.headers.setRawHeaders(b"content-range", [content_range.encode()])
        self.transport = FakeProducerTransport()
        self.protocol: Protocol | None = None

    def deliverBody(self, protocol: Protocol) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def send(self, *chunks: bytes) -> None:
        assert self.protocol is not None
        for chunk in chunks:
            self.protocol.dataReceived(chunk)

    def end(self) -> None:
        assert self.protocol is not None
        self.protocol.connectionLost(Failure(ResponseDone()))

    def cut(self) -> None:
        """The connection breaks mid-body."""
        assert self.protocol is not None
        self.protocol.connectionLost(Failure(ResponseFailed([Failure(ConnectionLost())])))


def ranged(offset: int, data: bytes = DATA) -> FakeResponse:
    """A 206 with the rest of C{data} from C{offset}."""
    return FakeResponse(206, len(data) - offset, f"bytes {offset}-{len(data) - 1}/{len(data)}")


class ResumingBodyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.consumer = StrictConsumer()
        self.first = FakeResponse()
        #: (offset, end) of every resume asked for
        self.asked: list[tuple[int, int | None]] = []
        #: the answers the resumes get, in order
        self.answers: list[FakeResponse] = []

    def start(self, offset: int, end: int | None = None) -> Deferred[IResponse]:
        self.asked.append((offset, end))
        return succeed(self.answers.pop(0))  # type: ignore[arg-type]

    def body(
        self, resumes: int = 2, digest: Digest = DIGEST, min_rate: int = DEFAULT_MIN_RATE
    ) -> tuple[ResumingBody, Deferred[int]]:
        body = ResumingBody(
            self.first,  # type: ignore[arg-type]
            self.start,
            self.clock,
            IDLE,
            digest,
            resumes,
            "up.test",
            min_rate=min_rate,
        )
        return body, body.deliver(self.consumer)

    def test_whole_body_verified(self) -> None:
        """Without a break the body passes through whole, and no resume is asked."""
        _, done = self.body()
        self.first.send(*CHUNKS)
        self.first.end()
        self.assertEqual(self.successResultOf(done), len(DATA))
        self.assertEqual(self.consumer.received, DATA)
        self.assertEqual(self.asked, [])

    def test_break_mid_body_resumed_with_range(self) -> None:
        """
        Upstream breaks after two chunks: the rest is asked for from the
        first byte the client was not given (the chunk held back at the
        break is dropped), and the client gets one seamless, exact body,
        the new answer's reader taking over as its producer.
        """
        tail = ranged(1000)
        self.answers.append(tail)
        _, done = self.body()
        self.first.send(CHUNKS[0], CHUNKS[1])
        self.first.cut()
        self.assertEqual(self.asked, [(1000, len(DATA))])
        self.assertNoResult(done)
        tail.send(DATA[1000:2500], DATA[2500:])
        tail.end()
        self.assertEqual(self.successResultOf(done), len(DATA))
        self.assertEqual(self.consumer.received, DATA)
        self.assertEqual(self.consumer.registrations, 2)

    def test_upstream_ignoring_range_is_read_past_the_prefix(self) -> None:
        """A resume answered with the whole blob (C{200}) skips what was sent."""
        whole = FakeResponse()
        self.answers.append(whole)
        _, done = self.body()
        self.first.send(CHUNKS[0], CHUNKS[1])
        self.first.cut()
        whole.send(DATA[:1700], DATA[1700:])
        whole.end()
        self.assertEqual(self.successResultOf(done), len(DATA))
        self.assertEqual(self.consumer.received, DATA)

    def test_silence_resumed(self) -> None:
        """An upstream silent for the read timeout is resumed like a broken one."""
        tail = ranged(1000)
        self.answers.append(tail)
        _, done = self.body()
        self.first.send(CHUNKS[0], CHUNKS[1])
        self.clock.advance(IDLE)
        self.assertTrue(self.first.transport.stopped)
        self.first.cut()
        self.assertEqual(self.asked, [(1000, len(DATA))])
        tail.send(DATA[1000:])
        tail.end()
        self.assertEqual(self.successResultOf(done), len(DATA))
        self.assertEqual(self.consumer.received, DATA)

    def test_resumes_are_bounded(self) -> None:
        """Past C{resumes} breaks, the relay fails: the client is aborted."""
        again = ranged(1000)
        self.answers.append(again)
        _, done = self.body(resumes=1)
        self.first.send(CHUNKS[0], CHUNKS[1])
        self.first.cut()
        again.send(CHUNKS[1])
        again.cut()
        self.failureResultOf(done, TransferBroken)
        self.assertEqual(len(self.asked), 1)
        self.assertEqual(self.consumer.received, DATA[:1000])

    def test_no_resumes_configured(self) -> None:
        """With no resumes (``--retries 0``) a break fails the relay at once."""
        _, done = self.body(resumes=0)
        self.first.send(CHUNKS[0], CHUNKS[1])
        self.first.cut()
        self.failureResultOf(done, TransferBroken)
        self.assertEqual(self.asked, [])

    def test_resume_with_the_wrong_range_fails(self) -> None:
        """A C{206} that does not start where the client stands is never spliced in."""
        self.answers.append(ranged(0))
        _, done = self.body(resumes=1)
        self.first.send(CHUNKS[0], CHUNKS[1])
        self.first.cut()
        self.failureResultOf(done, TransferBroken)
        self.assertEqual(self.asked, [(1000, len(DATA))])
        self.assertEqual(self.consumer.received, b"")  # the first chunk is still held back

    def test_digest_checked_across_resumes(self) -> None:
        """
        Resumed bytes that make the whole differ from the digest never
        complete the body: its last chunk is held back and the relay fails.
        """
        tail = ranged(1000)
        self.answers.append(tail)
        _, done = self.body()
        self.first.send(CHUNKS[0], CHUNKS[1])
        self.first.cut()
        tail.send(b"x" * 2000, CHUNKS[3])
        tail.end()
        self.failureResultOf(done, TransferBroken)
        self.assertEqual(len(self.consumer.received), len(DATA) - len(CHUNKS[3]))

    def test_corrupt_body_without_a_break_never_completes(self) -> None:
        """A whole body that does not match its digest keeps its last chunk."""
        _, done = self.body(digest=Digest.of(b"something else"))
        self.first.send(*CHUNKS)
        self.first.end()
        self.failureResultOf(done, TransferBroken)
        self.assertEqual(self.consumer.received, DATA[: -len(CHUNKS[3])])

    def test_client_gone_is_not_resumed(self) -> None:
        """A client that leaves drops upstream; nothing more is asked for."""
        body, done = self.body()
        self.first.send(CHUNKS[0])
        body.stop()
        self.assertTrue(self.first.transport.stopped)
        self.first.cut()
        self.failureResultOf(done, TransferBroken)
        self.assertEqual(self.asked, [])

    def test_client_gone_while_a_resume_is_asked(self) -> None:
        """A client that leaves while the resume is on its way cancels it."""
        pending: Deferred[IResponse] = Deferred()
        body = ResumingBody(
            self.first,  # type: ignore[arg-type]
            lambda offset, end=None: pending,
            self.clock,
            IDLE,
            DIGEST,
            2,
            "up.test",
        )
        done = body.deliver(self.consumer)
        self.first.send(CHUNKS[0], CHUNKS[1])
        self.first.cut()
        body.stop()
        self.failureResultOf(done, TransferBroken)

    def test_unknown_length_is_not_resumed(self) -> None:
        """Without an announced length there is no telling where the rest starts."""
        self.first = FakeResponse(length=UNKNOWN_LENGTH)
        _, done = self.body()
        self.first.send(CHUNKS[0], CHUNKS[1])
        self.first.cut()
        self.failureResultOf(done, TransferBroken)
        self.assertEqual(self.asked, [])

    def test_never_delivered_drops_the_body(self) -> None:
        """Stopped before delivery, the upstream body is not left waiting."""
        body = ResumingBody(
            self.first,  # type: ignore[arg-type]
            self.start,
            self.clock,
            IDLE,
            DIGEST,
            2,
            "up.test",
        )
        body.stop()
        self.assertIsNotNone(self.first.protocol)
        self.first.send(b"z" * (65 * 1024))
        self.assertTrue(self.first.transport.stopped)


def trickle(clock: Clock, response: FakeResponse, seconds: int, size: int = 10) -> None:
    """C{size} bytes a second for C{seconds}: never silent for the read timeout."""
    for _ in range(seconds):
        clock.advance(1.0)
        response.send(b"t" * size)


class ResumingMinRateTests(SynchronousTestCase):
    """
    ResumingBody under C{--upstream-min-rate}: a segment trickling below
    the rate is given up after one window of the read timeout and resumed
    with C{Range}, as silence is; the resumes are bounded the same way.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.consumer = StrictConsumer()
        self.asked: list[tuple[int, int | None]] = []
        self.answers: list[FakeResponse] = []

    def start(self, offset: int, end: int | None = None) -> Deferred[IResponse]:
        self.asked.append((offset, end))
        return succeed(self.answers.pop(0))  # type: ignore[arg-type]

    def body(
        self, data: bytes, resumes: int = 2, min_rate: int = 100
    ) -> tuple[FakeResponse, Deferred[int]]:
        first = FakeResponse(length=len(data))
        body = ResumingBody(
            first,  # type: ignore[arg-type]
            self.start,
            self.clock,
            IDLE,
            Digest.of(data),
            resumes,
            "up.test",
            min_rate=min_rate,
        )
        return first, body.deliver(self.consumer)

    def test_trickle_resumed_with_range(self) -> None:
        """
        10 B/s against 100 B/s: after one window (5 s, 50 bytes) upstream
        is dropped and the rest asked for from the first byte the client
        was not given; a fast tail completes the exact body.
        """
        data = b"t" * 50 + b"r" * 950
        tail = ranged(30, data)
        self.answers.append(tail)
        first, done = self.body(data)
        trickle(self.clock, first, 4)
        self.assertEqual(self.asked, [])
        self.clock.advance(1.0)
        self.assertTrue(first.transport.stopped)
        first.cut()
        # the client was given 30 bytes: the chunk held back is asked for again
        self.assertEqual(self.asked, [(30, len(data))])
        tail.send(data[30:])
        tail.end()
        self.assertEqual(self.successResultOf(done), len(data))
        self.assertEqual(self.consumer.received, data)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_trickling_resumes_are_bounded(self) -> None:
        """
        Every resume trickling too (an upstream slow for everyone): each
        is given up after a window, then the relay fails with the client's
        body cut short, after C{resumes} resumes.
        """
        data = b"t" * 3000
        again = ranged(30, data)
        self.answers.append(again)
        first, done = self.body(data, resumes=1)
        trickle(self.clock, first, 5)
        first.cut()
        trickle(self.clock, again, 4)
        self.assertNoResult(done)
        self.clock.advance(1.0)
        self.assertTrue(again.transport.stopped)
        again.cut()
        failure = self.failureResultOf(done, TransferBroken)
        self.assertIn("below --upstream-min-rate 100 B/s", failure.getErrorMessage())
        self.assertEqual(len(self.asked), 1)
        self.assertLess(len(self.consumer.received), len(data))

    def test_slow_body_above_the_rate_completes(self) -> None:
        """Slow but above the floor in every window: one request, exact bytes."""
        data = b"t" * 2400
        first, done = self.body(data)
        trickle(self.clock, first, 12, size=200)
        first.end()
        self.assertEqual(self.successResultOf(done), len(data))
        self.assertEqual(self.consumer.received, data)
        self.assertEqual(self.asked, [])

    def test_paused_client_is_not_judged(self) -> None:
        """A client holding the relay paused (backpressure) does not get upstream dropped."""
        data = b"p" * 1000
        first, done = self.body(data)
        first.send(b"p" * 100)
        assert self.consumer.producer is not None
        self.consumer.producer.pauseProducing()
        self.clock.advance(60)
        self.assertNoResult(done)
        self.assertFalse(first.transport.stopped)
        self.consumer.producer.resumeProducing()
        first.send(data[100:])
        first.end()
        self.assertEqual(self.successResultOf(done), len(data))
        self.assertEqual(self.asked, [])

    def test_zero_turns_it_off(self) -> None:
        """
        With a rate of 0 a trickle is relayed, however long it takes, and
        so is the trickling resume after a break.
        """
        data = b"t" * 1200
        rest = ranged(590, data)
        self.answers.append(rest)
        first, done = self.body(data, min_rate=0)
        trickle(self.clock, first, 60)
        first.cut()
        self.assertEqual(self.asked, [(590, len(data))])
        trickle(self.clock, rest, 61)
        rest.end()
        self.assertEqual(self.successResultOf(done), len(data))
        self.assertEqual(self.consumer.received, data)


class UpstreamTailMinRateTests(SynchronousTestCase):
    """
    The cache bypass (L{UpstreamTail}: the rest of a blob straight from
    upstream, uncached) under C{--upstream-min-rate}: a trickle ends as
    silence does there, a failed transfer.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.consumer = FakeConsumer()
        self.answer = ranged(1000)

    def tail(self, **kwargs: Any) -> Deferred[int]:
        tail = UpstreamTail(
            lambda offset, end=None: succeed(self.answer),
            self.clock,
            IDLE,
            "up.test",
            1000,
            None,
            **kwargs,
        )
        return tail.deliver(self.consumer)

    def test_trickle_below_the_rate_ends_after_one_window(self) -> None:
        done = self.tail(min_rate=100)
        trickle(self.clock, self.answer, 4)
        self.assertNoResult(done)
        self.clock.advance(1.0)
        failure = self.failureResultOf(done, TransferBroken)
        self.assertIn("up.test sent 40 bytes in the last 5 s", failure.getErrorMessage())
        self.assertTrue(self.answer.transport.stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_default_is_the_option_default(self) -> None:
        done = self.tail()
        trickle(self.clock, self.answer, 5, size=DEFAULT_MIN_RATE // 2)
        self.failureResultOf(done, TransferBroken)

    def test_slow_body_above_the_rate_completes(self) -> None:
        done = self.tail(min_rate=100)
        for index in range(0, 2500, 125):  # 125 B/s
            self.clock.advance(1.0)
            self.answer.send(DATA[1000 + index : 1125 + index])
        self.answer.end()
        self.assertEqual(self.successResultOf(done), len(DATA) - 1000)
        self.assertEqual(self.consumer.received, DATA[1000:])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_paused_stream_is_not_judged(self) -> None:
        done = self.tail(min_rate=100)
        self.answer.send(b"x" * 10)
        assert self.consumer.producer is not None
        self.consumer.producer.pauseProducing()
        self.clock.advance(60)
        self.assertNoResult(done)
        self.consumer.producer.resumeProducing()
        trickle(self.clock, self.answer, 4)
        self.assertNoResult(done)
        self.clock.advance(1.0)
        self.failureResultOf(done, TransferBroken)

    def test_zero_turns_it_off(self) -> None:
        done = self.tail(min_rate=0)
        for _ in range(250):
            self.clock.advance(1.0)
            self.answer.send(b"q" * 10)
        self.answer.end()
        self.assertEqual(self.successResultOf(done), 2500)
