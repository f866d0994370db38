"""
A pool of upstream accounts (``--upstream-credentials-file``): Docker Hub
counts pulls per account, so several accounts give several allowances.

Token requests ask the pool for "the credentials to use now": the first
account that is not resting. An account rests when upstream says its
allowance is spent: a ``429`` (to its token request or to a request made
with its token), or ``ratelimit-remaining: 0``. It rests until its window
resets (``Retry-After``, else ``ratelimit-reset``, else the ``w=`` window of
``ratelimit-remaining``/``ratelimit-limit``); then it is first in line again.
When every account rests, the pool has nothing to offer and hammal asks for
anonymous tokens; when those are refused too, the manifest cache serves
what it has (stale-if-error).

The file holds one ``USER:PASSWORD`` (or ``USER:ACCESS_TOKEN``) a line;
blank lines and ``#`` comments are skipped. It is read again when it
changes (checked at most once a second); an unreadable or empty new version
keeps the accounts read last. Secrets are never logged nor exported: the
metrics name accounts by user name only.
"""

from __future__ import annotations

import os
from typing import Sequence

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from hammal import metrics
from hammal.upstream.auth import Credentials
from hammal.upstream.quota import QUOTAS, QuotaBoard
from hammal.upstream.retry import parse_retry_after

#: How long an account rests when upstream says its allowance is spent but
#: not for how long (Docker Hub's window is 6 hours; an hour is a guess that
#: neither hammers upstream nor wastes an account for long).
DEFAULT_REST = 3600.0

#: The longest rest believed from upstream's headers.
MAX_REST = 24 * 3600.0


class AccountsFileError(ValueError):
    """The accounts file cannot be used at start-up."""


def parse_accounts(text: str, path: str = "<accounts>") -> list[Credentials]:
    """
    The accounts of a credentials file.

    @raise AccountsFileError: for a line that is not ``USER:SECRET``
        (reported by line number only: the line may hold a secret).
    """
    accounts: list[Credentials] = []
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, colon, secret = line.partition(":")
        user, secret = user.strip(), secret.strip()
        if not colon or not user or not secret:
            raise AccountsFileError(f"{path} line {number}: expected USER:PASSWORD")
        if user in seen:
            raise AccountsFileError(f"{path} line {number}: account {user!r} is listed twice")
        seen.add(user)
        accounts.append(Credentials(user, secret))
    return accounts


def _rest_from(headers: Headers, now: float) -> float | None:
    """Seconds until a spent allowance resets, as upstream's headers say."""
    retry_after = parse_retry_after(_first(headers, b"retry-after"), now)
    if retry_after is not None:
        return retry_after
    reset = _first(headers, b"ratelimit-reset")
    if reset is not None:
        value = reset.split(";", 1)[0].strip()
        if value.isdigit():
            return float(value)
    for name in (b"ratelimit-remaining", b"ratelimit-limit"):
        window = _window(_first(headers, name))
        if window is not None:
            return window
    return None


def remaining_of(headers: Headers) -> int | None:
    """``ratelimit-remaining: 76;w=21600`` → 76."""
    value = _first(headers, b"ratelimit-remaining")
    if value is None:
        return None
    count = value.split(";", 1)[0].strip()
    return int(count) if count.isdigit() else None


def _window(value: str | None) -> float | None:
    if value is None:
        return None
    for part in value.split(";")[1:]:
        key, _, number = part.strip().partition("=")
        if key.strip() == "w" and number.strip().isdigit():
            return float(number.strip())
    return None


def _first(headers: Headers, name: bytes) -> str | None:
    values = headers.getRawHeaders(name)
    return values[0].decode("latin-1") if values else None


