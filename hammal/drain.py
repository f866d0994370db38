"""
Graceful shutdown: on SIGTERM twistd stops the listening port at once;
this service then holds the shutdown until in-flight requests finish, or
until the drain timeout passes.
"""

from __future__ import annotations

from typing import Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from hammal.web.health import Readiness


class DrainService(Service):
    """
    Waits, when stopped, for C{in_flight()} to reach zero (checked every
    C{interval}) for at most C{timeout} seconds; readiness fails from the
    first moment.
    """

    log = Logger()

    def __init__(
        self,
        readiness: Readiness,
        in_flight: Callable[[], int],
        clock: IReactorTime,
        timeout: float,
        interval: float = 0.1,
    ) -> None:
        self._readiness = readiness
        self._in_flight = in_flight
        self._clock = clock
        self._timeout = timeout
        self._interval = interval

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._readiness.draining = True
        done: Deferred[None] = Deferred()
        deadline = self._clock.seconds() + self._timeout
        self.log.info(
            "draining {count} in-flight requests (up to {timeout:g}s)",
            count=self._in_flight(),
            timeout=self._timeout,
        )

        def check() -> None:
            remaining = self._in_flight()
            if remaining == 0 or self._clock.seconds() >= deadline:
                if remaining:
                    self.log.warn("drain timeout: closing {count} requests", count=remaining)
                poll.stop()

        poll = LoopingCall(check)
        poll.clock = self._clock
        poll.start(self._interval, now=True).addCallback(lambda _: done.callback(None))
        return done
