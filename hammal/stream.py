"""
Moving upstream response bodies: into memory for small documents, and
straight into a consumer (the client's request) for blobs.

The blob path never buffers: L{BodyPipe} registers itself as the consumer's
streaming producer and forwards pause/resume to the upstream transport, so a
slow client slows the upstream read instead of growing memory. It verifies
length and digest on the fly and holds back the last chunk until both are
known to be right: a client never sees a corrupt transfer complete.
"""

from __future__ import annotations

from typing import Any, Callable, cast
from typing import Protocol as Protocol_

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from zope.interface import implementer

from hammal import metrics
from hammal.errors import UpstreamBadResponse, UpstreamTimeout, UpstreamUnavailable
from hammal.minrate import DEFAULT_MIN_RATE, RateWatch
from hammal.reference import Digest


class BodyTooLarge(UpstreamBadResponse):
    """Upstream sent more than the size limit for a document."""


@attrs.frozen
class ReadBounds:
    """
    How long an upstream body may take: C{idle} seconds of silence at most
    (``--read-timeout``), C{deadline} seconds in all (``--upstream-deadline``),
    on C{clock}. A small body read without bounds could hang its request,
    and any shared work waiting on it, for ever.
    """

    clock: IReactorTime
    idle: float
    deadline: float
    upstream: str = "upstream"


class _Collector(Protocol):
    def __init__(
        self, limit: int, done: Deferred[bytes], bounds: ReadBounds | None, too_large: bool
    ) -> None:
        self._limit = limit
        self._too_large = too_large
        self._done = done
        self._bounds = bounds
        self._chunks: list[bytes] = []
        self._size = 0
        self._idle_call: IDelayedCall | None = None
        self._deadline_call: IDelayedCall | None = None

    def connectionMade(self) -> None:
        if self._too_large:
            self._give_up(BodyTooLarge(f"upstream response exceeds {self._limit} bytes"))
            return
        if self._bounds is None:
            return
        clock = self._bounds.clock
        self._idle_call = clock.callLater(self._bounds.idle, self._timed_out, "idle")
        self._deadline_call = clock.callLater(self._bounds.deadline, self._timed_out, "deadline")

    def dataReceived(self, data: bytes) -> None:
        if self._done.called:
            return
        if self._bounds is not None and self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(self._bounds.idle)
        self._size += len(data)
        if self._size > self._limit:
            self._give_up(BodyTooLarge(f"upstream response exceeds {self._limit} bytes"))
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._cancel_timers()
        if self._done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self._done.callback(b"".join(self._chunks))
        else:
            self._done.errback(
                UpstreamUnavailable(f"upstream connection broke: {reason.getErrorMessage()}")
            )

    def stop(self) -> None:
        """Drop the connection: nobody wants the rest of this body."""
        self._cancel_timers()
        _producer(self.transport).stopProducing()

    def _timed_out(self, which: str) -> None:
        if self._bounds is None:
            raise RuntimeError("hammal bug: expected self._bounds is not None")
        if which == "idle":
            self._idle_call = None
            message = (
                f"{self._bounds.upstream} sent nothing for {self._bounds.idle:g} seconds"
                f" after {self._size} bytes of a response"
            )
        else:
            self._deadline_call = None
            message = (
                f"{self._bounds.upstream} did not finish a response within"
                f" {self._bounds.deadline:g} seconds"
            )
        self._give_up(UpstreamTimeout(message))

    def _give_up(self, error: Exception) -> None:
        self._chunks = []
        if not self._done.called:
            self._done.errback(error)
        self.stop()

    def _cancel_timers(self) -> None:
        for call in (self._idle_call, self._deadline_call):
            if call is not None and call.active():
                call.cancel()
        self._idle_call = self._deadline_call = None


