"""
The content-addressed blob store on disk.

Layout under the cache directory::

    blobs/sha256/ab/<hex>     complete, verified blobs (one copy per digest)
    manifests/, tags/         manifests and tag entries (hammal.cache.manifests)
    tmp/<name>.<pid>.<nonce>  transfers and writes in progress

A blob enters ``blobs/`` only by an atomic rename after its digest was
verified, so everything there is right by construction; several hammal
processes can share one directory. The index (digest → size, in least
recently used order) lives in memory and is rebuilt at start-up from
``stat`` calls alone. Eviction goes by last access and never removes a blob
that a reader has pinned.

Room is reserved before a transfer writes: bytes in flight count against
C{max_size} like stored ones, the filesystem keeps a free-space floor
(C{min_free}), and a newcomer that cannot fit even after eviction is refused
(it streams through uncached) without evicting anything.

L{BlobStore.sweep} (at start, then periodically, and by ``hammal cache
gc``) keeps the whole directory in bounds: temporaries of processes that
are gone are removed at once (their names carry the writer's pid),
manifests and tag entries count against C{max_size} and are evicted by last
use along with blobs, and the free-space floor is restored by eviction when
something else filled the disk.
"""

from __future__ import annotations

import os
import secrets
import time
from collections import OrderedDict
from typing import Iterator, Protocol

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.web.iweb import IResponse

from hammal import metrics
from hammal.cache.growing import GrowingFill
from hammal.cache.liveness import writer_alive
from hammal.reference import Digest

#: A temporary file untouched for this long belongs to a dead transfer.
STALE_TEMPORARY_SECONDS = 15 * 60

#: The default free-space floor: the smaller of this many bytes ...
DEFAULT_MIN_FREE_BYTES = 2 * 1024**3
#: ... and this fraction of the filesystem.
DEFAULT_MIN_FREE_FRACTION = 0.05


@attrs.frozen
class FreeSpaceFloor:
    """
    Free space the cache leaves on its filesystem: C{size} bytes, or a
    C{fraction} of the filesystem, or (neither given) the smaller of
    L{DEFAULT_MIN_FREE_BYTES} and L{DEFAULT_MIN_FREE_FRACTION}.
    """

    size: int | None = None
    fraction: float | None = None

    def bytes_for(self, filesystem_bytes: int) -> int:
        """The floor in bytes on a filesystem of C{filesystem_bytes}."""
        if self.size is not None:
            return self.size
        if self.fraction is not None:
            return int(filesystem_bytes * self.fraction)
        return min(DEFAULT_MIN_FREE_BYTES, int(filesystem_bytes * DEFAULT_MIN_FREE_FRACTION))


@attrs.frozen
class Survey:
    """What a sweep found on disk: blobs gone, and every manifest and tag entry."""

    missing: list[str]
    metadata: list[tuple[float, int, str]]


class SharedAccounting(Protocol):
    """The room of a directory several processes share (L{hammal.cache.shared_room.SharedRoom})."""

    def reserve(self, store: "BlobStore", size: int) -> bool:
        """Whether C{size} more bytes fit the whole directory; reserve them if so."""

    def publish(self, reserved: int, changes: int) -> None:
        """Tell the other processes what this one reserved and changed."""

    def publish_soon(self, reserved: int, changes: int) -> None:
        """L{publish}, off the event loop (the latest value wins)."""


