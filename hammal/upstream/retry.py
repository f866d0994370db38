"""
Exponential backoff with full jitter, on an injected clock.

See "Exponential Backoff And Jitter" (AWS architecture blog): the delay
before retry ``n`` is uniform in ``[0, min(cap, base * 2**n)]``, which
spreads a thundering herd of clients instead of synchronising it.
"""

from __future__ import annotations

import random
from datetime import timezone
from email.utils import parsedate_to_datetime
from typing import Callable

import attrs
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime


@attrs.frozen
class RetryPolicy:
    """
    How often and how patiently upstream calls are retried.

    @ivar retries: retries after the first attempt.
    @ivar base: base delay in seconds.
    @ivar cap: the longest backoff delay.
    @ivar max_retry_after: the longest ``Retry-After`` hammal waits out; a
        longer one ends the retries at once and is passed to the client.
    """

    retries: int = 3
    base: float = 0.5
    cap: float = 20.0
    max_retry_after: float = 10.0
    random: Callable[[], float] = attrs.field(default=random.random, eq=False)

    def backoff(self, retry: int) -> float:
        """The delay before retry number C{retry} (0 for the first)."""
        return self.random() * min(self.cap, self.base * (2 ** min(retry, 62)))

    def delay(self, retry: int, retry_after: float | None) -> float | None:
        """
        The delay before retry C{retry}, honouring upstream's C{retry_after};
        L{None} when no retry should be made.
        """
        if retry >= self.retries:
            return None
        if retry_after is not None:
            if retry_after > self.max_retry_after:
                return None
            return max(retry_after, self.backoff(retry))
        return self.backoff(retry)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """
    Seconds to wait from a ``Retry-After`` header (delay-seconds or an
    HTTP date), or L{None} if absent or unparseable.
    """
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:  # RFC 9110: HTTP dates are always GMT
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - now)


def sleep(clock: IReactorTime, seconds: float) -> Deferred[None]:
    """A cancellable L{Deferred} that fires after C{seconds} on C{clock}."""
    return task.deferLater(clock, seconds, lambda: None)
