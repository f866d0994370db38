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

import functools
import hashlib
import json
import os
import secrets
import time
from collections import OrderedDict
from typing import Any, Iterable, Protocol

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from hammal.cache.writes import LocalCacheError, WriteErrors, describe
from hammal.coalesce import Coalescer
from hammal.errors import (
    RegistryError,
    TooManyRequests,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from hammal.lru import trim_oldest
from hammal.reference import Digest, Reference
from hammal.replies import (
    CACHE_COALESCED,
    CACHE_HIT,
    CACHE_MISS,
    CACHE_REVALIDATED,
    CACHE_STALE,
    STALE_WARNING,
    Document,
    find_header,
)
from hammal.ttlstore import TtlStore
from hammal.upstream.client import Trace

#: Manifest media types hammal caches (anything else passes through).
MANIFEST_TYPES = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
    }
)
#: A stored manifest's file records its last use at most this often (seconds).
USE_MARK_INTERVAL = 3600.0

INDEX_TYPES = frozenset(
    {
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.index.v1+json",
    }
)


def accepted_types(accept_headers: Iterable[bytes]) -> frozenset[str]:
    """The manifest media types a client listed in its ``Accept`` headers."""
    given = tuple(accept_headers)
    known = _ACCEPTED.get(given)
    if known is None:
        if len(_ACCEPTED) >= _ACCEPTED_KEPT:
            _ACCEPTED.clear()  # clients send a handful of distinct lists
        known = _ACCEPTED[given] = _accepted_types(given)
    return known


#: accepted_types' answers by Accept headers: parsing them showed on every
#: cache hit, and clients send the same few lists again and again.
_ACCEPTED: dict[tuple[bytes, ...], frozenset[str]] = {}
_ACCEPTED_KEPT = 1024


def _accepted_types(accept_headers: Iterable[bytes]) -> frozenset[str]:
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


@functools.lru_cache(maxsize=4096)
def tag_key(upstream: str, name: str, tag: str, accepted: frozenset[str]) -> str:
    """The cache key of a tag answer (hashed: upstream and names vary in length)."""
    raw = "\n".join([upstream, name, tag, *sorted(accepted)])
    return hashlib.sha256(raw.encode()).hexdigest()


def _type_key(upstream: str, name: str, tag: str, media_type: str) -> str:
    """The key of the last answer of C{media_type} for a tag, whoever asked."""
    return tag_key(upstream, name, tag, frozenset({"stored-type:" + media_type}))


class ManifestStore:
    """
    Verified manifests on disk under C{root/manifests}, the most recently
    used of them also in memory (up to C{memory_limit} bytes): a hot tag is
    served without touching the disk.
    """

    def __init__(self, root: str, memory_limit: int = 32 * 1024 * 1024) -> None:
        self._root = os.path.join(root, "manifests")
        self._tmp = os.path.join(root, "tmp")
        self._memory_limit = memory_limit
        self._recent: OrderedDict[Digest, StoredManifest] = OrderedDict()
        self._recent_bytes = 0
        self._marked: dict[Digest, float] = {}

    def _mark_used(self, digest: Digest) -> None:
        """
        Record a use in the file's mtime (at most once per L{USE_MARK_INTERVAL}):
        eviction of the cache directory goes by it.
        """
        now = time.time()
        if now - self._marked.get(digest, 0.0) < USE_MARK_INTERVAL:
            return
        if len(self._marked) > 100000:
            self._marked.clear()
        self._marked[digest] = now
        try:
            os.utime(self._path(digest))
        except OSError:
            pass

    def open(self) -> None:
        os.makedirs(self._root, exist_ok=True)
        os.makedirs(self._tmp, exist_ok=True)

    def _path(self, digest: Digest) -> str:
        return os.path.join(self._root, digest.algorithm, digest.hex[:2], digest.hex)

    def get(self, digest: Digest) -> StoredManifest | None:
        """The manifest, from memory when recently used, else from disk (verified)."""
        remembered = self._recent.get(digest)
        if remembered is not None:
            self._recent.move_to_end(digest)
            self._mark_used(digest)
            return remembered
        manifest = self._load(digest)
        if manifest is not None:
            self._remember(manifest)
        return manifest

    def _remember(self, manifest: StoredManifest) -> None:
        previous = self._recent.pop(manifest.digest, None)
        if previous is not None:
            self._recent_bytes -= len(previous.body)
        self._recent[manifest.digest] = manifest
        self._recent_bytes += len(manifest.body)
        while self._recent_bytes > self._memory_limit and self._recent:
            _, dropped = self._recent.popitem(last=False)
            self._recent_bytes -= len(dropped.body)

    def _load(self, digest: Digest) -> StoredManifest | None:
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
        self._mark_used(digest)
        return StoredManifest(digest, media_type, body)

    def put(self, manifest: StoredManifest) -> None:
        """
        Store a manifest whose digest the caller verified.

        @raise OSError: when the disk refuses it (the manifest is still
            kept in memory; no temporary file is left behind).
        """
        self._remember(manifest)
        path = self._path(manifest.digest)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        for target, content in (
            (path + ".type", manifest.media_type.encode("ascii", "replace")),
            (path, manifest.body),
        ):
            _write_atomically(
                os.path.join(self._tmp, f"m.{os.getpid()}.{secrets.token_hex(6)}"), target, content
            )


