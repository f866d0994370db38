"""
The least an upstream blob body must bring: ``--upstream-min-rate`` bytes
per second, judged over windows of ``--read-timeout`` seconds.

The read timeout bounds upstream's silence only: a body that trickles a
byte now and then is never silent for long, and would keep its fill, every
client coalesced on it and a pump thread busy for ever (or, uncached, the
client's request and its upstream connection). A deadline for the
whole body would cut a large layer over a slow link that is legitimately
hours long. So, like curl's C{--speed-limit}/C{--speed-time}: once a body
has been received for a whole window, what arrived in that window must
reach C{rate x window} bytes, else the transfer is given up as an upstream
timeout (L{UpstreamTimeout}), which each reader handles as it handles
silence: a fill, and a blob relayed uncached
(L{hammal.pull.resuming.ResumingBody}), resume with C{Range}, then fail
(a 504, or a body cut short) when the resumes are spent;
L{hammal.stream.BodyPipe} and the cache's bypass
(L{hammal.cache.bypass.UpstreamTail}) fail the transfer.

Windows follow each other: each is judged when it ends (or, on a pump
thread, at the first look after its end) on the bytes and the seconds since
the previous one. A window in which hammal itself held upstream back (its
writer behind, or the client: backpressure) is not judged: it starts
afresh when reading resumes.

L{RateFloor} is the arithmetic, on any clock (pump threads pass their
monotonic one); L{RateWatch} runs it on the reactor's clock for a body
read on the event loop.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from hammal.errors import UpstreamTimeout

__all__ = ["DEFAULT_MIN_RATE", "RateFloor", "RateWatch"]

#: Bytes per second, by default (``--upstream-min-rate``).
DEFAULT_MIN_RATE = 1024


class RateFloor:
    """
    Judges a body's progress, C{count} bytes so far, at times C{now} (in
    seconds on one clock): each window of at least C{window} seconds must
    bring C{rate x} its length in bytes. A C{rate} of 0 judges nothing.
    """

    def __init__(
        self, rate: float, window: float, upstream: str, now: float, count: int = 0
    ) -> None:
        self.rate = rate
        self.window = window
        self._upstream = upstream
        self._since = now
        self._counted = count

    @property
    def enabled(self) -> bool:
        """Whether there is a floor at all."""
        return self.rate > 0 and self.window > 0

    def due(self) -> float | None:
        """When the current window ends (L{None}: never judged)."""
        return self._since + self.window if self.enabled else None

    def restart(self, now: float, count: int) -> None:
        """A new window from C{now}, with C{count} bytes so far (after a pause of ours)."""
        self._since = now
        self._counted = count

    def judge(self, now: float, count: int) -> UpstreamTimeout | None:
        """
        L{None} while the body is fast enough (or its window has not
        ended); else the timeout, naming the figures. A window that passed
        starts the next one from C{now}.
        """
        if not self.enabled or now < self._since + self.window:
            return None
        got, span = count - self._counted, now - self._since
        if got < self.rate * span:
            return UpstreamTimeout(
                f"{self._upstream} sent {got} bytes in the last {span:.3g} s,"
                f" below --upstream-min-rate {self.rate:g} B/s"
            )
        self.restart(now, count)
        return None


class RateWatch:
    """
    A L{RateFloor} for a body received on the event loop: counts what
    arrives (L{count}) and calls C{on_slow} with the timeout when a window
    ends short, on the reactor clock C{clock}.
    """

    def __init__(
        self,
        clock: IReactorTime,
        rate: float,
        window: float,
        upstream: str,
        on_slow: Callable[[UpstreamTimeout], None],
    ) -> None:
        self._clock = clock
        self._on_slow = on_slow
        self._received = 0
        self._floor = RateFloor(rate, window, upstream, clock.seconds())
        self._call: IDelayedCall | None = None

    def count(self, size: int) -> None:
        """C{size} more bytes arrived."""
        self._received += size

    def start(self) -> None:
        """Judge from now, a first window from now on (after L{stop}: afresh)."""
        self.stop()
        if not self._floor.enabled:
            return
        self._floor.restart(self._clock.seconds(), self._received)
        self._schedule()

    def stop(self) -> None:
        """Judge no more (the body ended, or hammal holds upstream back)."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _schedule(self) -> None:
        due = self._floor.due()
        if due is not None:
            self._call = self._clock.callLater(max(0.0, due - self._clock.seconds()), self._judge)

    def _judge(self) -> None:
        self._call = None
        slow = self._floor.judge(self._clock.seconds(), self._received)
        if slow is not None:
            self._on_slow(slow)
            return
        self._schedule()
