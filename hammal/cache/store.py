"""
The content-addressed blob store on disk.

Layout under the cache directory::

    blobs/sha256/ab/<hex>     complete, verified blobs (one copy per digest)
    tmp/<hex>.<pid>.<nonce>   transfers in progress

A blob enters ``blobs/`` only by an atomic rename after its digest was
verified, so everything there is right by construction; several hammal
processes can share one directory. The index (digest → size, in least
recently used order) lives in memory and is rebuilt at start-up from
``stat`` calls alone. Eviction goes by last access and never removes a blob
that a reader has pinned.
"""

from __future__ import annotations

import os
import secrets
import time
from collections import OrderedDict
from typing import Iterator

from twisted.logger import Logger

from hammal import metrics
from hammal.registry.reference import Digest

#: A temporary file untouched for this long belongs to a dead transfer.
STALE_TEMPORARY_SECONDS = 15 * 60


class BlobStore:
    """
    Verified blobs on disk with an LRU index.

    @param max_size: bytes the blobs may occupy; L{None} for no limit.
    """

    log = Logger()

    def __init__(self, root: str, max_size: int | None = None) -> None:
        self.root = root
        self.max_size = max_size
        self._blobs = os.path.join(root, "blobs")
        self._tmp = os.path.join(root, "tmp")
        self._index: OrderedDict[str, int] = OrderedDict()
        self._pins: dict[str, int] = {}
        self.total_size = 0
        self.evictions = 0

    # Start-up.

    def open(self) -> None:
        """Create the layout, drop dead temporaries, rebuild the index."""
        os.makedirs(self._blobs, exist_ok=True)
        os.makedirs(self._tmp, exist_ok=True)
        self._remove_stale_temporaries()
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
        self.log.info(
            "blob cache {root}: {count} blobs, {size} bytes",
            root=self.root,
            count=len(self._index),
            size=self.total_size,
        )
        self._evict()

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

    def _remove_stale_temporaries(self) -> None:
        now = time.time()
        for name in _listdir(self._tmp):
            path = os.path.join(self._tmp, name)
            try:
                if now - os.stat(path).st_mtime > STALE_TEMPORARY_SECONDS:
                    os.unlink(path)
                    self.log.info("removed abandoned temporary file {name}", name=name)
            except FileNotFoundError:
                pass

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

    # Changes.

    def commit(self, temporary: str, digest: Digest) -> None:
        """
        Move a verified temporary file into place (atomically) and index it.
        """
        final = self.path(digest)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.replace(temporary, final)
        self._add(str(digest), os.stat(final).st_size)
        self._evict()

    def remove(self, digest: Digest) -> None:
        """Forget and delete C{digest} (for a blob found to be bad)."""
        size = self._index.pop(str(digest), None)
        if size is not None:
            self.total_size -= size
        try:
            os.unlink(self.path(digest))
        except FileNotFoundError:
            pass

    def _add(self, key: str, size: int) -> None:
        previous = self._index.pop(key, None)
        if previous is not None:
            self.total_size -= previous
        self._index[key] = size
        self.total_size += size

    def _evict(self) -> None:
        if self.max_size is None:
            return
        for key in list(self._index):
            if self.total_size <= self.max_size:
                return
            if self._pins.get(key):
                continue
            digest = Digest.parse(key)
            self.remove(digest)
            self.evictions += 1
            metrics.blob_cache_evictions.inc()
            self.log.info("evicted {digest} from the blob cache", digest=key)


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []
