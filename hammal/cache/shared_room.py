"""
``--cache-max-size`` for a cache directory that several processes share.

Each process's L{BlobStore} indexes the blobs it knows and the room its own
fills reserved; alone, two processes capped at 10 MB would keep up to
20 MB between them. With a L{SharedRoom}, every reservation is decided
under one lock file (C{reservations/.lock}) on what the directory really
holds: the store rescans C{blobs/} (so it also sees, and may evict, the
other processes' blobs, and forgets those they removed), and counts the
room the other live processes reserved for their fills in flight, which
each publishes in C{reservations/<pid>} with a count of the blobs it
added or removed. The rescan happens only when that count, or the set of
processes, moved since the last one: a process alone, or among processes
that changed nothing, decides on its index. A process that died has its
reservation ignored (and removed) at once, whatever it wrote.

The lock is held only while one process decides (a rescan and perhaps
some evictions), never across I/O of a fill.

A reservation is published under the lock, before it is granted. What a
commit or the end of a fill changes is published off the event loop
(C{offload}; a rename can wait tens of milliseconds on a disk busy with
a fill's writes), one write at a time, the latest value winning: until
it lands, the others count this process's old, larger reservation, which
errs on the side of room.
"""

from __future__ import annotations

import fcntl
import os
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger

from hammal.cache.liveness import writer_alive

if TYPE_CHECKING:
    from hammal.cache.store import BlobStore

log = Logger()

_Published = tuple[int, int]


def _in_place(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    return maybeDeferred(f, *args)


class SharedRoom:
    """The room reserved by every process sharing the cache directory C{root}."""

    def __init__(
        self,
        root: str,
        pid: int | None = None,
        alive: Callable[[int], bool] = writer_alive,
        offload: Callable[..., Deferred[Any]] = _in_place,
    ) -> None:
        self._pid = os.getpid() if pid is None else pid
        self._offload = offload
        #: The value to publish: the latest asked for (read by the writing thread).
        self._wanted: _Published | None = None
        #: A publish running on the offload, if any.
        self._publishing: Deferred[_Published | None] | None = None
        #: One write of our file at a time (the event loop's or the offload's).
        self._write_lock = threading.Lock()
        self._alive = alive
        self._folder = os.path.join(root, "reservations")
        self._lock = os.path.join(self._folder, ".lock")
        self._own = os.path.join(self._folder, str(self._pid))
        self._published: tuple[int, int] | None = None
        self._failing = False
        #: The other processes and their changes when the store last rescanned.
        self._seen: tuple[tuple[int, ...], int] | None = ((), 0)

    def open(self) -> None:
        """Create the folder and say that this process uses the directory."""
        os.makedirs(self._folder, exist_ok=True)
        self._published = None
        self.publish(0, 0)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the directory-wide reservation lock (briefly: one decision)."""
        fd = os.open(self._lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def others(self) -> tuple[tuple[int, ...], int, int]:
        """
        The other live processes using the directory, the bytes they
        reserved for their fills in flight, and the sum of their changes
        (blobs each added or removed).
        """
        total = changes = 0
        processes: list[int] = []
        for name in _listdir(self._folder):
            if not name.isdigit() or int(name) == self._pid:
                continue
            path = os.path.join(self._folder, name)
            if not self._alive(int(name)):
                try:
                    os.unlink(path)  # killed: its fills are gone with it
                except OSError:
                    pass
                continue
            processes.append(int(name))
            try:
                with open(path, "rb") as published:
                    fields = published.read().split()
                total += int(fields[0]) if fields else 0
                changes += int(fields[1]) if len(fields) > 1 else 0
            except (OSError, ValueError):
                continue
        return tuple(sorted(processes)), total, changes

    def publish(self, reserved: int, changes: int) -> None:
        """
        Make our reservation (C{reserved} bytes) and our count of blob
        C{changes} known to the others, now (under the reservation lock:
        before a reservation is granted).
        """
        with self._write_lock:
            self._wanted = (reserved, changes)
            self._write((reserved, changes))

    def publish_soon(self, reserved: int, changes: int) -> None:
        """
        L{publish} off the event loop: at most one write in flight; what
        changes meanwhile is written once it ended (the latest value).
        """
        self._wanted = (reserved, changes)
        if self._publishing is not None or self._wanted == self._published:
            return
        self._publishing = self._offload(self._publish_wanted)
        self._publishing.addCallbacks(self._published_one, self._publish_crashed)

    def _publish_wanted(self) -> _Published | None:
        """Write the latest value asked for (on the offload); the value written."""
        with self._write_lock:
            wanted = self._wanted
            if wanted is not None:
                self._write(wanted)
            return wanted

    def _published_one(self, attempted: _Published | None) -> None:
        self._publishing = None
        # Changed while the job ran: write again (not after a failure of the same value).
        if self._wanted is not None and self._wanted not in (attempted, self._published):
            self.publish_soon(*self._wanted)

    def _publish_crashed(self, failure: Any) -> None:
        self._publishing = None
        log.failure("publishing the cache reservation failed", failure)

    def _write(self, value: _Published) -> None:
        """Replace our file with C{value} (under C{_write_lock}); never raises OSError."""
        if value == self._published:
            return
        reserved, changes = value
        temporary = f"{self._own}.tmp"
        try:
            with open(temporary, "w") as published:
                published.write(f"{reserved} {changes}")
            os.replace(temporary, self._own)
            self._published = (reserved, changes)
            self._failing = False
        except OSError as failure:
            # (A full disk fails this at every fill: say it once until it works again.)
            if not self._failing:
                log.warn("cannot publish the cache reservation: {error}", error=failure.strerror)
            self._failing = True

    def reserve(self, store: BlobStore, size: int) -> bool:
        """
        L{BlobStore.reserve} for the whole directory: decided under the lock
        on the blobs on disk and every process's reservations.
        """
        with self.locked():
            processes, reserved, changes = self.others()
            if (processes, changes) != self._seen:
                # Another process came, went, or stored or removed blobs:
                # rescan. (Otherwise what this process knows is still true.)
                store.refresh(reserved)
                self._seen = (processes, changes)
            store.foreign = reserved
            granted = store.reserve_here(size)
            self.publish(store.reserved, store.changes)
        return granted


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []
