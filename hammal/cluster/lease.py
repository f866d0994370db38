"""
One fill per digest across a cluster: a lease in Redis.

The instance that wins C{SET hammal:v1:lease:<digest> <its URL> NX PX ttl}
fetches the blob from upstream; the others ask L{FillLeases.holder} who does
and stream the growing file from that instance instead of going upstream.
The holder renews the lease while the fill runs (only while it is still its
own: a compare-and-pexpire script), and releases it when the fill ends (a
compare-and-delete script), so a lease can never extend or remove another
instance's. When the holder dies, renewal stops and the key expires within
C{ttl}; one waiting instance then wins C{SET NX} and takes over.

Redis is an optimisation, never a dependency: when it fails or does not
answer within C{timeout}, L{FillLeases.acquire} hands out a I{local} lease
(this instance fills, as it would alone: single-flight per node) and
L{FillLeases.holder} knows no holder. After a failure Redis is left alone
for C{retry_after} seconds so an outage does not slow every fill down.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

KEY_PREFIX = "hammal:v1:lease:"

#: Extend the lease by ARGV[2] ms only if it still holds ARGV[1].
RENEW_SCRIPT = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then "
    "return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end"
)

#: Delete the lease only if it still holds ARGV[1].
RELEASE_SCRIPT = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then "
    "return redis.call('DEL', KEYS[1]) else return 0 end"
)

log = Logger()


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _reason(failure: Failure) -> str:
    return failure.getErrorMessage() or getattr(failure.type, "__name__", "error")


@attrs.frozen
class HeldElsewhere:
    """
    Another instance fills this digest.

    @ivar holder: its advertised internal URL (where peers stream from).
    """

    digest: str
    holder: str


class Lease:
    """
    The right to fill one digest, held until L{release}.

    @ivar shared: C{True} when the lease is in Redis (other instances see
        it); C{False} for a local lease handed out while Redis was
        unreachable.
    @ivar lost: C{True} once a renewal found the key gone or taken by
        another instance (the fill may go on; peers just no longer find it).
    """

    def __init__(self, owner: "FillLeases", digest: str, shared: bool) -> None:
        self._owner = owner
        self.digest = digest
        self.shared = shared
        self.lost = False
        self.released = False
        self._on_lost: list[Callable[[Lease], None]] = []
        self._renewal: LoopingCall | None = None

    def on_lost(self, callback: Callable[["Lease"], None]) -> None:
        """Call C{callback(lease)} if the lease is lost while held."""
        self._on_lost.append(callback)

    def _start_renewing(self, interval: float, clock: IReactorTime) -> None:
        self._renewal = LoopingCall(self._renew)
        self._renewal.clock = clock
        self._renewal.start(interval, now=False)

    def _stop_renewing(self) -> None:
        if self._renewal is not None and self._renewal.running:
            self._renewal.stop()
        self._renewal = None

    def _renew(self) -> Deferred[None]:
        return self._owner._renew(self).addCallback(self._renewed)

    def _renewed(self, still_ours: bool | None) -> None:
        # None: Redis did not answer; keep trying while the key may live.
        if still_ours is False and not self.lost:
            self.lost = True
            self._stop_renewing()
            log.warn("fill lease for {digest} was lost", digest=self.digest)
            for callback in self._on_lost:
                callback(self)

    def release(self) -> Deferred[None]:
        """Stop renewing and delete the lease if it is still ours."""
        if self.released:
            return succeed(None)
        self.released = True
        self._stop_renewing()
        self._owner._forget(self)
        if not self.shared or self.lost:
            return succeed(None)
        return self._owner._release(self)


class FillLeases:
    """
    Per-digest fill leases for one instance.

    @param redis: a txredisapi connection or pool (C{set}, C{get}, C{eval}),
        or L{None} to run alone (every lease is local).
    @param advertise: this instance's internal URL, stored as the holder.
    @param ttl: seconds a lease lives without renewal: how long a dead
        holder's digest waits before another instance takes over.
    @param renew_every: seconds between renewals (default C{ttl / 3}).
    @param timeout: seconds before a Redis call counts as failed.
    @param retry_after: seconds Redis is left alone after a failure.
    """

    def __init__(
        self,
        redis: Any,
        clock: IReactorTime,
        advertise: str,
        ttl: float = 10.0,
        renew_every: float | None = None,
        timeout: float = 1.0,
        retry_after: float = 5.0,
        prefix: str = KEY_PREFIX,
    ) -> None:
        if ttl <= 0:
            raise ValueError("lease ttl must be positive")
        self._redis = redis
        self._clock = clock
        self.advertise = advertise
        self.ttl = ttl
        self.renew_every = renew_every if renew_every is not None else ttl / 3
        self._timeout = timeout
        self._retry_after = retry_after
        self._prefix = prefix
        self._down_until: float | None = None
        # Shared leases this process holds, by digest.
        self._held: dict[str, Lease] = {}

    # Redis health ------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """Whether Redis answered the last call (or none failed yet)."""
        return self._redis is not None and self._down_until is None

    def _usable(self) -> bool:
        if self._redis is None:
            return False
        return self._down_until is None or self._clock.seconds() >= self._down_until

    def _call(self, make: Callable[[], Deferred[Any]]) -> Deferred[Any]:
        """Run one Redis call with a deadline; failures become L{Failure}s."""
        d: Deferred[Any] = maybeDeferred(make)
        return d.addTimeout(self._timeout, self._clock).addCallback(self._succeeded)

    def _succeeded(self, result: Any) -> Any:
        if self._down_until is not None:
            self._down_until = None
            log.info("Redis answers again; fill leases are shared")
        return result

    def _failed(self, failure: Failure, what: str, fallback: Any) -> Any:
        if self._down_until is None:
            log.warn(
                "Redis failed during {what} ({error}); fills are coordinated on this instance only",
                what=what,
                error=_reason(failure),
            )
        self._down_until = self._clock.seconds() + self._retry_after
        return fallback

    def _key(self, digest: str) -> str:
        return self._prefix + digest

    # Public API --------------------------------------------------------

    def acquire(self, digest: str) -> Deferred[Lease | HeldElsewhere]:
        """
        Take the fill lease for C{digest}: a L{Lease} to fill it (shared, or
        local when Redis is unusable), or L{HeldElsewhere} naming the
        instance that fills it. Never fails.

        A lease that names this instance's URL but that this process does
        not hold was left by an earlier run of this instance: it is adopted.
        One that this process holds gives L{HeldElsewhere} with its own URL
        (a second fill of the same digest in one process waits for the
        first).
        """
        return Deferred.fromCoroutine(self._acquire(digest))

    async def _acquire(self, digest: str) -> Lease | HeldElsewhere:
        for _attempt in range(2):
            if not self._usable():
                return Lease(self, digest, shared=False)
            key = self._key(digest)
            won = await self._call(
                lambda: self._redis.set(
                    key,
                    self.advertise,
                    pexpire=max(1, int(self.ttl * 1000)),
                    only_if_not_exists=True,
                )
            ).addErrback(self._failed, "acquire", _FAILED)
            if won is _FAILED:
                return Lease(self, digest, shared=False)
            if won:
                return self._hold(digest)
            holder = await self.holder(digest)
            if holder == self.advertise and digest not in self._held:
                # Left by an earlier run of this instance (killed, then
                # restarted before the TTL ran out): nobody fills it. Adopt
                # it, atomically, unless it changed hands meanwhile.
                if await self._renew_key(digest):
                    log.info(
                        "adopted the fill lease for {digest} left by a previous run", digest=digest
                    )
                    return self._hold(digest)
                continue
            if holder is not None:
                return HeldElsewhere(digest, holder)
            # The lease expired or was released between SET and GET: try again.
        return Lease(self, digest, shared=False)

    def _hold(self, digest: str) -> Lease:
        lease = Lease(self, digest, shared=True)
        self._held[digest] = lease
        lease._start_renewing(self.renew_every, self._clock)
        return lease

    def _forget(self, lease: Lease) -> None:
        if self._held.get(lease.digest) is lease:
            del self._held[lease.digest]

    def holder(self, digest: str) -> Deferred[str | None]:
        """The URL of the instance filling C{digest}, or L{None}."""
        if not self._usable():
            return succeed(None)
        key = self._key(digest)
        d = self._call(lambda: self._redis.get(key))
        return d.addCallbacks(_text, self._failed, errbackArgs=("lookup", None))

    def _renew(self, lease: Lease) -> Deferred[bool | None]:
        d = self._renew_key(lease.digest)

        def lost(still_ours: bool | None) -> bool | None:
            if still_ours is False:
                self._forget(lease)
            return still_ours

        return d.addCallback(lost)

    def _renew_key(self, digest: str) -> Deferred[bool | None]:
        """Extend C{digest}'s lease if it holds our URL (None: Redis failed)."""
        if not self._usable():
            return succeed(None)
        key = self._key(digest)
        ms = max(1, int(self.ttl * 1000))
        d = self._call(lambda: self._redis.eval(RENEW_SCRIPT, [key], [self.advertise, ms]))
        return d.addCallbacks(lambda n: bool(n), self._failed, errbackArgs=("renewal", None))

    def _release(self, lease: Lease) -> Deferred[None]:
        if not self._usable():
            return succeed(None)
        key = self._key(lease.digest)
        d = self._call(lambda: self._redis.eval(RELEASE_SCRIPT, [key], [self.advertise]))
        return d.addCallbacks(lambda _: None, self._failed, errbackArgs=("release", None))


_FAILED = object()
