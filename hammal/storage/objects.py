"""
The contract of an object store for verified blobs and manifests, and the
key layout hammal uses in it.

L{hammal.storage.s3.S3Store} is one; an adapter fits it under the blob
cache's storage interface. The contract is about bytes only: whoever
writes checks the digest and calls L{ObjectUpload.complete} only when it
matched, so a store never holds an object that is not what its key says.
"""

from __future__ import annotations

import re
from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.web.iweb import IResponse

_DIGEST = re.compile(r"^([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-zA-Z0-9=_-]{32,})$")


class ObjectUpload(Protocol):
    """One object being written; invisible until L{complete}."""

    key: str
    size: int

    def write(self, data: bytes) -> Deferred[None]:
        """Add bytes; wait for the Deferred before writing more."""

    def complete(self) -> Deferred[None]:
        """Make the object visible (its digest matched)."""

    def abort(self) -> Deferred[None]:
        """Drop everything written; never fails."""


class ObjectStore(Protocol):
    """Where verified objects live, keyed by L{object_key}."""

    def open_upload(self, key: str) -> ObjectUpload:
        """Start writing C{key}."""

    def read(self, key: str, start: int = 0, end: int | None = None) -> Deferred[IResponse]:
        """Stream bytes C{[start, end)} of C{key} (the unbuffered response)."""

    def exists(self, key: str) -> Deferred[bool]:
        """Whether C{key} exists."""

    def size(self, key: str) -> Deferred[int | None]:
        """C{key}'s size, or L{None} when it does not exist."""

    def delete(self, key: str) -> Deferred[None]:
        """Remove C{key} (no error when absent)."""


def object_key(kind: str, digest: str) -> str:
    """
    The key of a blob or manifest: C{blobs/sha256/ab/abcdef...} — spread
    over 256 prefixes per algorithm, which keeps listings short and S3's
    per-prefix request rates high.

    @param kind: C{"blobs"} or C{"manifests"}.
    @raises ValueError: for anything but a digest.
    """
    if kind not in ("blobs", "manifests"):
        raise ValueError(f"unknown object kind {kind!r}")
    match = _DIGEST.match(digest)
    if match is None:
        raise ValueError(f"not a digest: {digest!r}")
    algorithm, encoded = match.groups()
    return f"{kind}/{algorithm}/{encoded[:2]}/{encoded}"
