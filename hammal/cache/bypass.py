"""
The rest of a blob straight from upstream, for a reader whose cache file
failed it locally.

When the cache disk fails (full, read-only, an I/O error) in the middle of
a transfer, or a cached file cannot be read, the clients reading it are not
at fault and neither is upstream: each reader asks upstream for the bytes
from where it stands (``Range: bytes=N-``) and streams them on to its
client with backpressure, uncached. Bytes already sent came from the file,
which holds exactly what upstream sent (it is written at explicit offsets),
so the client gets one seamless, exact body. A reader that goes to
upstream from the first byte for the whole blob has it verified against the
digest on the way, its last chunk held back until it matched, as on the
uncached path.
"""

from __future__ import annotations

from typing import Awaitable, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse
from zope.interface import implementer

from hammal import metrics
from hammal.errors import UpstreamTimeout
from hammal.minrate import DEFAULT_MIN_RATE, RateWatch
from hammal.reference import Digest
from hammal.stream import TransferBroken, _producer, discard_body, expected_length, not_a_blob

StartUpstream = Callable[..., Awaitable[IResponse]]
"""
C{start(offset, end=None)} requests the blob from upstream from byte
C{offset} (to C{end}, exclusive, when given).
"""


def starts_at(response: IResponse, offset: int) -> bool:
    """Whether a C{206} answer's ``Content-Range`` starts at C{offset}."""
    values = response.headers.getRawHeaders(b"content-range", [])
    if not values:
        return False
    text = values[0].decode("latin-1").strip()
    if not text.startswith("bytes "):
        return False
    start = text[6:].split("-", 1)[0]
    return start.isdigit() and int(start) == offset


class UpstreamTail:
    """
    A L{hammal.stream.BodySource} for bytes C{[start, end)} of a blob (to
    its end when C{end} is L{None}), fetched from upstream uncached; given
    up after C{idle_timeout} of silence, or a window of it that brought
    less than C{min_rate} bytes per second (L{hammal.minrate}).
    """

    def __init__(
        self,
        start_upstream: StartUpstream,
        clock: IReactorTime,
        idle_timeout: float,
        upstream: str,
        start: int,
        end: int | None,
        digest: Digest | None = None,
        min_rate: int = DEFAULT_MIN_RATE,
    ) -> None:
        self._digest = digest
        self._min_rate = min_rate
        self._start_upstream = start_upstream
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._upstream = upstream
        self._start = start
        self._end = end
        self._opening: Deferred[IResponse] | None = None
        self._pipe: _TailPipe | None = None
        self._stopped = False

    def deliver(self, consumer: IConsumer) -> Deferred[int]:
        opening = Deferred.fromCoroutine(self._request())
        self._opening = opening
        return opening.addCallback(self._opened, consumer)

    async def _request(self) -> IResponse:
        return await self._start_upstream(self._start, self._end)

    def _opened(self, response: IResponse, consumer: IConsumer) -> Deferred[int]:
        self._opening = None
        skip = 0
        if response.code == 200:
            skip = self._start
        elif response.code != 206 or not starts_at(response, self._start):
            discard_body(response)
            raise TransferBroken(f"{self._upstream} answered {response.code} to the rest of a blob")
        if not_a_blob(response):
            discard_body(response)
            raise TransferBroken(f"{self._upstream} sent a web page instead of a blob")
        if self._stopped:
            discard_body(response)
            raise TransferBroken("the client went away")
        announced = expected_length(response)
        count: int | None = None
        if self._end is not None:
            count = self._end - self._start
        elif announced is not None:
            count = announced - skip
        whole = response.code == 200 and self._start == 0 and count == announced
        pipe = _TailPipe(
            consumer,
            self._clock,
            self._idle_timeout,
            skip,
            count,
            self._upstream,
            self._digest if whole else None,
            self._min_rate,
        )
        self._pipe = pipe
        response.deliverBody(pipe)
        return pipe.done

    def stop(self) -> None:
        self._stopped = True
        if self._opening is not None:
            self._opening.cancel()
        if self._pipe is not None:
            self._pipe.stopProducing()


