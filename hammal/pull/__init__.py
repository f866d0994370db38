"""
The pull service: what a pull means, between the resource tree and the
stores.

- L{service}: L{service.PullService}, one per upstream: manifests, blobs,
  tags and referrers through the caches, or straight upstream when hammal
  keeps nothing.
- L{upstreams}: which pull service (and upstream) serves a request, and
  failover to mirrors.
- L{passthrough}: in passthrough mode, a client's own login upstream and the
  confirmation that it may read what it asks for.
- L{referrers}: the OCI 1.1 referrers API (or its tag-schema fallback).
- L{resuming}: a whole blob relayed uncached (too large, a full disk, no
  cache), resumed with C{Range} when upstream breaks mid-body.

It reads through L{hammal.cache} and fetches with L{hammal.upstream}; it
never writes HTTP (L{hammal.web} does).
"""
