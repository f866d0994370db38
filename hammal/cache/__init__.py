"""
The pull-through cache: the policy here, the bytes on disk below.

- L{blobs}: hit, miss, range and fill decisions for blobs
  (L{blobs.BlobCache.serve}); L{fetch}: one upstream fetch per digest,
  written to a temporary file, verified, committed; L{growing}: what the
  cache knows of a fill in progress (L{growing.GrowingFill}: a local fetch
  or L{sibling}, another process's fill followed through its file).
- L{storage}: the interface of where committed blobs live
  (L{storage.BlobStorage}); the blob cache never knows which one it has.
  L{store} is the local directory (the blob files, their size limits and
  eviction); L{hammal.storage.blobs} puts it over an S3 bucket.
  L{sources}: where a fill's bytes come from (the storage's other tiers
  first, then upstream; a cluster adds the lease holder between).
- L{coordinate}, L{shared_room}, L{takeover}: several processes sharing one
  directory (one fill per digest, one size limit, a fill taken over when
  its process dies; L{liveness}: whether a writer's process still runs);
  L{sweep}: the periodic clean-up.
- L{readers}: readers of a complete or growing cache file (pread, and
  C{os.sendfile} on plain TCP through L{rawsocket}); L{bypass}: going on
  from upstream when the cache fails locally.
- L{manifests}: manifests by digest on disk, tag entries with a TTL and
  stale-if-error; L{layers}: which layers a stale manifest named.
- L{writes}: local write failures, reported once a minute.

Nothing here knows about HTTP requests: the pull service hands in what to
fetch from upstream (a callable) and gets replies back.
"""
