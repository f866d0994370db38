"""
Who may use hammal: user directories for HTTP Basic credentials.

A directory answers one question, "are these credentials good?", so the web
layer need not know whether users come from the command line or from an
htpasswd file. Password checks are written so that their duration does not
tell an attacker which half of the credentials was wrong, or whether a user
exists.

bcrypt is deliberately slow (about 0.2 s at cost 12), so every directory also
offers C{check_in_thread}: the web layer calls that and the event loop never
waits on a hash.
"""

from __future__ import annotations

import binascii
import hmac
import os
import re
import threading
from collections import Counter
from typing import Iterable, Protocol

import bcrypt
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

#: bcrypt only looks at this many bytes of a password.
BCRYPT_MAX_PASSWORD_BYTES = 72

# The hash formats CNCF Distribution's htpasswd backend accepts (Go's
# bcrypt reads all three prefixes the same way).
_BCRYPT_HASH = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}\Z")

# The salt and digest part of a real cost-4 hash. A dummy hash made of it and
# any cost takes exactly as long to check as a real hash of that cost, and
# never matches anything a client can send, because it was made from a
# password that is thrown away.
_DUMMY_TAIL = "mb8I1hi7FLnZlznXB7E4teRT.jjHUEIl0hOpFFdmDXZti3SfDJEGe"

#: The cost of the dummy hash when the file has no user to copy it from.
_DEFAULT_COST = 10


class UserDirectory(Protocol):
    """
    A set of users with passwords: the one thing the web layer asks of
    L{SingleUser}, L{HtpasswdFile} and L{AllowList}.
    """

    def check(self, username: str, password: str) -> bool:
        """Whether C{password} is C{username}'s password."""


class ThreadedUserDirectory(UserDirectory, Protocol):
    """
    A L{UserDirectory} that can check off the reactor thread. Every
    directory in this module is one.
    """

    def check_in_thread(
        self,
        username: str,
        password: str,
        reactor: IReactorThreads,
        pool: ThreadPool | None = None,
    ) -> Deferred[bool]:
        """L{check}, without blocking the event loop (on C{pool}, if given)."""


def check_in_thread(
    directory: UserDirectory,
    username: str,
    password: str,
    reactor: IReactorThreads,
    pool: ThreadPool | None = None,
) -> Deferred[bool]:
    """
    Check credentials against any L{UserDirectory} without blocking the
    event loop: its own C{check_in_thread} when it has one, else its
    C{check} on C{pool} (by default the reactor's thread pool).
    """
    threaded = getattr(directory, "check_in_thread", None)
    if threaded is not None:
        result: Deferred[bool] = threaded(username, password, reactor, pool)
        return result
    return deferToThreadPool(
        reactor, pool or reactor.getThreadPool(), directory.check, username, password
    )


def _utf8(text: str) -> bytes:
    # surrogatepass: a str that is not valid Unicode must fail to match,
    # never raise.
    return text.encode("utf-8", "surrogatepass")


class SingleUser:
    """
    The one user given by C{--auth-user} and C{--auth-password}.

    Both halves are compared in constant time, and both are always compared,
    so the response time does not say whether the username was right.

    @raise ValueError: for an empty username or password, or a username
        with a colon (HTTP Basic could never send it).
    """

    def __init__(self, username: str, password: str) -> None:
        if not username or not password:
            raise ValueError("the auth user needs a non-empty name and password")
        if ":" in username:
            raise ValueError("the auth user name cannot contain ':' (HTTP Basic splits on it)")
        self._username = _utf8(username)
        self._password = _utf8(password)

    def check(self, username: str, password: str) -> bool:
        # Look compare_digest up on the module at call time (and not with
        # `from hmac import ...`) so tests can watch it being used.
        user_ok = hmac.compare_digest(_utf8(username), self._username)
        password_ok = hmac.compare_digest(_utf8(password), self._password)
        # `&`, not `and`: no short circuit.
        return user_ok & password_ok

    def check_in_thread(
        self,
        username: str,
        password: str,
        reactor: IReactorThreads,
        pool: ThreadPool | None = None,
    ) -> Deferred[bool]:
        """L{check} is cheap here; no thread is needed."""
        return succeed(self.check(username, password))


