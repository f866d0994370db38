"""
A manifest that may be served is only useful with its blobs: each time a
cached manifest is served, its config and layers become the most recently
used blobs, so LRU eviction takes the blobs of manifests nobody asks for
first, and a manifest served stale while upstream is down still has its
layers on disk.
"""

from __future__ import annotations

import json
from collections import OrderedDict

from twisted.internet.interfaces import IReactorTime

from hammal.cache.storage import BlobStorage
from hammal.errors import RegistryError
from hammal.lru import remember
from hammal.reference import Digest

#: Image manifest types whose config and layers are blobs.
_IMAGE_TYPES = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
    }
)


def referenced_blobs(body: bytes) -> list[Digest]:
    """The config and layer digests an image manifest names (none if unreadable)."""
    try:
        document = json.loads(body)
        descriptors = [document.get("config") or {}, *(document.get("layers") or [])]
        return [Digest.parse(str(d["digest"])) for d in descriptors if d.get("digest")]
    except (ValueError, AttributeError, TypeError, KeyError, RegistryError):
        return []


class LayerKeeper:
    """
    Refreshes the blobs of served manifests in the store's LRU order, at
    most once per C{interval} seconds per manifest (a hot tag costs one
    JSON parse a minute, not one per request), and remembers for
    C{stale_memory} seconds the blobs of manifests served stale, so that a
    missing one can be answered with a clear error.
    """

    def __init__(
        self,
        store: BlobStorage,
        clock: IReactorTime,
        interval: float = 60.0,
        remember: int = 10000,
        stale_memory: float = 600.0,
    ) -> None:
        self._store = store
        self._clock = clock
        self._interval = interval
        self._remember = remember
        self._stale_memory = stale_memory
        self._last: OrderedDict[str, float] = OrderedDict()
        self._stale_blobs: OrderedDict[str, float] = OrderedDict()

    def served(self, digest: str, media_type: str, body: bytes, stale: bool = False) -> None:
        """The manifest C{digest} was served from the cache (C{stale}: upstream failing)."""
        if media_type not in _IMAGE_TYPES:
            return
        now = self._clock.seconds()
        if stale:
            for blob in referenced_blobs(body):
                self._remember_entry(self._stale_blobs, str(blob), now)
        last = self._last.get(digest)
        if last is not None and now - last < self._interval:
            return
        self._remember_entry(self._last, digest, now)
        for blob in referenced_blobs(body):
            self._store.touch(blob)

    def named_by_stale(self, digest: Digest) -> bool:
        """Whether a manifest served stale lately names blob C{digest}."""
        when = self._stale_blobs.get(str(digest))
        return when is not None and self._clock.seconds() - when < self._stale_memory

    def _remember_entry(self, entries: OrderedDict[str, float], key: str, now: float) -> None:
        remember(entries, key, now, self._remember)
