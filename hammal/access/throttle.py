"""
Repeated failed logins from one address get C{429} for a while.

A password guesser then learns nothing more for L{PENALTY} seconds, and
costs hammal no password hashing while it keeps trying. Addresses are the
client addresses the access rules see (C{X-Forwarded-For} only from a
trusted proxy), and the table is bounded, so a flood of addresses cannot
grow it without end.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from hammal.errors import TooManyRequests
from hammal.lru import trim_oldest

#: Failed logins from one address within L{WINDOW} seconds before it is
#: refused.
LIMIT = 10
WINDOW = 60.0
#: Seconds an address is refused after reaching L{LIMIT}.
PENALTY = 60.0

_MAX_ADDRESSES = 10000


class LoginThrottle:
    """Counts failed logins per client address and refuses the persistent."""

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        limit: int = LIMIT,
        window: float = WINDOW,
        penalty: float = PENALTY,
    ) -> None:
        self._clock = clock
        self._limit = limit
        self._window = window
        self._penalty = penalty
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._refused_until: OrderedDict[str, float] = OrderedDict()

    def check(self, address: str) -> None:
        """
        @raise TooManyRequests: with C{Retry-After}, while C{address} is
            refused.
        """
        until = self._refused_until.get(address)
        if until is None:
            return
        left = until - self._clock.seconds()
        if left <= 0:
            del self._refused_until[address]
            return
        raise TooManyRequests(
            "too many failed logins from this address; retry later",
            headers={"Retry-After": str(math.ceil(left))},
        )

    def failed(self, address: str) -> None:
        """Count a failed login from C{address}."""
        now = self._clock.seconds()
        times = self._failures.pop(address, None) or deque()
        while times and times[0] <= now - self._window:
            times.popleft()
        times.append(now)
        if len(times) < self._limit:
            self._failures[address] = times
            trim_oldest(self._failures, _MAX_ADDRESSES)
            return
        self._refused_until[address] = now + self._penalty
        trim_oldest(self._refused_until, _MAX_ADDRESSES)
        self.log.warn(
            "{count} failed logins from {client} within {window:g}s: refusing it for {penalty:g}s",
            count=len(times),
            client=address,
            window=self._window,
            penalty=self._penalty,
        )