def _bcrypt_matches(password: str, hashed: bytes) -> bool:
    """
    Whether C{password} matches the bcrypt hash C{hashed}; runs in a pool
    thread.

    Passwords are cut to bcrypt's 72 bytes, as Apache's htpasswd did when it
    made the hash and as CNCF Distribution does when it checks it (newer
    bcrypt libraries raise instead).
    """
    try:
        return bcrypt.checkpw(_utf8(password)[:BCRYPT_MAX_PASSWORD_BYTES], hashed)
    except ValueError:
        return False


def _dummy_hash(cost: int) -> bytes:
    return f"$2b${cost:02d}${_DUMMY_TAIL}".encode("ascii")


class HtpasswdFile:
    """
    The users of an Apache htpasswd file, in the format CNCF Distribution
    accepts: C{user:$2y$...} (or C{$2a$}, C{$2b$}) bcrypt lines; blank lines
    and lines starting with C{#} are skipped.

    Lines with any other hash (MD5, SHA-1, crypt, plain text) are ignored
    with one warning each at load: they are weak, and Distribution would
    refuse them too.

    The file is read again when its modification time, size or inode change,
    so users can be added without a restart. C{check} looks at the file at
    most once every C{reload_interval} seconds of C{clock}. If it cannot be
    read later on, the users read last stay in force and a warning is logged.

    @raise ValueError: if the file cannot be read at construction.
    """

    log = Logger()

    def __init__(self, path: str, clock: IReactorTime, reload_interval: float = 1.0) -> None:
        self._path = path
        self._clock = clock
        self._reload_interval = reload_interval
        self._lock = threading.Lock()
        self._users: dict[str, bytes] = {}
        self._dummy = _dummy_hash(_DEFAULT_COST)
        self._stamp: tuple[int, int, int] | None = None
        self._failing: str | None = None
        try:
            self._load()
        except OSError as failure:
            raise ValueError(
                f"cannot read htpasswd file {path}: {failure.strerror or failure}"
            ) from None
        self._checked_at = clock.seconds()

    @property
    def version(self) -> object:
        """
        Changes whenever the users read from the file change (checked as
        often as L{check} would), so that remembered checks can be dropped.
        """
        self._maybe_reload()
        return self._stamp

    @property
    def usernames(self) -> frozenset[str]:
        """The users with a usable (bcrypt) password, as last read."""
        return frozenset(self._users)

    def _load(self) -> None:
        """Read and parse the file; raise L{OSError} if it cannot be read."""
        with open(self._path, "rb") as handle:
            stamp = _stamp(os.fstat(handle.fileno()))
            data = handle.read()
        self._users = self._parse(data)
        self._dummy = _dummy_hash(_usual_cost(self._users.values()))
        self._stamp = stamp

    def _parse(self, data: bytes) -> dict[str, bytes]:
        users: dict[str, bytes] = {}
        # surrogateescape: a name that is not UTF-8 stays in the file but
        # can never equal a name decoded from a request.
        text = data.decode("utf-8", "surrogateescape")
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            username, colon, hashed = line.partition(":")
            if not colon or not username:
                # No name to report, and the line may be a password.
                self.log.warn(
                    "htpasswd file {path} line {line}: not 'user:hash'; ignored",
                    path=self._path,
                    line=number,
                )
                continue
            if _BCRYPT_HASH.match(hashed) is None:
                self.log.warn(
                    "htpasswd file {path} line {line}: user {user!r} has no bcrypt hash;"
                    " ignored (create it with htpasswd -B)",
                    path=self._path,
                    line=number,
                    user=username,
                )
                continue
            users[username] = hashed.encode("ascii")
        if not users:
            self.log.warn("htpasswd file {path} has no bcrypt users", path=self._path)
        return users

    def _maybe_reload(self) -> None:
        """
        Read the file again if it changed, at most once per interval.

        This runs on the caller's thread (the reactor's, with
        C{check_in_thread}): a stat, and rarely a read, of a small file.
        """
        now = self._clock.seconds()
        if now - self._checked_at < self._reload_interval:
            return
        with self._lock:
            if now - self._checked_at < self._reload_interval:
                return
            self._checked_at = now
            try:
                if _stamp(os.stat(self._path)) == self._stamp:
                    self._recovered()
                    return
                self._load()
            except OSError as failure:
                reason = failure.strerror or str(failure)
                if reason != self._failing:
                    self._failing = reason
                    self.log.warn(
                        "cannot read htpasswd file {path} ({reason});"
                        " keeping the {count} users read before",
                        path=self._path,
                        reason=reason,
                        count=len(self._users),
                    )
                return
            self._recovered()
            self.log.info(
                "htpasswd file {path} reloaded: {count} users",
                path=self._path,
                count=len(self._users),
            )

    def _recovered(self) -> None:
        if self._failing is not None:
            self._failing = None
            self.log.info("htpasswd file {path} is readable again", path=self._path)

    def _lookup(self, username: str) -> tuple[bytes, bool]:
        """
        The hash to check C{username}'s password against, and whether the
        user exists. Unknown users get the dummy hash, so that checking
        them costs the same as checking a wrong password.
        """
        self._maybe_reload()
        hashed = self._users.get(username)
        if hashed is None:
            return self._dummy, False
        return hashed, True

    def check(self, username: str, password: str) -> bool:
        hashed, known = self._lookup(username)
        matches = _bcrypt_matches(password, hashed)
        return known and matches

    def check_in_thread(
        self,
        username: str,
        password: str,
        reactor: IReactorThreads,
        pool: ThreadPool | None = None,
    ) -> Deferred[bool]:
        """
        L{check} with the bcrypt work on C{pool} (by default C{reactor}'s
        thread pool); the user lookup (and any reload) stays on the calling
        thread.
        """
        hashed, known = self._lookup(username)
        d = deferToThreadPool(
            reactor, pool or reactor.getThreadPool(), _bcrypt_matches, password, hashed
        )
        return d.addCallback(lambda matches: known and matches)


