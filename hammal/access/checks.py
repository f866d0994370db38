"""
The cost of checking passwords, kept in bounds.

bcrypt is slow on purpose (about 0.2 s at cost 12). Run on the reactor's
shared thread pool, every Basic-authenticated request would queue behind
blob hashing, fsyncs and DNS lookups, and a burst of logins would stall
them. So L{CredentialChecker}:

- hashes on a small pool of its own (L{PasswordHashingPool}), with a bound
  on the checks waiting for it: beyond it, clients are told to retry
  (C{429}) rather than queueing without end;
- remembers a successful check for a short time, keyed by an HMAC of the
  credentials under a key that lives only in this process (the password
  itself is never kept, and the key makes the stored values useless to
  anyone who reads memory dumps or guesses passwords offline); a change
  of the user directory (an htpasswd reload) starts afresh.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.python.threadpool import ThreadPool

from hammal.access.users import UserDirectory, check_in_thread
from hammal.errors import TooManyRequests
from hammal.lru import trim_oldest

#: How long a successful check is remembered.
SUCCESS_TTL = 60.0

#: Threads hashing passwords: enough for a few logins at once, never
#: enough to take the machine's cores from the traffic.
HASHING_THREADS = 2

#: Checks that may wait for a hashing thread before clients get C{429}.
MAX_WAITING_CHECKS = 64

_MAX_REMEMBERED = 10000


class PasswordHashingPool(Service):
    """
    The thread pool password checks run on, started and stopped with
    hammal's services.
    """

    def __init__(self, threads: int = HASHING_THREADS) -> None:
        self.pool = ThreadPool(minthreads=0, maxthreads=threads, name="hammal-password-hashing")

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> Any:
        super().stopService()
        self.pool.stop()


class CredentialChecker:
    """
    Checks Basic credentials against a L{UserDirectory} at a bounded cost.

    @param reactor: delivers results from the hashing threads.
    @param pool: the threads to hash on (L{None}: the reactor's pool).
    """

    def __init__(
        self,
        directory: UserDirectory,
        clock: IReactorTime,
        reactor: IReactorThreads | None = None,
        pool: ThreadPool | None = None,
        success_ttl: float = SUCCESS_TTL,
        max_waiting: int = MAX_WAITING_CHECKS,
    ) -> None:
        self._directory = directory
        self._clock = clock
        self._reactor = reactor
        self._pool = pool
        self._success_ttl = success_ttl
        self._max_waiting = max_waiting
        self._key = secrets.token_bytes(32)
        self._succeeded: OrderedDict[bytes, float] = OrderedDict()
        self._running = 0

    def _fingerprint(self, username: str, password: str) -> bytes:
        version = repr(getattr(self._directory, "version", None))
        message = "\0".join((version, username, password)).encode("utf-8", "surrogatepass")
        return hmac.new(self._key, message, hashlib.sha256).digest()

    async def check(self, username: str, password: str) -> bool:
        """
        Whether the credentials are good.

        @raise TooManyRequests: too many checks are waiting already.
        """
        key = self._fingerprint(username, password)
        expires = self._succeeded.get(key)
        if expires is not None:
            if expires > self._clock.seconds():
                return True
            del self._succeeded[key]
        if self._running >= self._max_waiting:
            raise TooManyRequests(
                "too many logins are being checked; retry shortly", headers={"Retry-After": "1"}
            )
        self._running += 1
        try:
            good = await self._hash_check(username, password)
        finally:
            self._running -= 1
        if good:
            self._succeeded[key] = self._clock.seconds() + self._success_ttl
            trim_oldest(self._succeeded, _MAX_REMEMBERED)
        return good

    def _hash_check(self, username: str, password: str) -> Deferred[bool]:
        if self._reactor is None:
            # Only cheap directories are used without a reactor (tests).
            return Deferred.fromCoroutine(_inline(self._directory, username, password))
        return check_in_thread(self._directory, username, password, self._reactor, self._pool)


async def _inline(directory: UserDirectory, username: str, password: str) -> bool:
    return directory.check(username, password)