class BlobStore:
    """
    Verified blobs on disk with an LRU index: the local
    L{hammal.cache.storage.BlobStorage}, with no tier beyond it.

    @param max_size: bytes the blobs (stored and in flight) may occupy;
        L{None} for no limit.
    @param min_free: the free space to leave on the filesystem.
    @ivar reserved: bytes reserved by transfers in flight.
    """

    log = Logger()

    def __init__(
        self, root: str, max_size: int | None = None, min_free: FreeSpaceFloor | None = None
    ) -> None:
        self.root = root
        self.max_size = max_size
        self.min_free = min_free if min_free is not None else FreeSpaceFloor()
        self.reserved = 0
        self.reserved_written = 0
        self.metadata_size = 0
        self._started = time.time()
        self._filesystem_bytes: int | None = None
        self._blobs = os.path.join(root, "blobs")
        self._tmp = os.path.join(root, "tmp")
        self._index: OrderedDict[str, int] = OrderedDict()
        self._pins: dict[str, int] = {}
        self.total_size = 0
        self.evictions = 0
        #: Bytes other processes sharing the directory reserved (see L{shared}).
        self.foreign = 0
        #: Decides reservations with the other processes of the directory
        #: (L{hammal.cache.shared_room.SharedRoom}), or L{None} for this one alone.
        self.shared: SharedAccounting | None = None
        #: Blobs added or removed by this process (other processes rescan when it moves).
        self.changes = 0

    # Start-up.

    def open(self) -> None:
        """Create the layout, drop dead temporaries, rebuild the index, trim."""
        os.makedirs(self._blobs, exist_ok=True)
        os.makedirs(self._tmp, exist_ok=True)
        self._rescan()
        self.log.info(
            "blob cache {root}: {count} blobs, {size} bytes",
            root=self.root,
            count=len(self._index),
            size=self.total_size,
        )
        self.sweep()

    def survey(self, digests: list[str]) -> Survey:
        """
        The filesystem half of a sweep, which may run on a thread (it
        reads no mutable state of the store): reclaim temporaries of dead
        writers, find which of C{digests} are gone, list manifests and tags.
        """
        reclaim_temporaries(self._tmp, self._started)
        missing = [key for key in digests if not os.path.exists(self.path(Digest.parse(key)))]
        metadata = []
        now = time.time()
        for used, size, path in metadata_files(self.root):
            name = os.path.basename(path)
            # Tag temporaries of older versions were written beside the
            # entries (tags/ab/<key>.<pid>.<nonce>); entries have no dot.
            if "." in name and os.path.basename(os.path.dirname(os.path.dirname(path))) == "tags":
                if is_abandoned(name, used, now, self._started):
                    try:
                        os.unlink(path)
                    except OSError:
                        pass
                    continue
            metadata.append((used, size, path))
        return Survey(missing, metadata)

    def digests(self) -> list[str]:
        """The indexed digests, least recently used first."""
        return list(self._index)

    def sweep(self, survey: Survey | None = None) -> None:
        """
        Upkeep of the whole directory: reclaim temporaries of dead writers,
        bring blobs, manifests and tags under C{max_size} (least recently
        used first) and the filesystem back above the free-space floor.
        Given the L{survey} (made off the event loop), only the decisions
        are left to do here.
        """
        if survey is None:
            survey = self.survey(self.digests())
        for key in survey.missing:
            self.size(Digest.parse(key))  # removed behind our back: forget it
        extra = survey.metadata
        self.metadata_size = sum(size for _, size, _ in extra)
        over = 0
        if self.max_size is not None:
            over = (
                self.total_size + self.reserved + self.foreign + self.metadata_size - self.max_size
            )
        free = self.free_space()
        if free is not None:
            over = max(over, self.floor() - free)
        if over > 0:
            self._evict_by_age(over, extra)

    def _evict_by_age(self, amount: int, extra: list[tuple[float, int, str]]) -> None:
        """Remove C{amount} bytes, oldest use first, of blobs, manifests and tags."""
        candidates: list[tuple[float, int, str, str | None]] = [
            (used, size, path, None) for used, size, path in extra
        ]
        for blob, size in self._index.items():
            if self._pins.get(blob):
                continue
            try:
                used = os.stat(self.path(Digest.parse(blob))).st_mtime
            except OSError:
                used = 0.0
            candidates.append((used, size, "", blob))
        candidates.sort(key=lambda candidate: candidate[0])
        freed = 0
        for _, size, path, key in candidates:
            if freed >= amount:
                break
            if key is not None:
                self._evict_one(key)
            else:
                for victim in (path, path + ".type"):
                    try:
                        os.unlink(victim)
                    except OSError:
                        pass
                self.metadata_size -= size
            freed += size

    def _rescan(self) -> None:
        found: list[tuple[float, str, int]] = []
        for digest, path in self._walk():
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                continue
            found.append((stat.st_mtime, digest, stat.st_size))
        found.sort()
        self._index.clear()
        self.total_size = 0
        for _, digest, size in found:
            self._index[digest] = size
            self.total_size += size

    def _walk(self) -> Iterator[tuple[str, str]]:
        for algorithm in _listdir(self._blobs):
            for prefix in _listdir(os.path.join(self._blobs, algorithm)):
                folder = os.path.join(self._blobs, algorithm, prefix)
                for name in _listdir(folder):
                    try:
                        digest = Digest.parse(f"{algorithm}:{name}")
                    except Exception:
                        continue
                    yield str(digest), os.path.join(folder, name)

    # Paths.

    def path(self, digest: Digest) -> str:
        """Where the blob C{digest} lives once complete."""
        return os.path.join(self._blobs, digest.algorithm, digest.hex[:2], digest.hex)

    def temporary_path(self, digest: Digest) -> str:
        """A fresh, unique temporary path for a transfer of C{digest}."""
        return os.path.join(self._tmp, f"{digest.hex}.{os.getpid()}.{secrets.token_hex(4)}")

    # Lookups.

    def size(self, digest: Digest) -> int | None:
        """
        The size of a complete blob, or L{None}. A blob another process put
        in the shared directory is picked up here.
        """
        key = str(digest)
        try:
            size = os.stat(self.path(digest)).st_size
        except OSError:
            # Gone (removed by another process or by hand): forget it.
            previous = self._index.pop(key, None)
            if previous is not None:
                self.total_size -= previous
            return None
        if key in self._index:
            return size
        self._add(key, size)
        return size

    def touch(self, digest: Digest) -> None:
        """Record an access: the blob becomes the most recently used."""
        key = str(digest)
        if key in self._index:
            self._index.move_to_end(key)
            try:
                os.utime(self.path(digest))
            except OSError:
                pass

    def pin(self, digest: Digest) -> None:
        """Keep C{digest} from eviction while it is being read."""
        key = str(digest)
        self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, digest: Digest) -> None:
        key = str(digest)
        count = self._pins.get(key, 0) - 1
        if count <= 0:
            self._pins.pop(key, None)
        else:
            self._pins[key] = count

    def __contains__(self, digest: Digest) -> bool:
        return self.size(digest) is not None

    def __len__(self) -> int:
        return len(self._index)

    # Room.

    def free_space(self) -> int | None:
        """Bytes available on the cache's filesystem, or L{None} when unknown."""
        try:
            stat = os.statvfs(self.root)
        except OSError:
            return None
        return stat.f_bavail * stat.f_frsize

    def floor(self) -> int:
        """The free-space floor in bytes (0 when the filesystem cannot be asked)."""
        if self._filesystem_bytes is None:
            try:
                stat = os.statvfs(self.root)
            except OSError:
                return 0
            self._filesystem_bytes = stat.f_blocks * stat.f_frsize
        return self.min_free.bytes_for(self._filesystem_bytes)

    def unwritten(self) -> int:
        """Bytes reserved by transfers in flight and not written yet."""
        return max(0, self.reserved - self.reserved_written)

    def wrote(self, size: int) -> None:
        """A transfer wrote C{size} bytes of its reservation."""
        self.reserved_written += size

    def has_room(self, size: int = 0) -> bool:
        """
        Whether C{size} more bytes leave the free-space floor intact, once
        the transfers in flight have written what they reserved.
        """
        free = self.free_space()
        return free is not None and free - size - self.unwritten() >= self.floor()

    def reserve(self, size: int) -> bool:
        """
        Make room for C{size} more bytes of a transfer: evict least recently
        used blobs if, and only if, the newcomer then fits both under
        C{max_size} and above the free-space floor. L{False}: refused,
        nothing evicted.
        """
        if self.shared is not None:
            return self.shared.reserve(self, size)
        return self.reserve_here(size)

    def reserve_here(self, size: int) -> bool:
        """L{reserve}, on what this process knows of the directory."""
        if self.max_size is not None and size > self.max_size:
            return False
        over = 0
        if self.max_size is not None:
            over = (
                self.total_size
                + self.reserved
                + self.foreign
                + self.metadata_size
                + size
                - self.max_size
            )
        free = self.free_space()
        if free is None:
            return False
        short = self.floor() + size + self.unwritten() - free
        needed = max(over, short, 0)
        if needed:
            evictable = [key for key in self._index if not self._pins.get(key)]
            if sum(self._index[key] for key in evictable) < needed:
                return False
            freed = 0
            for key in evictable:
                if freed >= needed:
                    break
                freed += self._index[key]
                self._evict_one(key)
        self.reserved += size
        return True

    def unreserve(self, size: int, written: int = 0) -> None:
        """A transfer ended: give back its reservation of C{size}, of which it wrote C{written}."""
        self.reserved = max(0, self.reserved - size)
        self.reserved_written = max(0, self.reserved_written - written)
        self.publish()

    def publish(self) -> None:
        """
        Tell the other processes of the directory what we reserved and
        changed (soon: off the event loop; a reservation itself is
        published at once, under the directory's lock).
        """
        if self.shared is not None:
            self.shared.publish_soon(self.reserved, self.changes)

    def refresh(self, foreign: int) -> None:
        """
        See the directory as it is: rescan the blobs on disk (the other
        processes' too; forget those removed) and take C{foreign} bytes as
        reserved by the other processes.
        """
        self._rescan()
        self.foreign = foreign

    # Changes.

    def commit(self, temporary: str, digest: Digest, reserved: int = 0, written: int = 0) -> None:
        """
        Move a verified temporary file into place (atomically) and index it;
        its reservation (C{reserved} bytes, C{written} of them written)
        becomes the blob's size.
        """
        final = self.path(digest)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.replace(temporary, final)
        size = os.stat(final).st_size
        self.unreserve(reserved, written)
        self._add(str(digest), size)
        self._evict()
        self.publish()

    def read_through(self, digest: Digest, offset: int) -> Deferred[IResponse | None]:
        """Nothing beyond the directory: a local miss is a miss."""
        return succeed(None)

    def keep(self, fill: GrowingFill) -> Deferred[bool]:
        """Nothing beyond the directory: the fill commits here itself."""
        return succeed(False)

    def remove(self, digest: Digest) -> None:
        """Forget and delete C{digest} (for a blob found to be bad)."""
        size = self._index.pop(str(digest), None)
        if size is not None:
            self.total_size -= size
        try:
            os.unlink(self.path(digest))
            self.changes += 1
        except FileNotFoundError:
            pass

    def _add(self, key: str, size: int) -> None:
        previous = self._index.pop(key, None)
        if previous is not None:
            self.total_size -= previous
        else:
            self.changes += 1
        self._index[key] = size
        self.total_size += size

    def _evict(self) -> None:
        if self.max_size is None:
            return
        for key in list(self._index):
            if self.total_size + self.reserved + self.foreign + self.metadata_size <= self.max_size:
                return
            if self._pins.get(key):
                continue
            self._evict_one(key)

    def _evict_one(self, key: str) -> None:
        self.remove(Digest.parse(key))
        self.evictions += 1
        metrics.blob_cache_evictions.inc()
        self.log.info("evicted {digest} from the blob cache", digest=key)


