"""
Manifests by digest in the shared object store (C{--storage s3://...}),
beside the blobs: a new or restarted instance serves a pull by digest
without asking upstream. Tags stay in Redis (they change; digests do not).

Each object is the manifest's media type, a newline, and its exact bytes;
its digest is checked again when it is read, so a damaged or foreign
object is refetched from upstream, never served.
"""

from __future__ import annotations

from typing import Any, Callable, Coroutine

import treq
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from hammal.cache.manifests import ManifestStore, RemoteManifests, StoredManifest
from hammal.reference import Digest, Reference
from hammal.replies import Document
from hammal.storage.health import StoreHealth
from hammal.storage.objects import ObjectStore, object_key
from hammal.storage.s3 import S3NotFound
from hammal.upstream.client import Trace

log = Logger()

FetchManifest = Callable[[str, Reference, Headers, Trace], Coroutine[Any, Any, Document]]
"""GETs a manifest upstream (verified) as a L{Document}."""

#: The largest manifest object read back (hammal caches none bigger).
MAX_MANIFEST = 8 * 1024 * 1024

#: Digests known to be in the store, remembered up to this many.
_KNOWN_LIMIT = 100000


class SharedManifests:
    """Reads and writes manifests by digest in the object store."""

    def __init__(self, objects: ObjectStore, health: StoreHealth) -> None:
        self._objects = objects
        self._health = health
        self._known: set[Digest] = set()

    def _key(self, digest: Digest) -> str:
        return object_key("manifests", str(digest))

    def _remember(self, digest: Digest) -> None:
        if len(self._known) >= _KNOWN_LIMIT:
            self._known.clear()
        self._known.add(digest)

    async def read(self, digest: Digest) -> StoredManifest | None:
        """The stored manifest, verified; L{None} when absent, damaged or the store fails."""
        if not self._health.usable():
            return None
        try:
            response = await self._objects.read(self._key(digest))
            chunks: list[bytes] = []
            size = 0

            def keep(data: bytes) -> None:
                nonlocal size
                size += len(data)
                if size > MAX_MANIFEST + 256:
                    raise ValueError("a manifest object larger than any manifest")
                chunks.append(data)

            await treq.collect(response, keep)
        except S3NotFound:
            self._health.answered()
            return None
        except Exception as e:  # noqa: BLE001 - a failing store is skipped, never fatal
            self._health.failed("read", str(e) or type(e).__name__)
            return None
        self._health.answered()
        media_type, _, body = b"".join(chunks).partition(b"\n")
        if Digest.of(body, digest.algorithm) != digest:
            log.warn("the stored manifest {digest} does not match it: ignored", digest=str(digest))
            return None
        self._remember(digest)
        return StoredManifest(digest, media_type.decode("ascii", "replace"), body)

    def write(self, manifest: StoredManifest) -> Deferred[None]:
        """Store C{manifest} (verified by the caller) unless it is known to be there."""
        if manifest.digest in self._known:
            return Deferred.fromCoroutine(_nothing())
        return Deferred.fromCoroutine(self._write(manifest))

    async def _write(self, manifest: StoredManifest) -> None:
        upload = self._objects.open_upload(self._key(manifest.digest))
        try:
            await upload.write(
                manifest.media_type.encode("ascii", "replace") + b"\n" + manifest.body
            )
            await upload.complete()
        except Exception as e:  # noqa: BLE001 - a failing store is skipped, never fatal
            self._health.failed("upload", str(e) or type(e).__name__)
            await upload.abort()
            return
        self._health.answered()
        self._remember(manifest.digest)

    def fetch_through(self, fetch: FetchManifest) -> FetchManifest:
        """C{fetch}, asking the store first for a manifest by digest."""

        async def fetch_manifest(
            name: str, reference: Reference, headers: Headers, trace: Trace
        ) -> Document:
            if isinstance(reference, Digest):
                stored = await self.read(reference)
                if stored is not None:
                    return Document(
                        200,
                        [
                            (b"content-type", [stored.media_type.encode()]),
                            (b"docker-content-digest", [str(stored.digest).encode()]),
                        ],
                        stored.body,
                    )
            return await fetch(name, reference, headers, trace)

        return fetch_manifest

    def remote_through(self, remote: RemoteManifests) -> RemoteManifests:
        """C{remote}, whose GETs by digest ask the store first."""
        return _StoreFirst(remote, self.fetch_through(remote.fetch))


class _StoreFirst:
    """A remote side whose manifests by digest come from the store when it has them."""

    def __init__(self, remote: RemoteManifests, fetch: FetchManifest) -> None:
        self._remote = remote
        self.fetch = fetch

    async def head_digest(
        self, upstream_name: str, tag: str, headers: Headers, trace: Trace
    ) -> str | None:
        return await self._remote.head_digest(upstream_name, tag, headers, trace)


async def _nothing() -> None:
    return None


class SharedManifestStore(ManifestStore):
    """A L{ManifestStore} that also puts each new manifest in the object store."""

    def __init__(self, root: str, shared: SharedManifests, **options: Any) -> None:
        super().__init__(root, **options)
        self._shared = shared

    def put(self, manifest: StoredManifest) -> None:
        try:
            super().put(manifest)
        finally:
            self._shared.write(manifest).addErrback(_log_failure)


def _log_failure(failure: Any) -> None:
    log.failure("storing a manifest in the object store failed", failure)