@implementer(IPushProducer)
class _TailPipe(Protocol):
    """
    Copies C{count} bytes (all, when L{None}) of an upstream body, after
    dropping C{skip}, into C{consumer}, as its push producer; checked
    against C{digest} when given (the last chunk is held back until it is).
    A trickle below C{min_rate} ends it as silence does; the consumer's
    pauses are not judged.
    """

    def __init__(
        self,
        consumer: IConsumer,
        clock: IReactorTime,
        idle_timeout: float,
        skip: int,
        count: int | None,
        upstream: str,
        digest: Digest | None = None,
        min_rate: int = DEFAULT_MIN_RATE,
    ) -> None:
        self.done: Deferred[int] = Deferred()
        self._digest = digest
        self._hasher = digest.hasher() if digest is not None else None
        self._pending = b""
        self._consumer = consumer
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._skip = skip
        self._count = count
        self._upstream = upstream
        self._sent = 0
        self._stopped = False
        self._idle: IDelayedCall | None = None
        self._rate = RateWatch(clock, min_rate, idle_timeout, upstream, self._too_slow)

    def connectionMade(self) -> None:
        self._consumer.registerProducer(self, True)
        self._arm()
        self._rate.start()

    def dataReceived(self, data: bytes) -> None:
        if self._stopped or self.done.called:
            return
        self._arm()
        self._rate.count(len(data))
        metrics.upstream_bytes.inc(len(data))
        if self._skip:
            dropped = min(self._skip, len(data))
            data = data[dropped:]
            self._skip -= dropped
        if self._count is not None:
            data = data[: self._count - self._sent]
        if data:
            self._sent += len(data)
            if self._hasher is None:
                self._consumer.write(data)
            else:
                self._hasher.update(data)
                if self._pending:
                    self._consumer.write(self._pending)
                self._pending = data
        if self._count is not None and self._sent >= self._count:
            self._disarm()
            self._complete()
            _producer(self.transport).stopProducing()

    def _complete(self) -> None:
        """Everything arrived: verify, release the held-back chunk, end."""
        if self._digest is not None and self._hasher is not None:
            if not self._digest.matches(self._hasher):
                metrics.digest_mismatches.inc()
                self._pending = b""
                self.done.errback(
                    TransferBroken(f"{self._upstream} sent bytes that do not match {self._digest}")
                )
                return
        if self._pending:
            self._consumer.write(self._pending)
            self._pending = b""
        self.done.callback(self._sent)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._disarm()
        if self.done.called:
            return
        if self._stopped:
            self.done.errback(TransferBroken("the transfer was stopped"))
        elif not reason.check(ResponseDone, PotentialDataLoss):
            self.done.errback(
                TransferBroken(f"{self._upstream} broke the transfer: {reason.getErrorMessage()}")
            )
        elif self._count is not None and self._sent != self._count:
            self.done.errback(
                TransferBroken(f"{self._upstream} sent {self._sent} of {self._count} bytes")
            )
        else:
            self._complete()

    def pauseProducing(self) -> None:
        self._disarm()  # our own choice: neither silence nor the rate is judged
        _producer(self.transport).pauseProducing()

    def resumeProducing(self) -> None:
        if not self._stopped and not self.done.called:
            self._arm()
            self._rate.start()
        _producer(self.transport).resumeProducing()

    def stopProducing(self) -> None:
        self._stopped = True
        self._disarm()
        _producer(self.transport).stopProducing()

    def _arm(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.reset(self._idle_timeout)
        else:
            self._idle = self._clock.callLater(self._idle_timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        self._rate.stop()

    def _timed_out(self) -> None:
        self._idle = None
        self._give_up(f"{self._upstream} sent nothing for {self._idle_timeout:g} seconds")

    def _too_slow(self, slow: UpstreamTimeout) -> None:
        self._disarm()
        self._give_up(slow.message)

    def _give_up(self, message: str) -> None:
        """Upstream is too slow (silent, or trickling): fail as a broken transfer."""
        self._rate.stop()
        if not self.done.called:
            self.done.errback(TransferBroken(message))
        self._stopped = True
        _producer(self.transport).stopProducing()
