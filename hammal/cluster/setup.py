"""
The cluster's parts built from the settings, for the composition root
(L{hammal.app.build_app}): the fill leases, the peer endpoint and client,
joined to the blob cache as its fill sources. The object store is not
the cluster's: it is the blob cache's storage
(L{hammal.storage.blobs.S3BlobStorage}), which the fills ask first.
"""

from __future__ import annotations

from typing import Any

import attrs
from treq.client import HTTPClient
from twisted.web.client import Agent, HTTPConnectionPool

from hammal.cache.blobs import BlobCache
from hammal.cluster.fill import ClusterFills, peer_lookup
from hammal.cluster.lease import FillLeases
from hammal.cluster.peer import PeerBlobResource, PeerClient
from hammal.cluster.peerauth import ClusterKeyError, PeerAuth
from hammal.config import ConfigError, Settings

#: Seconds a dead holder's lease outlives it: how long its peers wait
#: before one of them takes the fill over.
LEASE_TTL = 5.0


@attrs.frozen
class Cluster:
    """
    @ivar fills: the blob cache's fill sources.
    @ivar peer_endpoint: the resource to mount at L{hammal.cluster.peer.PEER_PATH}.
    """

    fills: ClusterFills
    peer_endpoint: PeerBlobResource


def cluster_http(reactor: Any, connect_timeout: float) -> HTTPClient:
    """A pooled client for peers and the object store (never an outbound proxy)."""
    pool = HTTPConnectionPool(reactor)
    pool.maxPersistentPerHost = 16
    return HTTPClient(Agent(reactor, pool=pool, connectTimeout=connect_timeout))


def build_cluster(
    settings: Settings,
    reactor: Any,
    redis: Any,
    blobs: BlobCache,
    http: Any = None,
) -> Cluster | None:
    """
    The cluster parts C{settings} ask for (C{--cluster-advertise}), joined
    to C{blobs} as its fill sources; L{None} without a cluster. The blob
    cache's storage (with C{--storage s3://...}, the bucket
    under the cache directory) is asked before the lease holder and keeps
    what is fetched from upstream.

    @raise ConfigError: when the cluster key is unusable.
    """
    if settings.cluster_advertise is None:
        return None
    if settings.cluster_key_file is None:
        raise ConfigError("--cluster-advertise needs --cluster-key-file")
    if http is None:
        http = cluster_http(reactor, settings.connect_timeout)
    try:
        auth = PeerAuth.from_file(settings.cluster_key_file, reactor)
    except ClusterKeyError as failure:
        raise ConfigError(str(failure))
    leases = FillLeases(redis, reactor, settings.cluster_advertise, ttl=LEASE_TTL)
    peers = PeerClient(http, auth, reactor, timeout=settings.read_timeout)
    endpoint = PeerBlobResource(
        peer_lookup(blobs), auth, reactor, stall_timeout=settings.read_timeout
    )
    fills = ClusterFills(reactor, blobs.store, leases, peers)
    blobs.fill_sources = fills
    return Cluster(fills, endpoint)
