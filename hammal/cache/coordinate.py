"""
Who fills a blob when several processes share one cache directory.

A L{FillCoordinator} hands out the right to fill a digest (a L{FillLease})
to one process at a time and tells the others who holds it
(L{FillHolder}), so that a blob is fetched from upstream once whichever
process gets the requests. L{LockFileCoordinator} does it for the
processes of one machine (``--workers``) with a lock file per digest;
a cluster-wide coordinator (a lease in Redis) can stand beside it behind
the same interface.

Lock files live in C{<cache>/locks/<algorithm>-<hex>}. The holder has an
exclusive C{flock} on its file and writes into it where its fill's
temporary file is, the blob's size and type (L{FillLease.announce}); it
removes the file, still holding the lock, when the fill ended. A process
that dies holding a lock loses it with its file descriptors: the kernel
releases it, and the next process to ask takes it over. Taking a lock
checks that the file it locked is still the one at the path (the previous
holder may have removed it in between), so two processes never both
believe they hold one digest.

The blob cache asks the lock files first (L{LockFileCoordinator.try_acquire}
and L{LockFileCoordinator.current_holder} answer at once, so a miss never
waits to learn who fills): the machine's one fill per digest. A
cluster-wide coordinator, whose answers take a round trip, fits behind it:
the process holding the local lock then asks the cluster who fills, and
either fetches upstream or streams from the peer that does, while the other
processes of its machine follow its file as usual.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from typing import TYPE_CHECKING, Protocol

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from hammal.reference import Digest

if TYPE_CHECKING:
    from hammal.cache.fetch import BlobFetch

log = Logger()


@attrs.frozen
class FillHolder:
    """
    Who fills a digest now.

    @ivar where: where its bytes can be read while they grow (a temporary
        file on this machine, or a peer's URL); L{None} until the holder
        announced it (it is still waiting for upstream's answer).
    @ivar size: the blob's size, if upstream announced it.
    @ivar content_type: upstream's C{Content-Type}.
    """

    digest: str
    where: str | None = None
    size: int | None = None
    content_type: bytes = b"application/octet-stream"


class FillLease(Protocol):
    """The right to fill one digest, until L{release}."""

    def announce(self, where: str, size: int | None, content_type: bytes) -> None:
        """Tell the others where the growing bytes are."""

    def release(self) -> None:
        """The fill ended (committed or failed): someone else may fill now."""


class FillCoordinator(Protocol):
    """One fill per digest among the processes sharing a cache."""

    def acquire(self, digest: Digest) -> Deferred[FillLease | None]:
        """A lease to fill C{digest}, or L{None} when another process holds it."""

    def holder(self, digest: Digest) -> Deferred[FillHolder | None]:
        """Who fills C{digest} now, or L{None} when nobody does."""


class LockFileCoordinator:
    """Fills coordinated with a C{flock}ed file per digest under C{root}/locks."""

    def __init__(self, root: str) -> None:
        self._folder = os.path.join(root, "locks")

    def open(self) -> None:
        """Create the lock folder."""
        os.makedirs(self._folder, exist_ok=True)

    def path(self, digest: Digest) -> str:
        """The lock file of C{digest}."""
        return os.path.join(self._folder, f"{digest.algorithm}-{digest.hex}")

    def acquire(self, digest: Digest) -> Deferred[FillLease | None]:
        return succeed(self.try_acquire(digest))

    def try_acquire(self, digest: Digest) -> LockLease | None:
        """L{acquire}, answered at once (a lock never waits)."""
        path = self.path(digest)
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:
                self.open()  # the folder was removed (by hand): make it again
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as failure:
                os.close(fd)
                if failure.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    return None
                raise
            if _same_file(fd, path):
                os.ftruncate(fd, 0)
                return LockLease(fd, path, str(digest))
            os.close(fd)  # removed by its previous holder meanwhile: lock the new one

    def holder(self, digest: Digest) -> Deferred[FillHolder | None]:
        return succeed(self.current_holder(digest))

    def current_holder(self, digest: Digest) -> FillHolder | None:
        """L{holder}, answered at once."""
        path = self.path(digest)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as failure:
                if failure.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
            else:
                return None  # nobody holds it (a holder that died left it unlocked)
            announced = os.pread(fd, 64 * 1024, 0)
        finally:
            os.close(fd)
        return _parse(str(digest), announced)


class LockLease:
    """A held lock file (see L{LockFileCoordinator})."""

    def __init__(self, fd: int, path: str, digest: str) -> None:
        self._fd: int | None = fd
        self._path = path
        self.digest = digest

    def announce(self, where: str, size: int | None, content_type: bytes) -> None:
        if self._fd is None:
            return
        text = json.dumps(
            {
                "pid": os.getpid(),
                "where": where,
                "size": size,
                "content_type": content_type.decode("latin-1"),
            }
        ).encode()
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, text + b"\n", 0)
        except OSError as failure:
            # The others cannot follow: they wait for the committed blob.
            log.warn(
                "cannot write the fill lock {path}: {error}",
                path=self._path,
                error=failure.strerror,
            )

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.unlink(self._path)  # still locked: nobody locks a file about to go
        except OSError:
            pass
        os.close(fd)  # releases the lock


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _parse(digest: str, announced: bytes) -> FillHolder:
    """The holder's announcement; a lease not announced (or half written) yet says nothing more."""
    if not announced.endswith(b"\n"):
        return FillHolder(digest)
    try:
        fields = json.loads(announced)
        size = fields.get("size")
        return FillHolder(
            digest,
            str(fields["where"]),
            int(size) if size is not None else None,
            str(fields.get("content_type") or "application/octet-stream").encode("latin-1"),
        )
    except (ValueError, KeyError, TypeError):
        return FillHolder(digest)


def hold_lease(fetch: BlobFetch, lease: FillLease) -> None:
    """
    C{fetch} fills under C{lease}: announce its file once it exists, and
    release the lease when it ended (after the commit, so that a follower
    that sees the lease gone finds the blob stored, or knows it never will be).
    """

    def announce(started: BlobFetch) -> None:
        lease.announce(started.path, started.size, started.content_type)

    fetch.when_started().addCallbacks(announce, lambda _: None)
    fetch.finished.addBoth(lambda _: lease.release())