@implementer(IPushProducer)
class _NoProducer:
    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class IdleTimer:
    """
    Calls C{on_idle} once C{seconds} pass without L{arm}: the read timeout
    of an upstream body, shared by everything that receives one.
    """

    def __init__(self, clock: IReactorTime, seconds: float, on_idle: Callable[[], None]) -> None:
        self.seconds = seconds
        self._clock = clock
        self._on_idle = on_idle
        self._call: IDelayedCall | None = None

    def arm(self) -> None:
        """Start waiting, or wait afresh from now."""
        if self._call is not None and self._call.active():
            self._call.reset(self.seconds)
        else:
            self._call = self._clock.callLater(self.seconds, self._fire)

    def touch(self) -> None:
        """Wait afresh from now, if waiting (bytes arrived)."""
        if self._call is not None and self._call.active():
            self._call.reset(self.seconds)

    def cancel(self) -> None:
        """Stop waiting."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _fire(self) -> None:
        self._call = None
        self._on_idle()


def body_broken(reason: Failure, upstream: str, received: int) -> TransferBroken | None:
    """
    L{None} when an upstream body ended normally (C{reason} is the end of
    the response), else the L{TransferBroken} saying where it broke.
    """
    if reason.check(ResponseDone, PotentialDataLoss):
        return None
    return TransferBroken(
        f"{upstream} broke the transfer after {received} bytes: {reason.getErrorMessage()}"
    )


def _producer(transport: object) -> IPushProducer:
    """
    The push producer behind a response body's transport (twisted.web's
    client hands body protocols a producer, typed as a plain transport).
    """
    if transport is None:
        return _NoProducer()
    return cast(IPushProducer, transport)


def read_body(response: IResponse, limit: int, bounds: ReadBounds | None = None) -> Deferred[bytes]:
    """
    Read a whole response body of at most C{limit} bytes, within C{bounds}
    (every upstream read passes them; only in-memory tests leave them out).

    @raise BodyTooLarge: (asynchronously) past C{limit}; the upstream
        connection is dropped.
    @raise UpstreamTimeout: (asynchronously) when upstream is silent for
        C{bounds.idle} seconds or the body takes longer than
        C{bounds.deadline}; the upstream connection is dropped.
    """
    collector: _Collector

    def cancel(d: Deferred[bytes]) -> None:
        """A reader that gives up drops the connection too."""
        collector.stop()

    done: Deferred[bytes] = Deferred(cancel)
    too_large = response.length is not UNKNOWN_LENGTH and response.length > limit
    collector = _Collector(limit, done, bounds, too_large)
    response.deliverBody(collector)
    return done


#: The longest hammal waits for a body it means to drop (an error page
#: before a retry or a failover, a redirect's body): only worth reading to
#: keep the connection; past this, the connection is dropped instead.
DISCARD_GRACE = 0.5


def discard_body(response: IResponse, bounds: ReadBounds | None = None) -> Deferred[None]:
    """
    Read and drop a (small) body so its connection can be reused; a large,
    slow or stalled one has its connection dropped instead, within
    L{DISCARD_GRACE} of silence. Never fails.
    """
    if bounds is not None:
        bounds = attrs.evolve(
            bounds,
            idle=min(bounds.idle, DISCARD_GRACE),
            deadline=min(bounds.deadline, 4 * DISCARD_GRACE),
        )
    return read_body(response, 64 * 1024, bounds).addBoth(lambda _: None)


class TransferBroken(UpstreamUnavailable):
    """The upstream body ended early, or was not what was asked for."""


@implementer(IPushProducer)
class BodyPipe(Protocol):
    """
    Copies an upstream body into C{consumer} with backpressure, checking
    its length and digest.

    The pipe is the consumer's producer: pauses from the consumer pause the
    upstream transport (and the idle timer and the rate watch, since
    silence is then our choice), and stopping the pipe drops the upstream
    connection.

    Besides silence (C{idle_timeout}), a body slower than C{min_rate} bytes
    per second over a window of C{idle_timeout} seconds is given up the
    same way (L{hammal.minrate}; 0: never): a trickle is never silent for
    long, and would hold the client's request and its upstream connection
    for ever.

    @ivar done: fires with the number of bytes written once the body was
        complete and verified and its last chunk written; fails with
        L{TransferBroken} or L{UpstreamTimeout} otherwise, in which case the
        consumer has not been given the last chunk.
    """

    def __init__(
        self,
        consumer: IConsumer,
        clock: IReactorTime,
        idle_timeout: float,
        expected_length: int | None = None,
        digest: Digest | None = None,
        upstream: str = "upstream",
        min_rate: int = DEFAULT_MIN_RATE,
    ) -> None:
        self.done: Deferred[int] = Deferred()
        self._consumer = consumer
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._expected_length = expected_length
        self._digest = digest
        self._hasher = digest.hasher() if digest is not None else None
        self._upstream = upstream
        self._received = 0
        self._pending: bytes = b""
        self._paused = False
        self._stopped = False
        self._idle = IdleTimer(clock, idle_timeout, self._timed_out)
        self._rate = RateWatch(clock, min_rate, idle_timeout, upstream, self._fail)

    # Protocol: the upstream side.

    def connectionMade(self) -> None:
        self._consumer.registerProducer(self, True)
        self._idle.arm()
        self._rate.start()

    def dataReceived(self, data: bytes) -> None:
        if self._stopped:
            return
        self._received += len(data)
        self._rate.count(len(data))
        if self._expected_length is not None and self._received > self._expected_length:
            self._fail(TransferBroken(f"{self._upstream} sent more bytes than announced"))
            return
        metrics.upstream_bytes.inc(len(data))
        if self._hasher is not None:
            self._hasher.update(data)
        if self._pending:
            self._consumer.write(self._pending)
        self._pending = data
        if not self._paused:
            self._idle.arm()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._idle.cancel()
        self._rate.stop()
        if self.done.called:
            return
        if self._stopped:
            self.done.errback(TransferBroken("the transfer was stopped"))
            return
        broken = body_broken(reason, self._upstream, self._received)
        if broken is not None:
            self.done.errback(broken)
            return
        if self._expected_length is not None and self._received != self._expected_length:
            self.done.errback(
                TransferBroken(
                    f"{self._upstream} sent {self._received} of {self._expected_length} bytes"
                )
            )
            return
        if self._digest is not None and self._hasher is not None:
            if not self._digest.matches(self._hasher):
                metrics.digest_mismatches.inc()
                self.done.errback(
                    TransferBroken(f"{self._upstream} sent bytes that do not match {self._digest}")
                )
                return
        if self._pending:
            self._consumer.write(self._pending)
            self._pending = b""
        self.done.callback(self._received)

    # IPushProducer: the consumer side.

    def pauseProducing(self) -> None:
        self._paused = True
        self._idle.cancel()
        self._rate.stop()  # our own choice: no window is judged on it
        _producer(self.transport).pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        if not self._stopped:
            self._idle.arm()
            self._rate.start()
        _producer(self.transport).resumeProducing()

    def stopProducing(self) -> None:
        """The consumer went away: drop the upstream connection."""
        self._stopped = True
        self._pending = b""
        self._idle.cancel()
        self._rate.stop()
        _producer(self.transport).stopProducing()

    # Internals.

    def _fail(self, error: Exception) -> None:
        self._idle.cancel()
        self._rate.stop()
        self._pending = b""
        if not self.done.called:
            self.done.errback(error)
        self._stopped = True
        _producer(self.transport).stopProducing()

    def _timed_out(self) -> None:
        self._fail(
            UpstreamTimeout(
                f"{self._upstream} sent nothing for {self._idle_timeout:g} seconds"
                f" after {self._received} bytes"
            )
        )


def not_a_blob(response: IResponse) -> bool:
    """
    Whether a 200 answer to a blob request is plainly something else: an
    HTML page (captive portals, proxies and CDNs send those with 200).
    """
    content_type = response.headers.getRawHeaders(b"content-type", [b""])[0].lower()
    return content_type.startswith((b"text/html", b"application/xhtml"))


def expected_length(response: IResponse) -> int | None:
    """The body length upstream announced, or L{None}."""
    length: Any = response.length
    return None if length is UNKNOWN_LENGTH else int(length)


class BodySource(Protocol_):
    """
    Where a blob response's bytes come from: delivered to a consumer with
    backpressure, stoppable when the client leaves.
    """

    def deliver(self, consumer: IConsumer) -> Deferred[int]:
        """
        Start writing to C{consumer} (registering a streaming producer);
        fires with the byte count once everything was written, or fails
        without the consumer having received a complete body.
        """

    def stop(self) -> None:
        """The client went away: release what the delivery holds."""


class UpstreamBody:
    """
    A live upstream response body, verified through a L{BodyPipe}, bounded
    by C{idle_timeout} of silence and C{min_rate} (see L{BodyPipe}).
    """

    def __init__(
        self,
        response: IResponse,
        clock: IReactorTime,
        idle_timeout: float,
        verify: Digest | None,
        upstream: str,
        min_rate: int = DEFAULT_MIN_RATE,
    ) -> None:
        self._response = response
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._verify = verify
        self._upstream = upstream
        self._min_rate = min_rate
        self._pipe: BodyPipe | None = None

    def deliver(self, consumer: IConsumer) -> Deferred[int]:
        self._pipe = BodyPipe(
            consumer,
            self._clock,
            self._idle_timeout,
            expected_length(self._response),
            self._verify,
            self._upstream,
            self._min_rate,
        )
        self._response.deliverBody(self._pipe)
        return self._pipe.done

    def stop(self) -> None:
        if self._pipe is not None:
            self._pipe.stopProducing()
            return
        # Never delivered (the client was answered otherwise, or left):
        # drop the body rather than leave its connection waiting.
        bounds = ReadBounds(self._clock, self._idle_timeout, 4 * self._idle_timeout, self._upstream)
        discard_body(self._response, bounds)
