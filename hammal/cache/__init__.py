"""
The pull-through cache: the policy here, the bytes on disk.

- L{blobs}: hit, miss, range and fill decisions for blobs
  (L{blobs.BlobCache.serve}); L{fetch}: one upstream fetch per digest,
  written to a temporary file, verified, committed; L{store}: the blob
  files, their size limits and eviction; L{sweep}: the periodic clean-up.
- L{readers}: readers of a complete or growing cache file (pread, and
  C{os.sendfile} on plain TCP through L{rawsocket}); L{bypass}: going on
  from upstream when the cache fails locally.
- L{manifests}: manifests by digest on disk, tag entries with a TTL and
  stale-if-error; L{layers}: which layers a stale manifest named.
- L{writes}: local write failures, reported once a minute.

Nothing here knows about HTTP requests: the pull service hands in what to
fetch from upstream (a callable) and gets replies back.
"""