class DiskTagStore:
    """
    Tag entries as small files under C{root/tags}, for a single host (or
    hosts sharing the cache directory). Same contract as L{hammal.ttlstore.TtlStore}.
    """

    def __init__(self, root: str, clock: IReactorTime) -> None:
        self._root = os.path.join(root, "tags")
        self._tmp = os.path.join(root, "tmp")
        self._clock = clock

    def open(self) -> None:
        os.makedirs(self._root, exist_ok=True)
        os.makedirs(self._tmp, exist_ok=True)

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
        """
        Write the entry (atomically, through C{tmp/} where the periodic
        sweep reclaims what a crash leaves); fails with L{LocalCacheError}
        when the disk refuses it.
        """
        path = self._path(key)
        temporary = os.path.join(self._tmp, f"t.{os.getpid()}.{secrets.token_hex(4)}")
        content = f"{self._clock.seconds() + ttl}\n{value}".encode()
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            _write_atomically(temporary, path, content)
        except OSError as failure:
            return fail(LocalCacheError(f"cannot store a tag entry: {describe(failure)}"))
        return succeed(None)

    def delete(self, key: str) -> Deferred[None]:
        try:
            os.unlink(self._path(key))
        except OSError:
            pass
        return succeed(None)


def _write_atomically(temporary: str, target: str, content: bytes) -> None:
    """Write C{content} to C{temporary}, then rename it to C{target}; unlink it on failure."""
    try:
        with open(temporary, "wb") as out:
            out.write(content)
        os.replace(temporary, target)
    except OSError:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


class RemoteManifests(Protocol):
    """
    The upstream side of the manifest cache (L{hammal.upstream.remote.RemoteManifests}),
    as distribution's proxy wraps a remote store: names are upstream's.
    """

    async def fetch(
        self, upstream_name: str, reference: Reference, headers: Headers, trace: Trace
    ) -> Document:
        """GET a manifest upstream, verified, as a L{Document}."""

    async def head_digest(
        self, upstream_name: str, tag: str, headers: Headers, trace: Trace
    ) -> str | None:
        """HEAD a tag upstream and return its ``Docker-Content-Digest``."""


_TRANSIENT = (UpstreamUnavailable, UpstreamTimeout, TooManyRequests)


