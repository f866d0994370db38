"""
Tests for L{hammal.stream.BodyPipe}: backpressure, verification, tail
hold-back and the idle timeout.
"""

from __future__ import annotations

import hashlib

from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH

from hammal.errors import UpstreamTimeout
from hammal.minrate import DEFAULT_MIN_RATE
from hammal.reference import Digest
from hammal.stream import (
    DISCARD_GRACE,
    BodyPipe,
    BodyTooLarge,
    IdleTimer,
    ReadBounds,
    TransferBroken,
    UpstreamBody,
    body_broken,
    discard_body,
    read_body,
)
from tests.fakes import FakeConsumer, FakeProducerTransport

CHUNKS = [b"a" * 1000, b"b" * 1000, b"c" * 500]
DATA = b"".join(CHUNKS)
DIGEST = Digest("sha256", hashlib.sha256(DATA).hexdigest())


class BodyPipeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.consumer = FakeConsumer()
        self.transport = FakeProducerTransport()

    def pipe(self, length: int | None = len(DATA), digest: Digest | None = DIGEST) -> BodyPipe:
        # Silence only: a few KB over seconds is below the default minimum rate.
        pipe = BodyPipe(self.consumer, self.clock, 5.0, length, digest, "up.test", min_rate=0)
        pipe.makeConnection(self.transport)
        return pipe

    def test_registers_as_streaming_producer(self) -> None:
        """The pipe becomes the consumer's push producer at once."""
        pipe = self.pipe()
        self.assertIs(self.consumer.producer, pipe)
        self.assertTrue(self.consumer.streaming)

    def test_consumer_pause_pauses_upstream(self) -> None:
        """A consumer that pauses the pipe pauses the upstream transport."""
        pipe = self.pipe()
        pipe.pauseProducing()
        self.assertTrue(self.transport.paused)
        pipe.resumeProducing()
        self.assertFalse(self.transport.paused)

    def test_consumer_stop_drops_upstream(self) -> None:
        """A client that goes away drops the upstream connection."""
        pipe = self.pipe()
        pipe.dataReceived(CHUNKS[0])
        pipe.stopProducing()
        self.assertTrue(self.transport.stopped)
        pipe.connectionLost(Failure(ResponseFailed([])))
        self.failureResultOf(pipe.done, TransferBroken)

    def test_verified_body_delivered_whole(self) -> None:
        """A correct body arrives complete and done fires with its size."""
        pipe = self.pipe()
        for chunk in CHUNKS:
            pipe.dataReceived(chunk)
        pipe.connectionLost(Failure(ResponseDone()))
        self.assertEqual(self.successResultOf(pipe.done), len(DATA))
        self.assertEqual(self.consumer.received, DATA)

    def test_tail_held_until_verified(self) -> None:
        """The last chunk received is not written before the body is verified."""
        pipe = self.pipe()
        for chunk in CHUNKS:
            pipe.dataReceived(chunk)
        self.assertEqual(self.consumer.received, CHUNKS[0] + CHUNKS[1])
        pipe.connectionLost(Failure(ResponseDone()))
        self.assertEqual(self.consumer.received, DATA)

    def test_corrupt_body_never_completes(self) -> None:
        """A digest mismatch fails the transfer and withholds the tail."""
        pipe = self.pipe()
        pipe.dataReceived(CHUNKS[0])
        pipe.dataReceived(CHUNKS[1])
        pipe.dataReceived(b"X" * 500)
        pipe.connectionLost(Failure(ResponseDone()))
        failure = self.failureResultOf(pipe.done, TransferBroken)
        self.assertIn("do not match", failure.value.message)
        self.assertEqual(len(self.consumer.received), 2000)

    def test_short_body_fails(self) -> None:
        """A body that ends before Content-Length fails."""
        pipe = self.pipe(digest=None)
        pipe.dataReceived(CHUNKS[0])
        pipe.connectionLost(Failure(ResponseDone()))
        failure = self.failureResultOf(pipe.done, TransferBroken)
        self.assertIn("1000 of 2500", failure.value.message)

    def test_long_body_fails(self) -> None:
        """More bytes than announced stop the transfer."""
        pipe = self.pipe(length=1500, digest=None)
        pipe.dataReceived(CHUNKS[0])
        pipe.dataReceived(CHUNKS[1])
        self.failureResultOf(pipe.done, TransferBroken)
        self.assertTrue(self.transport.stopped)

    def test_broken_connection_fails(self) -> None:
        """An upstream reset mid-body fails the transfer."""
        pipe = self.pipe()
        pipe.dataReceived(CHUNKS[0])
        pipe.connectionLost(Failure(ResponseFailed([Failure(ConnectionError("reset"))])))
        self.failureResultOf(pipe.done, TransferBroken)

    def test_idle_timeout(self) -> None:
        """Upstream silence beyond the timeout aborts the transfer."""
        pipe = self.pipe()
        pipe.dataReceived(CHUNKS[0])
        self.clock.advance(4.9)
        pipe.dataReceived(CHUNKS[1])
        self.clock.advance(4.9)
        self.assertNoResult(pipe.done)
        self.clock.advance(0.2)
        self.failureResultOf(pipe.done, UpstreamTimeout)
        self.assertTrue(self.transport.stopped)

    def test_no_timeout_while_paused(self) -> None:
        """Silence while the client holds us paused is not upstream's fault."""
        pipe = self.pipe()
        pipe.dataReceived(CHUNKS[0])
        pipe.pauseProducing()
        self.clock.advance(60)
        self.assertNoResult(pipe.done)
        pipe.resumeProducing()
        self.clock.advance(5.1)
        self.failureResultOf(pipe.done, UpstreamTimeout)

    def test_memory_bounded_by_one_chunk(self) -> None:
        """The pipe holds at most one chunk, however long the body is."""
        size = 10_000
        pipe = BodyPipe(self.consumer, self.clock, 5.0, None, None)
        pipe.makeConnection(self.transport)
        for _ in range(size):
            pipe.dataReceived(b"z" * 10)
        self.assertEqual(len(pipe._pending), 10)
        self.assertEqual(len(self.consumer.received), (size - 1) * 10)


