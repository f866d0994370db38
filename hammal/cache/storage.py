"""
Where committed blobs live, as the blob cache sees it: L{BlobStorage}.

The blob cache (L{hammal.cache.blobs}) and its fills (L{hammal.cache.fetch})
decide hits, misses, ranges and fills; a L{BlobStorage} under them keeps
the verified blobs. Like CNCF distribution's proxy store, which wraps a
local and a remote store so that the handlers never know, the cache never
knows which storage it has:

- L{hammal.cache.store.BlobStore}: the local cache directory alone;
- L{hammal.storage.blobs.S3BlobStorage}: the local directory as the
  serving tier over an S3 bucket, where a local miss is looked for
  (L{BlobStorage.read_through}) and a fill that goes upstream is kept
  (L{BlobStorage.keep}: uploaded as it grows, completed only once its
  digest matched).

Clients are always served from local files (C{path}): the blob being
read is pinned against eviction, a fill reserves room before it writes,
and only a verified temporary file is committed.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.web.iweb import IResponse

from hammal.cache.growing import GrowingFill
from hammal.reference import Digest


class BlobStorage(Protocol):
    """What the blob cache needs of where committed blobs live (see the module)."""

    # Committed blobs.

    def size(self, digest: Digest) -> int | None:
        """The size of the complete, committed blob C{digest} here, or L{None}."""

    def path(self, digest: Digest) -> str:
        """The local file to open to serve the committed blob C{digest}."""

    def touch(self, digest: Digest) -> None:
        """Record a use: C{digest} becomes the most recently used (last to evict)."""

    def pin(self, digest: Digest) -> None:
        """Keep C{digest} from eviction while it is read (one L{unpin} per pin)."""

    def unpin(self, digest: Digest) -> None:
        """A read of C{digest} ended."""

    def remove(self, digest: Digest) -> None:
        """Forget and delete the local copy of C{digest} (no error when absent)."""

    @property
    def total_size(self) -> int:
        """Bytes of committed blobs held locally."""

    def __len__(self) -> int:
        """How many committed blobs are held locally."""

    # Fills.

    def temporary_path(self, digest: Digest) -> str:
        """A fresh, unique file for a fill of C{digest} to write."""

    def has_room(self, size: int = 0) -> bool:
        """Whether C{size} more bytes fit above the free-space floor."""

    def reserve(self, size: int) -> bool:
        """Make room for C{size} more bytes of a fill, evicting if it then fits; L{False}: no."""

    def wrote(self, size: int) -> None:
        """A fill wrote C{size} bytes of its reservation."""

    def unreserve(self, size: int, written: int = 0) -> None:
        """A fill ended uncommitted: give back its C{size} reserved bytes (C{written} written)."""

    def commit(self, temporary: str, digest: Digest, reserved: int = 0, written: int = 0) -> None:
        """
        Make the verified file C{temporary} the committed blob C{digest}
        (atomically); its reservation becomes the blob's size.

        @raise OSError: when the file cannot be moved into place.
        """

    # Tiers beyond the local directory.

    def read_through(self, digest: Digest, offset: int) -> Deferred[IResponse | None]:
        """
        The committed blob C{digest}'s bytes from C{offset} from a slower
        tier (an unbuffered response for a fill to stream in, as from
        upstream), or L{None}: not there, or no such tier. Never fails: a
        tier that fails is skipped.
        """

    def keep(self, fill: GrowingFill) -> Deferred[bool]:
        """
        Keep a copy of C{fill}, which goes upstream, in the slower tiers:
        taken as it grows and made visible only once the fill verified its
        digest. Fires once that is settled: C{True} when kept, C{False}
        otherwise (no tier, the fill failed, the tier failed); never fails.
        """