def _stamp(status: os.stat_result) -> tuple[int, int, int]:
    return (status.st_mtime_ns, status.st_size, status.st_ino)


def _usual_cost(hashes: Iterable[bytes]) -> int:
    """
    The most common cost among C{hashes} (the highest on a tie): the cost
    of the dummy hash, so that unknown users take as long as most users.
    """
    costs = Counter(int(hashed[4:6]) for hashed in hashes)
    if not costs:
        return _DEFAULT_COST
    return max(costs, key=lambda cost: (costs[cost], cost))


def parse_user_list(text: str) -> frozenset[str]:
    """
    The names in a comma-separated option value such as C{--allow-users
    alice,bob}; blanks around names are dropped.
    """
    return frozenset(name.strip() for name in text.split(",") if name.strip())


class AllowList:
    """
    A L{UserDirectory} that admits only some of another directory's users
    (C{--allow-users}): a user outside the list is refused even with the
    right password.

    The wrapped directory is asked in every case, so a refusal takes as long
    as a wrong password and does not reveal who is on the list.

    @param allowed: the admitted names; L{None} admits every user.
    @raise ValueError: if C{allowed} is given but empty (it would lock
        everyone out, which is better said at startup).
    """

    log = Logger()

    def __init__(self, directory: UserDirectory, allowed: Iterable[str] | None = None) -> None:
        self._directory = directory
        self._allowed = None if allowed is None else frozenset(allowed)
        if self._allowed is not None and not self._allowed:
            raise ValueError("the list of allowed users is empty")

    def _admit(self, username: str, valid: bool) -> bool:
        if not valid:
            return False
        if self._allowed is not None and username not in self._allowed:
            self.log.info("user {user!r} is not in the allowed users; refused", user=username)
            return False
        return True

    def check(self, username: str, password: str) -> bool:
        return self._admit(username, self._directory.check(username, password))

    @property
    def version(self) -> object:
        """The wrapped directory's version (see L{HtpasswdFile.version})."""
        return getattr(self._directory, "version", None)

    def check_in_thread(
        self,
        username: str,
        password: str,
        reactor: IReactorThreads,
        pool: ThreadPool | None = None,
    ) -> Deferred[bool]:
        d = check_in_thread(self._directory, username, password, reactor, pool)
        return d.addCallback(lambda valid: self._admit(username, valid))


def parse_basic(header: bytes | None) -> tuple[str, str] | None:
    """
    The C{(username, password)} in an C{Authorization: Basic ...} value, or
    L{None} for anything else: a missing header, another scheme, bad
    base64, no colon, an empty username, or text that is not UTF-8.

    It never raises: a client's malformed header is a refusal, not an
    error. The password may contain colons; the username cannot (RFC 7617).
    """
    if not header:
        return None
    parts = header.split(None, 1)
    if len(parts) != 2 or parts[0].lower() != b"basic":
        return None
    try:
        # strict_mode: no characters outside the alphabet, no data after
        # the padding.
        decoded = binascii.a2b_base64(parts[1].strip(), strict_mode=True).decode("utf-8")
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
        return None
    username, colon, password = decoded.partition(":")
    if not colon or not username:
        return None
    return username, password