class BodyPipeMinRateTests(SynchronousTestCase):
    """
    L{BodyPipe} under C{--upstream-min-rate}: a body that trickles (never
    silent for the read timeout) is given up as silence is, once a window
    of the read timeout brings less than the rate; the client's own
    pauses are not judged.
    """

    IDLE = 5.0

    def setUp(self) -> None:
        self.clock = Clock()
        self.consumer = FakeConsumer()
        self.transport = FakeProducerTransport()

    def pipe(self, min_rate: int, length: int | None = None) -> BodyPipe:
        pipe = BodyPipe(
            self.consumer, self.clock, self.IDLE, length, None, "up.test", min_rate=min_rate
        )
        pipe.makeConnection(self.transport)
        return pipe

    def trickle(self, pipe: BodyPipe, seconds: int, size: int = 10) -> None:
        """C{size} bytes every second for C{seconds}: never silent for long."""
        for _ in range(seconds):
            self.clock.advance(1.0)
            pipe.dataReceived(b"t" * size)

    def test_default_is_the_option_default(self) -> None:
        """Without C{min_rate}, a pipe holds the option's default floor."""
        pipe = BodyPipe(self.consumer, self.clock, self.IDLE, None, None, "up.test")
        pipe.makeConnection(self.transport)
        self.trickle(pipe, 4, size=DEFAULT_MIN_RATE // 2)
        self.assertNoResult(pipe.done)
        self.trickle(pipe, 1, size=DEFAULT_MIN_RATE // 2)
        self.failureResultOf(pipe.done, UpstreamTimeout)

    def test_trickle_below_the_rate_ends_after_one_window(self) -> None:
        """
        10 B/s against a floor of 100 B/s: never silent, but the first
        window (the read timeout, 5 s) ends it, as silence would.
        """
        pipe = self.pipe(100)
        self.trickle(pipe, 4)
        self.clock.advance(0.9)
        self.assertNoResult(pipe.done)
        self.clock.advance(0.1)
        failure = self.failureResultOf(pipe.done, UpstreamTimeout)
        self.assertIn("up.test sent 40 bytes in the last 5 s", failure.getErrorMessage())
        self.assertIn("below --upstream-min-rate 100 B/s", failure.getErrorMessage())
        self.assertTrue(self.transport.stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.consumer.received, b"t" * 30)  # the last chunk is held back

    def test_slow_body_above_the_rate_completes(self) -> None:
        """
        A body slower than the client could take, but above the floor in
        every window, arrives whole and exact; nothing is left scheduled.
        """
        pipe = self.pipe(100, length=len(DATA))
        for chunk in CHUNKS:
            pipe.dataReceived(chunk)
            self.clock.advance(4.0)  # 1000 B/4 s, then 500 B/4 s: at least 100 B/s
        pipe.connectionLost(Failure(ResponseDone()))
        self.assertEqual(self.successResultOf(pipe.done), len(DATA))
        self.assertEqual(self.consumer.received, DATA)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_paused_stream_is_not_judged(self) -> None:
        """
        While the client holds the pipe paused (backpressure), nothing
        arriving is hammal's doing: no window is judged. After the resume a
        window starts afresh, and a trickle is judged again at its end.
        """
        pipe = self.pipe(100)
        self.trickle(pipe, 2)
        pipe.pauseProducing()
        self.clock.advance(60)
        self.assertNoResult(pipe.done)
        pipe.resumeProducing()
        self.trickle(pipe, 4)
        self.clock.advance(0.9)
        self.assertNoResult(pipe.done)
        self.clock.advance(0.1)
        failure = self.failureResultOf(pipe.done, UpstreamTimeout)
        self.assertIn("sent 40 bytes in the last 5 s", failure.getErrorMessage())

    def test_zero_turns_it_off(self) -> None:
        """With a rate of 0 only silence ends a body: a trickle goes on."""
        pipe = self.pipe(0, length=600)
        self.trickle(pipe, 60)
        self.assertNoResult(pipe.done)
        pipe.connectionLost(Failure(ResponseDone()))
        self.assertEqual(self.successResultOf(pipe.done), 600)
        self.assertEqual(self.consumer.received, b"t" * 600)

    def test_stopped_by_the_client_judges_no_more(self) -> None:
        """A client that leaves leaves nothing scheduled."""
        pipe = self.pipe(100)
        self.trickle(pipe, 2)
        pipe.stopProducing()
        pipe.connectionLost(Failure(ResponseFailed([])))
        self.failureResultOf(pipe.done, TransferBroken)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_upstream_body_passes_the_rate_on(self) -> None:
        """L{UpstreamBody} (a ranged answer relayed uncached) holds the same floor."""
        response = _BodyResponse()
        body = UpstreamBody(
            response,  # type: ignore[arg-type]
            self.clock,
            self.IDLE,
            None,
            "up.test",
            min_rate=100,
        )
        done = body.deliver(self.consumer)
        assert response.protocol is not None
        for _ in range(5):
            self.clock.advance(1.0)
            response.protocol.dataReceived(b"t" * 10)
        failure = self.failureResultOf(done, UpstreamTimeout)
        self.assertIn("below --upstream-min-rate 100 B/s", failure.getErrorMessage())
        self.assertTrue(response.transport.stopped)


class _BodyResponse:
    """A response whose body protocol is connected to a recording transport."""

    def __init__(self, length: object = UNKNOWN_LENGTH) -> None:
        self.length = length
        self.transport = FakeProducerTransport()
        self.protocol: Protocol | None = None

    def deliverBody(self, protocol: Protocol) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)  # type: ignore[arg-type]


class BoundedReadTests(SynchronousTestCase):
    """
    L{read_body} and L{discard_body} with L{ReadBounds}: an idle limit and
    an overall deadline, after which the connection is dropped.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.bounds = ReadBounds(self.clock, idle=5.0, deadline=20.0, upstream="up.test")

    def test_stalled_body_times_out(self) -> None:
        """A body that stops after its first bytes fails after the idle limit."""
        response = _BodyResponse()
        d = read_body(response, 1000, self.bounds)
        assert response.protocol is not None
        response.protocol.dataReceived(b"{")
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        failure = self.failureResultOf(d, UpstreamTimeout)
        self.assertIn("up.test sent nothing for 5 seconds after 1 bytes", failure.getErrorMessage())
        self.assertTrue(response.transport.stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_trickling_body_meets_the_deadline(self) -> None:
        """Bytes arriving just often enough still end at the overall deadline."""
        response = _BodyResponse()
        d = read_body(response, 1000, self.bounds)
        assert response.protocol is not None
        for _ in range(4):
            self.clock.advance(4.0)
            response.protocol.dataReceived(b"x")
        self.assertNoResult(d)
        self.clock.advance(4.0)
        failure = self.failureResultOf(d, UpstreamTimeout)
        self.assertIn("did not finish a response within 20 seconds", failure.getErrorMessage())
        self.assertTrue(response.transport.stopped)

    def test_complete_body_cancels_timers(self) -> None:
        response = _BodyResponse()
        d = read_body(response, 1000, self.bounds)
        assert response.protocol is not None
        response.protocol.dataReceived(b"{}")
        response.protocol.connectionLost(Failure(ResponseDone()))
        self.assertEqual(self.successResultOf(d), b"{}")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(response.transport.stopped)

    def test_announced_too_large_dropped_at_once(self) -> None:
        """A body announced larger than the limit is not read at all."""
        response = _BodyResponse(length=10_000_000)
        d = read_body(response, 64 * 1024, self.bounds)
        failure = self.failureResultOf(d, BodyTooLarge)
        self.assertIn("exceeds 65536 bytes", failure.getErrorMessage())
        self.assertTrue(response.transport.stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_discard_of_a_stalled_body_ends(self) -> None:
        """A discard never fails and waits for a stalled body only briefly."""
        response = _BodyResponse()
        d = discard_body(response, self.bounds)
        self.clock.advance(DISCARD_GRACE - 0.01)
        self.assertNoResult(d)
        self.clock.advance(0.01)
        self.assertIsNone(self.successResultOf(d))
        self.assertTrue(response.transport.stopped)

    def test_cancel_drops_the_connection(self) -> None:
        response = _BodyResponse()
        d = read_body(response, 1000, self.bounds)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(response.transport.stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class IdleTimerTests(SynchronousTestCase):
    """L{IdleTimer}: the read timeout shared by BodyPipe and the cache writer."""

    def test_fires_after_silence(self) -> None:
        clock = Clock()
        fired: list[int] = []
        timer = IdleTimer(clock, 10, lambda: fired.append(1))
        timer.touch()  # not armed: nothing to reset
        clock.advance(20)
        self.assertEqual(fired, [])
        timer.arm()
        clock.advance(9)
        timer.touch()
        clock.advance(9)
        self.assertEqual(fired, [])
        clock.advance(1)
        self.assertEqual(fired, [1])
        timer.touch()  # fired: touching does not re-arm
        clock.advance(100)
        self.assertEqual(fired, [1])

    def test_cancel(self) -> None:
        clock = Clock()
        fired: list[int] = []
        timer = IdleTimer(clock, 10, lambda: fired.append(1))
        timer.arm()
        timer.cancel()
        clock.advance(100)
        self.assertEqual((fired, clock.getDelayedCalls()), ([], []))


class BodyBrokenTests(SynchronousTestCase):
    def test_clean_end(self) -> None:
        self.assertIsNone(body_broken(Failure(ResponseDone()), "up.test", 5))
        self.assertIsNone(body_broken(Failure(PotentialDataLoss()), "up.test", 5))

    def test_broken(self) -> None:
        broken = body_broken(Failure(ConnectionLost("reset")), "up.test", 5)
        assert broken is not None
        self.assertIn("up.test broke the transfer after 5 bytes", broken.message)