class AccountPool:
    """
    Upstream accounts taken in order, each resting while its allowance is
    spent.

    @param accounts: the initial accounts, or use L{AccountsFile}.
    @param upstream: the upstream's ``host[:port]``, for logs and metrics.
    """

    log = Logger()

    def __init__(
        self,
        accounts: Sequence[Credentials],
        clock: IReactorTime,
        upstream: str,
        quotas: QuotaBoard = QUOTAS,
    ) -> None:
        self._clock = clock
        self._upstream = upstream
        #: What the status page shows of each account (by its non-secret identity).
        self._quotas = quotas
        self._accounts: list[Credentials] = []
        self._resting: dict[str, float] = {}
        self.replace(accounts)

    @property
    def accounts(self) -> list[Credentials]:
        """The accounts, in order."""
        return list(self._accounts)

    def replace(self, accounts: Sequence[Credentials]) -> None:
        """Use C{accounts} from now on; accounts kept keep resting."""
        names = {account.username for account in accounts}
        for old in self._accounts:
            if old.username not in names:
                self._resting.pop(old.username, None)
                _forget_gauges(self._upstream, old.username)
        self._accounts = list(accounts)
        for account in self._accounts:
            self._quotas.register(self._upstream, account.identity)
            metrics.upstream_account_resting.labels(self._upstream, account.username).set(
                1 if self._rests(account) else 0
            )

    def _rests(self, account: Credentials) -> bool:
        until = self._resting.get(account.username)
        return until is not None and until > self._clock.seconds()

    def current(self) -> Credentials | None:
        """The credentials to use now: the first account not resting, or L{None}."""
        for account in self._accounts:
            if self._rests(account):
                continue
            if account.username in self._resting:
                del self._resting[account.username]
                metrics.upstream_account_resting.labels(self._upstream, account.username).set(0)
                self._quotas.rest(self._upstream, account.identity, None)
                self.log.info(
                    "upstream account {account} at {upstream} is usable again",
                    account=account.username,
                    upstream=self._upstream,
                )
            return account
        return None

    def rest(self, account: Credentials, seconds: float | None, reason: str) -> None:
        """Leave C{account} aside for C{seconds} (L{DEFAULT_REST} if unknown)."""
        if account.username not in {a.username for a in self._accounts}:
            return
        seconds = DEFAULT_REST if seconds is None else min(max(seconds, 1.0), MAX_REST)
        self._resting[account.username] = self._clock.seconds() + seconds
        metrics.upstream_account_resting.labels(self._upstream, account.username).set(1)
        self._quotas.rest(self._upstream, account.identity, self._resting[account.username])
        following = self.current()
        self.log.warn(
            "upstream account {account} at {upstream} rests {seconds:.0f}s ({reason});"
            " now using {following}",
            account=account.username,
            upstream=self._upstream,
            seconds=seconds,
            reason=reason,
            following=following.username if following else "anonymous tokens",
        )

    def observe(self, account: Credentials, status: int, headers: Headers) -> bool:
        """
        Learn from a response to a request made as C{account}: its remaining
        allowance, and whether it must rest. Returns whether it was put to
        rest (so a retry will use another identity).
        """
        now = self._clock.seconds()
        remaining = remaining_of(headers)
        if remaining is not None:
            metrics.upstream_account_remaining.labels(self._upstream, account.username).set(
                remaining
            )
        if status == 429:
            self.rest(account, _rest_from(headers, now), "HTTP 429")
            return True
        if remaining == 0:
            self.rest(account, _rest_from(headers, now), "ratelimit-remaining 0")
            return True
        return False


def _forget_gauges(upstream: str, username: str) -> None:
    for gauge in (metrics.upstream_account_remaining, metrics.upstream_account_resting):
        try:
            gauge.remove(upstream, username)
        except KeyError:
            pass


class AccountsFile:
    """
    Keeps an L{AccountPool} in step with its file.

    @raise AccountsFileError: when the file cannot be read or holds no
        account at start-up.
    """

    log = Logger()

    def __init__(
        self, path: str, pool: AccountPool, clock: IReactorTime, reload_interval: float = 1.0
    ) -> None:
        self._path = path
        self._pool = pool
        self._clock = clock
        self._reload_interval = reload_interval
        self._stamp: tuple[int, int, int] | None = None
        try:
            accounts = self._read()
        except OSError as failure:
            raise AccountsFileError(f"cannot read {path}: {failure.strerror or failure}") from None
        if not accounts:
            raise AccountsFileError(f"{path} lists no account")
        pool.replace(accounts)
        self._checked_at = clock.seconds()

    @classmethod
    def load(cls, path: str, clock: IReactorTime, upstream: str) -> AccountsFile:
        """A pool read from C{path}, kept in step with it."""
        return cls(path, AccountPool([], clock, upstream), clock)

    @property
    def pool(self) -> AccountPool:
        return self._pool

    def _read(self) -> list[Credentials]:
        with open(self._path, encoding="utf-8") as handle:
            status = os.fstat(handle.fileno())
            text = handle.read()
        accounts = parse_accounts(text, self._path)
        self._stamp = (status.st_mtime_ns, status.st_size, status.st_ino)
        return accounts

    def _changed(self) -> bool:
        try:
            status = os.stat(self._path)
        except OSError:
            return True
        return (status.st_mtime_ns, status.st_size, status.st_ino) != self._stamp

    def check(self) -> None:
        """Re-read the file if it changed (at most once per reload interval)."""
        now = self._clock.seconds()
        if now - self._checked_at < self._reload_interval:
            return
        self._checked_at = now
        if not self._changed():
            return
        try:
            accounts = self._read()
        except (OSError, AccountsFileError) as failure:
            message = failure.strerror if isinstance(failure, OSError) else str(failure)
            self.log.warn(
                "cannot re-read upstream accounts {path} ({error}); keeping {count} accounts",
                path=self._path,
                error=message,
                count=len(self._pool.accounts),
            )
            return
        if not accounts:
            self.log.warn("{path} lists no account now; keeping the previous ones", path=self._path)
            return
        self._pool.replace(accounts)
        self.log.info(
            "read {count} upstream accounts from {path}", count=len(accounts), path=self._path
        )

    def current(self) -> Credentials | None:
        """L{AccountPool.current}, after looking at the file."""
        self.check()
        return self._pool.current()

    def observe(self, account: Credentials, status: int, headers: Headers) -> bool:
        return self._pool.observe(account, status, headers)
