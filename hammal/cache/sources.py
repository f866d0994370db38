"""
The seam where a fill's bytes may come from something else than upstream:
L{hammal.cache.blobs.BlobCache.fill_sources}. Alone, every fill goes
upstream; in a cluster (L{hammal.cluster.fill.ClusterFills}) a fill may
stream from the shared object store or from the instance that holds the
digest's fill lease.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from twisted.internet.defer import Deferred
from twisted.web.iweb import IResponse

from hammal.cache.bypass import StartUpstream
from hammal.reference import Digest

if TYPE_CHECKING:
    from hammal.cache.fetch import BlobFetch


class FillSource(Protocol):
    """Where one fill gets its bytes."""

    def start(self, offset: int, end: int | None = None) -> Deferred[IResponse]:
        """The blob's bytes from C{offset}: what the fill streams in (a L{StartUpstream})."""

    def attach(self, fetch: "BlobFetch") -> None:
        """C{fetch} is the fill this source serves (called before it runs)."""


class FillSources(Protocol):
    """Gives each fill its L{FillSource}."""

    def for_fill(self, digest: Digest, start_upstream: StartUpstream) -> FillSource:
        """The source of a new fill of C{digest}; upstream is C{start_upstream}."""
