"""
Manifests on disk and the tag → digest map, with freshness rules.

Manifests are immutable by digest: stored once (verified), kept for good.
Tags move: a tag's answer is trusted for C{manifest_ttl}, then revalidated
with a C{HEAD} (which Docker Hub does not count against the pull limit), and
served stale for up to C{stale_if_error} when upstream fails. Tag entries
are keyed by upstream, name, tag and the manifest types the client accepts,
because upstream's answer depends on all four.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from typing import Iterable

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from hammal.registry.reference import Digest

#: Manifest media types hammal caches (anything else passes through).
MANIFEST_TYPES = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
    }
)
INDEX_TYPES = frozenset(
    {
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.index.v1+json",
    }
)


def accepted_types(accept_headers: Iterable[bytes]) -> frozenset[str]:
    """The manifest media types a client listed in its ``Accept`` headers."""
    types: set[str] = set()
    for value in accept_headers:
        for item in value.decode("latin-1").split(","):
            media_type = item.split(";", 1)[0].strip().lower()
            if media_type in MANIFEST_TYPES:
                types.add(media_type)
    return frozenset(types)


@attrs.frozen
class StoredManifest:
    digest: Digest
    media_type: str
    body: bytes


@attrs.frozen
class TagEntry:
    """What a tag pointed to when upstream was last asked."""

    digest: str
    media_type: str
    checked_at: float

    def dumps(self) -> str:
        return json.dumps(attrs.asdict(self))

    @classmethod
    def loads(cls, text: str) -> TagEntry | None:
        try:
            data = json.loads(text)
            return cls(str(data["digest"]), str(data["media_type"]), float(data["checked_at"]))
        except (ValueError, KeyError, TypeError):
            return None


def tag_key(upstream: str, name: str, tag: str, accepted: frozenset[str]) -> str:
    """The cache key of a tag answer (hashed: upstream and names vary in length)."""
    raw = "\n".join([upstream, name, tag, *sorted(accepted)])
    return hashlib.sha256(raw.encode()).hexdigest()


class ManifestStore:
    """Verified manifests on disk under C{root/manifests}."""

    def __init__(self, root: str) -> None:
        self._root = os.path.join(root, "manifests")
        self._tmp = os.path.join(root, "tmp")

    def open(self) -> None:
        os.makedirs(self._root, exist_ok=True)
        os.makedirs(self._tmp, exist_ok=True)

    def _path(self, digest: Digest) -> str:
        return os.path.join(self._root, digest.algorithm, digest.hex[:2], digest.hex)

    def get(self, digest: Digest) -> StoredManifest | None:
        path = self._path(digest)
        try:
            with open(path, "rb") as body_file:
                body = body_file.read()
            with open(path + ".type", encoding="ascii") as type_file:
                media_type = type_file.read().strip()
        except (OSError, UnicodeDecodeError):
            return None
        if Digest.of(body, digest.algorithm) != digest:
            return None  # damaged on disk: refetch rather than serve it
        return StoredManifest(digest, media_type, body)

    def put(self, manifest: StoredManifest) -> None:
        """Store a manifest whose digest the caller verified."""
        path = self._path(manifest.digest)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        for target, content in (
            (path + ".type", manifest.media_type.encode("ascii", "replace")),
            (path, manifest.body),
        ):
            temporary = os.path.join(self._tmp, f"m.{os.getpid()}.{secrets.token_hex(6)}")
            with open(temporary, "wb") as out:
                out.write(content)
            os.replace(temporary, target)


class DiskTagStore:
    """
    Tag entries as small files under C{root/tags}, for a single host (or
    hosts sharing the cache directory). Same contract as the token caches.
    """

    def __init__(self, root: str, clock: IReactorTime) -> None:
        self._root = os.path.join(root, "tags")
        self._clock = clock

    def open(self) -> None:
        os.makedirs(self._root, exist_ok=True)

    def _path(self, key: str) -> str:
        return os.path.join(self._root, key[:2], key)

    def get(self, key: str) -> Deferred[str | None]:
        try:
            with open(self._path(key), encoding="utf-8") as entry:
                expires, _, value = entry.read().partition("\n")
            if float(expires) < self._clock.seconds():
                return succeed(None)
            return succeed(value)
        except (OSError, ValueError):
            return succeed(None)

    def set(self, key: str, value: str, ttl: float) -> Deferred[None]:
        path = self._path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temporary = f"{path}.{os.getpid()}.{secrets.token_hex(4)}"
        with open(temporary, "w", encoding="utf-8") as entry:
            entry.write(f"{self._clock.seconds() + ttl}\n{value}")
        os.replace(temporary, path)
        return succeed(None)

    def delete(self, key: str) -> Deferred[None]:
        try:
            os.unlink(self._path(key))
        except OSError:
            pass
        return succeed(None)