def writer_pid(name: str) -> int | None:
    """The pid in a temporary's name (C{<name>.<pid>.<nonce>}), if any."""
    parts = name.split(".")
    if len(parts) >= 3 and parts[-2].isdigit():
        return int(parts[-2])
    return None


def is_abandoned(name: str, mtime: float, now: float, started: float) -> bool:
    """
    Whether temporary C{name} belongs to no live writer: its process is
    gone, or it is ours from before we started (a previous process with
    our pid, as in a restarted container), or nobody touched it for
    L{STALE_TEMPORARY_SECONDS}.
    """
    if now - mtime > STALE_TEMPORARY_SECONDS:
        return True
    pid = writer_pid(name)
    if pid is None:
        return False
    if pid == os.getpid():
        return mtime < started
    return not writer_alive(pid)


def reclaim_temporaries(folder: str, started: float, now: float | None = None) -> list[str]:
    """Remove the abandoned temporaries in C{folder}; their names."""
    log = Logger()
    now = time.time() if now is None else now
    removed = []
    for name in _listdir(folder):
        path = os.path.join(folder, name)
        try:
            if is_abandoned(name, os.stat(path).st_mtime, now, started):
                os.unlink(path)
                removed.append(name)
        except FileNotFoundError:
            pass
        except OSError as failure:
            log.warn("cannot remove a temporary file: {error}", error=failure.strerror)
    if removed:
        log.info("removed {count} abandoned temporary files", count=len(removed))
    return removed


def metadata_files(root: str) -> list[tuple[float, int, str]]:
    """
    (last use, size, path) of every manifest and tag entry (C{.type}
    companions counted with theirs).
    """
    found = []
    for folder in ("manifests", "tags"):
        for directory, _, names in os.walk(os.path.join(root, folder)):
            for name in names:
                path = os.path.join(directory, name)
                try:
                    stat = os.stat(path)
                except OSError:
                    continue
                if name.endswith(".type"):
                    continue
                size = stat.st_size
                if folder == "manifests":
                    try:
                        size += os.stat(path + ".type").st_size
                    except OSError:
                        pass
                found.append((stat.st_mtime, size, path))
    return found


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []
