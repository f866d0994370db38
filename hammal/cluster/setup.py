"""
The cluster's parts built from the settings, for the composition root
(L{hammal.app.build_app}): the fill leases, the peer endpoint and client,
the object store, joined to the blob cache as its fill sources.
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
from hammal.storage.health import StoreHealth
from hammal.storage.s3 import S3Credentials, S3Store

#: Seconds a dead holder's lease outlives it: how long its peers wait
#: before one of them takes the fill over.
LEASE_TTL = 5.0


@attrs.frozen
class Cluster:
    """
    @ivar fills: the blob cache's fill sources.
    @ivar peer_endpoint: the resource to mount at
        L{hammal.cluster.peer.PEER_PATH}, or L{None} without a cluster.
    """

    fills: ClusterFills
    peer_endpoint: PeerBlobResource | None


def cluster_http(reactor: Any, connect_timeout: float) -> HTTPClient:
    """A pooled client for peers and the object store (never an outbound proxy)."""
    pool = HTTPConnectionPool(reactor)
    pool.maxPersistentPerHost = 16
    return HTTPClient(Agent(reactor, pool=pool, connectTimeout=connect_timeout))


def object_store(settings: Settings, reactor: Any, http: Any) -> S3Store | None:
    """
    The object store of C{--storage s3://...}, or L{None} for C{file}.

    @raise ConfigError: when the S3 credentials are missing.
    """
    if settings.storage is None:
        return None
    if settings.s3_endpoint is None:
        raise ConfigError("--storage s3://... needs --s3-endpoint URL")
    try:
        credentials = S3Credentials.from_environ()
    except ValueError as failure:
        raise ConfigError(f"--storage s3://{settings.storage.bucket}: {failure}")
    return S3Store(
        settings.s3_endpoint,
        settings.storage,
        credentials,
        http,
        reactor,
        timeout=settings.read_timeout,
    )


def build_cluster(
    settings: Settings,
    reactor: Any,
    redis: Any,
    blobs: BlobCache,
    http: Any = None,
    objects: S3Store | None = None,
    health: StoreHealth | None = None,
) -> Cluster | None:
    """
    The cluster parts C{settings} ask for (C{--storage s3://...},
    C{--cluster-advertise}), joined to C{blobs}; L{None} when neither is
    given. C{objects}: the store L{object_store} made, if made already.

    @raise ConfigError: when the S3 credentials or the cluster key are unusable.
    """
    if settings.storage is None and settings.cluster_advertise is None:
        return None
    if http is None:
        http = cluster_http(reactor, settings.connect_timeout)
    if objects is None:
        objects = object_store(settings, reactor, http)
    leases = peers = endpoint = None
    if settings.cluster_advertise is not None:
        if settings.cluster_key_file is None:
            raise ConfigError("--cluster-advertise needs --cluster-key-file")
        try:
            auth = PeerAuth.from_file(settings.cluster_key_file, reactor)
        except ClusterKeyError as failure:
            raise ConfigError(str(failure))
        leases = FillLeases(redis, reactor, settings.cluster_advertise, ttl=LEASE_TTL)
        peers = PeerClient(http, auth, reactor, timeout=settings.read_timeout)
        endpoint = PeerBlobResource(
            peer_lookup(blobs), auth, reactor, stall_timeout=settings.read_timeout
        )
    fills = ClusterFills(reactor, leases, peers, objects, health=health)
    blobs.fill_sources = fills
    return Cluster(fills, endpoint)
