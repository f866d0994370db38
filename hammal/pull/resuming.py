"""
A whole blob relayed uncached, resumed with ``Range`` when upstream breaks
mid-body.

A blob the cache cannot take (over ``--cache-max-size``, a full disk, no
cache at all) streams straight from upstream's answer to the client. Like
a fill (L{hammal.cache.fetch.BlobFetch}), the relay that loses its upstream
connection, hears nothing for the read timeout, or gets less than
``--upstream-min-rate`` over a window of it, asks for the rest
(``Range: bytes=N-``, up to C{resumes} times) and goes on: the client sees
one seamless body instead of a connection cut partway, which clients such
as skopeo report as a failed pull. The digest is checked over the whole
body, across resumes, and its last chunk held back until it matched, so a
client never sees a corrupt or badly spliced transfer complete.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IConsumer, IProducer, IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IResponse
from zope.interface import implementer

from hammal import metrics
from hammal.cache.bypass import StartUpstream, UpstreamTail
from hammal.errors import UpstreamTimeout
from hammal.minrate import DEFAULT_MIN_RATE
from hammal.reference import Digest
from hammal.stream import BodyPipe, TransferBroken, UpstreamBody, expected_length

_log = Logger()


@implementer(IConsumer)
class _Verifying:
    """
    The client's consumer, seen by one upstream segment after another:
    hashes what passes and holds the latest chunk back until L{finish}.
    A new segment's producer replaces the last one's.
    """

    def __init__(self, consumer: IConsumer, digest: Digest) -> None:
        self.received = 0
        self._consumer = consumer
        self._digest = digest
        self._hasher = digest.hasher()
        self._pending = b""
        self._registered = False

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        if self._registered:
            self._consumer.unregisterProducer()
        self._consumer.registerProducer(producer, streaming)
        self._registered = True

    def unregisterProducer(self) -> None:
        self._registered = False
        self._consumer.unregisterProducer()

    def write(self, data: bytes) -> None:
        self.received += len(data)
        self._hasher.update(data)
        if self._pending:
            self._consumer.write(self._pending)
        self._pending = data

    def finish(self, upstream: str) -> None:
        """Everything arrived: release the held-back chunk if the digest matched."""
        if not self._digest.matches(self._hasher):
            metrics.digest_mismatches.inc()
            self._pending = b""
            raise TransferBroken(f"{upstream} sent bytes that do not match {self._digest}")
        if self._pending:
            self._consumer.write(self._pending)
            self._pending = b""


class ResumingBody:
    """
    A L{hammal.stream.BodySource} for upstream's C{200} answer with a whole
    blob, C{response}, its body unread; bytes lost to a broken transfer are
    asked for again through C{start_upstream} (from an offset), at most
    C{resumes} times. Every segment is bounded by C{idle_timeout} of
    silence and by C{min_rate} bytes per second over windows of it.
    """

    def __init__(
        self,
        response: IResponse,
        start_upstream: StartUpstream,
        clock: IReactorTime,
        idle_timeout: float,
        digest: Digest,
        resumes: int,
        upstream: str,
        min_rate: int = DEFAULT_MIN_RATE,
    ) -> None:
        self._response = response
        self._start_upstream = start_upstream
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._digest = digest
        self._resumes = resumes
        self._upstream = upstream
        self._min_rate = min_rate
        self._pipe: BodyPipe | None = None
        self._tail: UpstreamTail | None = None
        self._stopped = False

    def deliver(self, consumer: IConsumer) -> Deferred[int]:
        return Deferred.fromCoroutine(self._relay(_Verifying(consumer, self._digest)))

    async def _relay(self, out: _Verifying) -> int:
        total = expected_length(self._response)
        pipe = BodyPipe(
            out, self._clock, self._idle_timeout, total, None, self._upstream, self._min_rate
        )
        self._pipe = pipe
        self._response.deliverBody(pipe)
        segment: Deferred[int] = pipe.done
        resumes_left = self._resumes
        while True:
            try:
                await segment
                break
            except CancelledError:
                if self._stopped:
                    raise TransferBroken("the transfer was stopped")
                raise
            except (TransferBroken, UpstreamTimeout) as broken:
                if self._stopped or total is None or resumes_left <= 0 or out.received >= total:
                    raise
                resumes_left -= 1
                _log.info(
                    "resuming uncached {digest} at byte {offset}: {reason}",
                    digest=str(self._digest),
                    offset=out.received,
                    reason=broken.message,
                )
                tail = UpstreamTail(
                    self._start_upstream,
                    self._clock,
                    self._idle_timeout,
                    self._upstream,
                    out.received,
                    total,
                    min_rate=self._min_rate,
                )
                self._tail = tail
                segment = tail.deliver(out)
        if total is not None and out.received != total:
            raise TransferBroken(f"{self._upstream} sent {out.received} of {total} bytes")
        out.finish(self._upstream)
        return out.received

    def stop(self) -> None:
        self._stopped = True
        if self._tail is not None:
            self._tail.stop()
        elif self._pipe is not None:
            self._pipe.stopProducing()
        else:
            # Never delivered: drop the body rather than leave its connection waiting.
            UpstreamBody(
                self._response, self._clock, self._idle_timeout, None, self._upstream
            ).stop()