class ManifestCache:
    """
    The manifest side of the pull-through cache: digests from disk, tags
    with a TTL, revalidation by HEAD, stale-if-error, a short negative
    cache, coalescing of identical upstream work, and index children
    fetched so that a later pull by digest works offline.
    """

    log = Logger()

    def __init__(
        self,
        store: ManifestStore,
        tags: TtlStore,
        clock: IReactorTime,
        upstream: str,
        remote: RemoteManifests,
        ttl: float = 300.0,
        stale_if_error: float = 86400.0,
        negative_ttl: float = 30.0,
        deadline: float | None = None,
        write_errors: WriteErrors | None = None,
    ) -> None:
        self._write_errors = write_errors if write_errors is not None else WriteErrors(clock)
        self._store = store
        self._tags = tags
        self._clock = clock
        self._upstream = upstream
        self._remote = remote
        self._ttl = ttl
        self._stale_if_error = stale_if_error
        self._negative_ttl = negative_ttl
        self._negative: OrderedDict[str, tuple[float, RegistryError]] = OrderedDict()
        # Shared by every client asking for the same manifest: bounded, so
        # that one stalled upstream answer cannot hang every later pull.
        self._work: Coalescer[Any] = Coalescer(
            clock, deadline, f"the manifest request to {upstream}", name="manifest"
        )
        # Tag entries this process read or wrote, so a hot tag costs no
        # store lookup; each is kept no longer than the store keeps it.
        self._recent_tags: OrderedDict[str, tuple[TagEntry, float]] = OrderedDict()

    async def get(
        self,
        name: str,
        reference: Reference,
        accepted: frozenset[str],
        headers: Headers,
        trace: Trace,
    ) -> Document:
        """
        The manifest for C{name} (upstream's name) and C{reference}, as a
        L{Document} whose C{cache_status} says how it was found.
        """
        if isinstance(reference, Digest):
            return await self._by_digest(name, reference, accepted, headers, trace)
        return await self._by_tag(name, reference, accepted, headers, trace)

    # By digest: immutable.

    async def _by_digest(
        self, name: str, digest: Digest, accepted: frozenset[str], headers: Headers, trace: Trace
    ) -> Document:
        stored = self._store.get(digest)
        if stored is not None and stored.media_type in accepted:
            return _document(stored, CACHE_HIT)
        key = f"digest\n{name}\n{digest}\n" + ",".join(sorted(accepted))
        self._check_negative(key)
        joined = key in self._work
        try:
            document = await self._work.run(
                key, lambda: self._fetch_and_store(name, digest, headers, trace)
            )
        except UpstreamError as failure:
            self._remember_negative(key, failure)
            raise
        return attrs.evolve(document, cache_status=CACHE_COALESCED if joined else CACHE_MISS)

    # By tag: trusted for ttl, then revalidated.

    async def _by_tag(
        self, name: str, tag: str, accepted: frozenset[str], headers: Headers, trace: Trace
    ) -> Document:
        key = tag_key(self._upstream, name, tag, accepted)
        entry = await self._tag_entry(key)
        stored = self._store.get(_digest(entry.digest)) if entry is not None else None
        if entry is not None and stored is not None:
            age = self._clock.seconds() - entry.checked_at
            if age < self._ttl:
                return _document(stored, CACHE_HIT)
            asked_at = self._clock.seconds()
            try:
                current = await self._work.run(
                    ("head", key),
                    lambda: self._remote.head_digest(name, tag, headers, trace),
                )
            except _TRANSIENT as failure:
                return self._stale_or_raise(stored, age, failure)
            except UpstreamError:
                self._recent_tags.pop(key, None)
                await self._tags.delete(key)
                raise
            if current == entry.digest:
                await self._remember_tag(key, stored, asked_at, name, tag)
                return _document(stored, CACHE_REVALIDATED)
        self._check_negative(key)
        joined = ("get", key) in self._work
        try:
            document = await self._work.run(
                ("get", key),
                lambda: self._fetch_tag(key, name, tag, headers, trace),
            )
        except UpstreamError as failure:
            self._remember_negative(key, failure)
            raise
        except _TRANSIENT as failure:
            if entry is not None and stored is not None:
                return self._stale_or_raise(
                    stored, self._clock.seconds() - entry.checked_at, failure
                )
            fallback = await self._entry_of_any_client(name, tag, accepted)
            if fallback is not None:
                other, other_stored = fallback
                return self._stale_or_raise(
                    other_stored, self._clock.seconds() - other.checked_at, failure
                )
            raise
        return attrs.evolve(document, cache_status=CACHE_COALESCED if joined else CACHE_MISS)

    def _stale_or_raise(
        self, stored: StoredManifest, age: float, failure: RegistryError
    ) -> Document:
        if age >= self._ttl + self._stale_if_error:
            raise failure
        self.log.warn(
            "serving stale {digest} ({age:.0f}s old): {error}",
            digest=str(stored.digest),
            age=age,
            error=failure.message,
        )
        document = _document(stored, CACHE_STALE)
        return attrs.evolve(document, headers=document.headers + [(b"warning", [STALE_WARNING])])

    async def _fetch_tag(
        self, key: str, name: str, tag: str, headers: Headers, trace: Trace
    ) -> Document:
        asked_at = self._clock.seconds()
        document = await self._remote.fetch(name, tag, headers, trace)
        stored = self._keep(name, document, headers)
        if stored is not None:
            await self._remember_tag(key, stored, asked_at, name, tag)
        return document

    async def _entry_of_any_client(
        self, name: str, tag: str, accepted: frozenset[str]
    ) -> tuple[TagEntry, StoredManifest] | None:
        """
        The freshest stored answer for C{tag}, whichever client's request
        stored it, of a type in C{accepted}: docker, containerd and podman
        each send other types, and each may be served what another pulled.
        """
        found: list[tuple[TagEntry, StoredManifest]] = []
        for media_type in sorted(accepted):
            entry = await self._tag_entry(_type_key(self._upstream, name, tag, media_type))
            if entry is None or entry.media_type != media_type:
                continue
            stored = self._store.get(Digest.parse(entry.digest))
            if stored is not None:
                found.append((entry, stored))
        if not found:
            return None
        return max(found, key=lambda pair: pair[0].checked_at)

    async def _fetch_and_store(
        self, name: str, digest: Digest, headers: Headers, trace: Trace
    ) -> Document:
        document = await self._remote.fetch(name, digest, headers, trace)
        self._keep(name, document, headers)
        return document

    def _keep(self, name: str, document: Document, headers: Headers) -> StoredManifest | None:
        """Store a fetched manifest of a cacheable type; fetch an index's children."""
        media_type = (find_header(document.headers, b"content-type") or b"").decode("latin-1")
        media_type = media_type.split(";", 1)[0].strip().lower()
        digest_text = find_header(document.headers, b"docker-content-digest")
        if media_type not in MANIFEST_TYPES or digest_text is None or not document.vouched:
            return None
        stored = StoredManifest(
            Digest.parse(digest_text.decode("latin-1")), media_type, document.body
        )
        try:
            self._store.put(stored)
        except OSError as failure:
            self._write_errors.record("manifest", str(stored.digest), describe(failure))
            return stored
        if media_type in INDEX_TYPES:
            Deferred.fromCoroutine(self._fetch_children(name, stored, headers))
        return stored

    async def _fetch_children(self, name: str, index: StoredManifest, headers: Headers) -> None:
        try:
            children = json.loads(index.body).get("manifests") or []
        except (ValueError, AttributeError):
            return
        for child in children:
            try:
                digest = Digest.parse(str(child.get("digest")))
                media_type = str(child.get("mediaType") or "")
            except (RegistryError, AttributeError):
                continue
            if media_type not in MANIFEST_TYPES or self._store.get(digest) is not None:
                continue
            child_headers = headers.copy()
            child_headers.setRawHeaders(b"accept", [media_type.encode()])
            key = f"digest\n{name}\n{digest}\n{media_type}"
            try:
                await self._work.run(
                    key,
                    lambda: self._fetch_and_store(name, digest, child_headers, Trace()),
                )
            except RegistryError as failure:
                self.log.info(
                    "could not prefetch {digest} of index {index}: {error}",
                    digest=str(digest),
                    index=str(index.digest),
                    error=failure.message,
                )

    async def _tag_entry(self, key: str) -> TagEntry | None:
        recent = self._recent_tags.get(key)
        if recent is not None:
            known, expires = recent
            if expires > self._clock.seconds():
                self._recent_tags.move_to_end(key)
                return known
            del self._recent_tags[key]
        entry = TagEntry.loads(await self._tags.get(key) or "")
        if entry is not None:
            self._keep_recent_tag(key, entry)
        return entry

    def _keep_recent_tag(self, key: str, entry: TagEntry) -> None:
        self._recent_tags[key] = (entry, entry.checked_at + self._ttl + self._stale_if_error)
        self._recent_tags.move_to_end(key)
        while len(self._recent_tags) > 10000:
            self._recent_tags.popitem(last=False)

    async def _remember_tag(
        self, key: str, stored: StoredManifest, asked_at: float, name: str, tag: str
    ) -> None:
        """
        Record that upstream answered C{stored} for the tag when asked at
        C{asked_at}, under the client's key and under its media type's (for
        stale-if-error to any client accepting that type). An entry that
        another process wrote from a later question is newer knowledge
        (the tag may have moved since C{asked_at}): it is not overwritten.
        A write the disk refuses leaves the entry in this process's memory
        only: the client still gets the manifest it asked for.
        """
        entry = TagEntry(str(stored.digest), stored.media_type, asked_at)
        latest = getattr(self._tags, "get_latest", self._tags.get)  # shared store first
        for entry_key in (key, _type_key(self._upstream, name, tag, stored.media_type)):
            current = TagEntry.loads(await latest(entry_key) or "")
            if current is not None and current.checked_at > asked_at:
                self._keep_recent_tag(entry_key, current)
                continue
            self._keep_recent_tag(entry_key, entry)
            try:
                await self._tags.set(entry_key, entry.dumps(), self._ttl + self._stale_if_error)
            except (OSError, LocalCacheError) as failure:
                reason = describe(failure) if isinstance(failure, OSError) else failure.message
                self._write_errors.record("tag", stored.digest.hex[:12], reason)
                return

    def _check_negative(self, key: str) -> None:
        remembered = self._negative.get(key)
        if remembered is None:
            return
        expires, failure = remembered
        if expires > self._clock.seconds():
            raise failure
        del self._negative[key]

    def _remember_negative(self, key: str, failure: UpstreamError) -> None:
        if failure.status != 404 or self._negative_ttl <= 0:
            return
        self._negative[key] = (self._clock.seconds() + self._negative_ttl, failure)
        trim_oldest(self._negative, 10000)


@functools.lru_cache(maxsize=4096)
def _digest(text: str) -> Digest:
    """C{Digest.parse}, remembered: a tag entry's digest is parsed on every hit."""
    return Digest.parse(text)


def _document(stored: StoredManifest, cache_status: str) -> Document:
    return Document(
        200,
        [
            (b"content-type", [stored.media_type.encode()]),
            (b"docker-content-digest", [str(stored.digest).encode()]),
        ],
        stored.body,
        cache_status=cache_status,
    )
