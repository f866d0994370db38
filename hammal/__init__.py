"""
hammal: a Twisted-based Docker/OCI registry pull-through mirror.

A request walks the packages top to bottom:

- L{hammal.web}: the resource tree; routes, authenticates clients and
  writes responses (HTTP only).
- L{hammal.pull}: the pull service (one per upstream; L{hammal.pull.upstreams}
  picks it, L{hammal.pull.passthrough} confirms a client's own access,
  L{hammal.pull.resuming} relays an uncached blob and resumes it): what a
  pull means.
- L{hammal.cache}: where bytes come from when hammal has them (blobs,
  manifests on disk; one shared fetch per digest; readers and sendfile),
  over a blob storage: the local directory, or L{hammal.storage}'s S3
  bucket behind it.
- L{hammal.upstream}: the upstream client (auth, retries, redirects,
  outbound proxies; L{hammal.upstream.remote} fetches manifests) for what
  hammal lacks.
- L{hammal.stream}: bodies moved with backpressure; L{hammal.turns} bounds
  the cache readers' sends per reactor turn.

L{hammal.app} wires them (the composition root), L{hammal.tap} starts it
under twistd (L{hammal.accept}: ports that accept a few connections per
turn; L{hammal.collector}: the garbage collector's settings;
L{hammal.workers}: C{--workers} processes on one port);
L{hammal.reference}, L{hammal.errors}, L{hammal.ttlstore} and
L{hammal.metrics} serve every layer; L{hammal.access} and L{hammal.status}
are the gate's rules and the status page's data; L{hammal.cluster} joins
instances through fill leases in Redis and peer streaming; L{hammal.ops} is
the operator's command. tests/test_imports.py keeps the import graph free
of circles and of arrows pointing up its layers.
"""

__version__ = "0.1.0"
