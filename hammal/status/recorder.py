"""
The status recorder: turns finished requests into per-minute counters and
per-repository totals for the status page.

The web layer calls L{StatusRecorder.request_finished} once per request
(where it writes the access log); bytes received from upstream are read
from hammal's own counter, so that transfers that go on after their
clients left are counted too.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.interfaces import IReactorTime

from hammal import metrics
from hammal.status.ring import DAY_MINUTES, MinuteRing
from hammal.status.top import TopRepositories

#: Cache outcomes whose body came from the cache (a transfer another client
#: started counts: upstream sent those bytes once for everyone).
FROM_CACHE = frozenset({"hit", "coalesced", "revalidated", "stale"})

#: Cache outcomes whose body was fetched upstream for this request.
FROM_UPSTREAM = frozenset({"miss", "bypass"})

#: Routes that name a repository.
_REPOSITORY_ROUTES = frozenset({"manifest", "blob", "tags"})

#: The per-minute counters kept for a day.
FIELDS = (
    "requests",
    "errors",
    "pulls",
    "cache_hits",
    "cache_lookups",
    "bytes_sent",
    "bytes_from_cache",
    "bytes_from_upstream",
)


#: How often (seconds) finished requests move upstream bytes into the ring.
CATCH_UP_INTERVAL = 5.0


def _upstream_bytes_counter() -> float:
    """
    hammal_upstream_bytes_total, read directly: the registry's public
    C{get_sample_value} collects every metric (over 100 us a call).
    """
    value = getattr(metrics.upstream_bytes, "_value", None)
    if value is not None:
        return float(value.get())
    return metrics.REGISTRY.get_sample_value("hammal_upstream_bytes_total") or 0.0


class StatusRecorder:
    """
    Keeps the last day of activity in fixed-size memory.

    @param upstream_bytes: reads the running total of body bytes received
        from upstream (hammal's counter by default).
    """

    def __init__(
        self,
        clock: IReactorTime,
        upstream_bytes: Callable[[], float] = _upstream_bytes_counter,
        minutes: int = DAY_MINUTES,
    ) -> None:
        self.clock = clock
        self.started_at = clock.seconds()
        self.minutes = MinuteRing(FIELDS, minutes)
        self.repositories = TopRepositories()
        self._upstream_bytes = upstream_bytes
        self._upstream_seen = upstream_bytes()
        self._caught_up_at = self.started_at
        self._last_request_at = self.started_at

    def catch_up(self, at: float | None = None) -> None:
        """
        Move upstream bytes received since the last look into the minute
        of C{at} (default: now).
        """
        now = self.clock.seconds()
        self._caught_up_at = now
        total = self._upstream_bytes()
        received, self._upstream_seen = total - self._upstream_seen, total
        if received > 0:
            self.minutes.add(now if at is None else at, bytes_from_upstream=received)

    def request_finished(
        self,
        route: str,
        method: str,
        status: int,
        sent: int,
        cache: str,
        upstream: str,
        repository: str,
    ) -> None:
        """
        Count one finished request to the registry API.

        @param route: the route kind (C{"-"} outside ``/v2/``: not counted).
        @param cache: the cache outcome (C{"hit"}, C{"miss"}, ... or C{"-"}).
        @param repository: the repository as upstream names it, if any.
        """
        if route == "-":
            return
        now = self.clock.seconds()
        previous, self._last_request_at = self._last_request_at, now
        if now // 60 != previous // 60:
            # A new minute: what arrived since the last look belongs to the
            # requests of the previous one.
            self.catch_up(at=previous)
        elif now - self._caught_up_at >= CATCH_UP_INTERVAL:
            self.catch_up()
        pull = int(route == "manifest" and method == "GET" and 200 <= status < 300)
        from_cache = cache in FROM_CACHE
        looked_up = from_cache or cache in FROM_UPSTREAM
        self.minutes.add(
            now,
            requests=1,
            errors=int(status >= 500),
            pulls=pull,
            cache_hits=int(from_cache),
            cache_lookups=int(looked_up),
            bytes_sent=sent,
            bytes_from_cache=sent if from_cache else 0,
        )
        if repository and route in _REPOSITORY_ROUTES and status < 400:
            self.repositories.add(now, upstream, repository, pull, sent)
