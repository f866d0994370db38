"""
Offline inspection and garbage collection of a hammal cache directory.

Everything goes through the server's own L{BlobStore}: its walk to find
blobs, and its C{open()} to evict and to drop abandoned temporaries, so the
tool and the server cannot disagree about what "least recently used" or
"abandoned" means. The one exception is the dry run, which must not change
anything and so replays the same order (last access, then digest) without
C{open()}; a test holds the two to the same answer.

It is safe on a running server: a server notices a blob removed behind
its back when it next looks it up (and at its minute sweep), serves a blob
removed under a reader from upstream, and only temporaries whose writer is
gone or idle for 15 minutes are removed. Manifests and tag entries count
against the size too. Unlike the server, the tool keeps no free-space
floor: it evicts for C{--max-size} only.
"""

from __future__ import annotations

import os
import time
from typing import Iterable

import attrs

from hammal.cache.store import BlobStore, FreeSpaceFloor, is_abandoned, metadata_files

#: What makes a directory recognisably a hammal cache.
CACHE_SUBDIRECTORIES = ("blobs", "manifests", "tmp")


class NotACache(ValueError):
    """The directory is missing or is not a hammal cache (exit status 2)."""


@attrs.frozen
class BlobFile:
    """A stored blob: its digest, size and last access (the file's mtime)."""

    digest: str
    size: int
    used: float


@attrs.frozen
class Temporary:
    """A file in C{tmp/}: a transfer in progress, or one a crash abandoned."""

    name: str
    size: int
    stale: bool


@attrs.frozen
class CacheStats:
    blobs: int
    blob_bytes: int
    manifests: int
    tags: int
    temporaries: int
    temporary_bytes: int
    stale_temporaries: int


@attrs.frozen
class GcResult:
    """What a collection removed (or, for a dry run, would remove)."""

    evicted: tuple[BlobFile, ...]
    removed_temporaries: tuple[Temporary, ...]
    remaining_blobs: int
    remaining_bytes: int
    dry_run: bool

    @property
    def evicted_bytes(self) -> int:
        return sum(blob.size for blob in self.evicted)


def check_cache_dir(root: str) -> None:
    """
    Refuse a directory that is not a hammal cache, so that a typo in a
    destructive command cannot scatter C{blobs/} and C{tmp/} elsewhere.

    @raise NotACache: with a one-line explanation.
    """
    if not os.path.isdir(root):
        raise NotACache(f"--cache-dir {root}: no such directory")
    if not any(os.path.isdir(os.path.join(root, name)) for name in CACHE_SUBDIRECTORIES):
        raise NotACache(f"--cache-dir {root} is not a hammal cache (no blobs/, manifests/ or tmp/)")


def scan_blobs(root: str) -> list[BlobFile]:
    """Every complete blob, least recently used first (the store's order)."""
    found = []
    for digest, path in BlobStore(root)._walk():
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            continue  # evicted by a running server meanwhile
        found.append(BlobFile(digest, stat.st_size, stat.st_mtime))
    found.sort(key=lambda blob: (blob.used, blob.digest, blob.size))
    return found


def scan_temporaries(root: str, now: float | None = None) -> list[Temporary]:
    """The files in C{tmp/}, each marked stale the way the store decides it."""
    now = time.time() if now is None else now
    folder = os.path.join(root, "tmp")
    found = []
    for name in sorted(_listdir(folder)):
        try:
            stat = os.stat(os.path.join(folder, name))
        except FileNotFoundError:
            continue
        found.append(Temporary(name, stat.st_size, is_abandoned(name, stat.st_mtime, now, now)))
    return found


def count_manifests(root: str) -> int:
    """Stored manifests (each with a C{.type} companion, not counted)."""
    return sum(1 for name in _files(os.path.join(root, "manifests")) if not name.endswith(".type"))


def count_tags(root: str) -> int:
    """Tag entries on disk (none when the server keeps them in Redis)."""
    return sum(1 for _ in _files(os.path.join(root, "tags")))


def stats(root: str) -> CacheStats:
    """A read-only summary of the cache directory."""
    check_cache_dir(root)
    blobs = scan_blobs(root)
    temporaries = scan_temporaries(root)
    return CacheStats(
        blobs=len(blobs),
        blob_bytes=sum(blob.size for blob in blobs),
        manifests=count_manifests(root),
        tags=count_tags(root),
        temporaries=len(temporaries),
        temporary_bytes=sum(temporary.size for temporary in temporaries),
        stale_temporaries=sum(1 for temporary in temporaries if temporary.stale),
    )


def plan_eviction(
    blobs: Iterable[BlobFile],
    max_size: int | None,
    metadata: Iterable[tuple[float, int, str]] = (),
) -> list[BlobFile]:
    """
    The blobs the store's sweep removes to fit C{max_size}: oldest use
    first among blobs and the manifests and tag entries (C{metadata}: last
    use, size, path), until everything fits.
    """
    if max_size is None:
        return []
    ordered = sorted(blobs, key=lambda blob: (blob.used, blob.digest, blob.size))
    extra = list(metadata)
    over = sum(blob.size for blob in ordered) + sum(size for _, size, _ in extra) - max_size
    candidates: list[tuple[float, int, BlobFile | None]] = [
        (used, size, None) for used, size, _ in extra
    ]
    candidates += [(blob.used, blob.size, blob) for blob in ordered]
    candidates.sort(key=lambda candidate: candidate[0])
    evicted = []
    freed = 0
    for _, size, candidate in candidates:
        if freed >= over:
            break
        if candidate is not None:
            evicted.append(candidate)
        freed += size
    return evicted


def gc(root: str, max_size: int | None, dry_run: bool = False) -> GcResult:
    """
    Evict least recently used blobs down to C{max_size} (none when
    L{None}) and remove abandoned temporaries.

    @raise NotACache: for a directory that is not a hammal cache.
    @raise OSError: when files cannot be removed.
    """
    check_cache_dir(root)
    before = scan_blobs(root)
    stale = [temporary for temporary in scan_temporaries(root) if temporary.stale]
    if dry_run:
        evicted = plan_eviction(before, max_size, metadata_files(root))
        remaining = [blob for blob in before if blob not in evicted]
        return GcResult(tuple(evicted), tuple(stale), len(remaining), _total(remaining), True)
    store = BlobStore(root, max_size, FreeSpaceFloor(size=0))
    store.open()
    left = {digest for digest, _ in store._walk()}
    evicted = [blob for blob in before if blob.digest not in left]
    tmp = os.path.join(root, "tmp")
    removed = [t for t in stale if not os.path.exists(os.path.join(tmp, t.name))]
    return GcResult(tuple(evicted), tuple(removed), len(store), store.total_size, False)


def _total(blobs: Iterable[BlobFile]) -> int:
    return sum(blob.size for blob in blobs)


def _files(folder: str) -> Iterable[str]:
    """Names of the regular files under C{folder}, at any depth."""
    for _, _, names in os.walk(folder):
        yield from names


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []
