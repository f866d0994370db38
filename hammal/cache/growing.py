"""
What the blob cache knows of a fill in progress: L{GrowingFill}.

A fill is either this process's own upstream transfer
(L{hammal.cache.fetch.BlobFetch}) or another process's, followed through
its growing file (L{hammal.cache.sibling.SiblingFill}). The blob cache, its
readers, the status page and a cluster's peer endpoint use only what both
offer, so neither is ever taken for the other.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.web.iweb import IResponse

from hammal.cache.readers import GrowingFile
from hammal.reference import Digest


class GrowingFill(GrowingFile, Protocol):
    """
    A fill that readers can follow (a L{GrowingFile}) and the blob cache can
    wait for, join and show.

    @ivar path: the file to read while it grows (the committed blob's once
        complete).
    @ivar written: bytes in the file so far.
    @ivar finished: fires once the fill ended, either way.
    """

    digest: Digest
    path: str
    written: int
    content_type: bytes
    finished: Deferred[None]

    def when_started(self) -> Deferred[Any]:
        """Fires (with the fill) once its file can be followed; fails as the fill does."""

    def take_response(self) -> IResponse | None:
        """
        Upstream's unread answer of a fill the cache refused, for one
        waiter to stream uncached; L{None} when there is none to take.
        """
