"""
hammal's Prometheus metrics, on a registry of hammal's own.

Everything is defined here, in one place, so that the names form one
documented set; the code that observes an event imports the metric it
moves. Labels are bounded: routes, status codes, upstream hosts,
outcomes, never names or digests.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

requests = Counter(
    "hammal_requests",
    "Client requests by route kind and status.",
    ["route", "status"],
    registry=REGISTRY,
)
response_bytes = Counter(
    "hammal_response_bytes",
    "Body bytes sent to clients.",
    ["route"],
    registry=REGISTRY,
)
request_duration = Histogram(
    "hammal_request_duration_seconds",
    "Time from request to the end of the response.",
    ["route"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
open_connections = Gauge(
    "hammal_open_connections", "Client connections open now.", registry=REGISTRY
)
in_flight_requests = Gauge(
    "hammal_in_flight_requests", "Client requests being served now.", registry=REGISTRY
)

upstream_requests = Counter(
    "hammal_upstream_requests",
    "HTTP exchanges with upstream hosts (registry, token realm, CDN) by status.",
    ["host", "status"],
    registry=REGISTRY,
)
upstream_latency = Histogram(
    "hammal_upstream_latency_seconds",
    "Time until upstream's response headers arrived.",
    ["host"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
upstream_errors = Counter(
    "hammal_upstream_errors",
    "Upstream exchanges that failed without a response, by kind.",
    ["host", "kind"],
    registry=REGISTRY,
)
upstream_retries = Counter(
    "hammal_upstream_retries",
    "Retries of upstream requests.",
    ["upstream"],
    registry=REGISTRY,
)
upstream_failovers = Counter(
    "hammal_upstream_failovers",
    "Times an upstream or mirror failed and the next one was tried.",
    ["host"],
    registry=REGISTRY,
)
upstream_bytes = Counter(
    "hammal_upstream_bytes",
    "Body bytes received from upstream for blobs.",
    registry=REGISTRY,
)
upstream_ratelimit_remaining = Gauge(
    "hammal_upstream_ratelimit_remaining",
    "Docker Hub's ratelimit-remaining for hammal's upstream identity.",
    ["upstream", "identity"],
    registry=REGISTRY,
)
upstream_account_remaining = Gauge(
    "hammal_upstream_account_remaining",
    "ratelimit-remaining last seen for each --upstream-credentials-file account (by user name).",
    ["upstream", "account"],
    registry=REGISTRY,
)
upstream_account_resting = Gauge(
    "hammal_upstream_account_resting",
    "1 while an --upstream-credentials-file account rests after exhausting its pull limit.",
    ["upstream", "account"],
    registry=REGISTRY,
)

token_cache = Counter(
    "hammal_token_cache_lookups",
    "Upstream token lookups by result (hit, miss).",
    ["result"],
    registry=REGISTRY,
)
cache_responses = Counter(
    "hammal_cache_responses",
    "Responses by cache outcome (hit, miss, coalesced, revalidated, stale, bypass).",
    ["kind", "outcome"],
    registry=REGISTRY,
)
blob_cache_evictions = Counter(
    "hammal_blob_cache_evictions", "Blobs evicted from the cache.", registry=REGISTRY
)
blob_cache_size = Gauge(
    "hammal_blob_cache_size_bytes", "Bytes of blobs in the cache.", registry=REGISTRY
)
blob_cache_blobs = Gauge("hammal_blob_cache_blobs", "Blobs in the cache.", registry=REGISTRY)
blob_fetches = Counter(
    "hammal_blob_fetches", "Upstream blob fetches started by the cache.", registry=REGISTRY
)
cluster_fill_sources = Counter(
    "hammal_cluster_fill_sources",
    "Where blob fills got their bytes in a cluster (upstream, peer, store), per request.",
    ["source"],
    registry=REGISTRY,
)
object_store_failures = Counter(
    "hammal_object_store_failures",
    "Object store (--storage s3://...) requests that failed, by operation (read, upload);"
    " the blob was cached locally only.",
    ["operation"],
    registry=REGISTRY,
)
coalesced_readers = Gauge(
    "hammal_blob_readers",
    "Clients reading cached blobs or following transfers in flight.",
    registry=REGISTRY,
)
blob_fills_in_flight = Gauge(
    "hammal_blob_fills_in_flight",
    "Upstream blob transfers into the cache in flight now.",
    registry=REGISTRY,
)
digest_mismatches = Counter(
    "hammal_digest_mismatches",
    "Upstream transfers rejected because their bytes did not match the digest.",
    registry=REGISTRY,
)
cache_bypasses = Counter(
    "hammal_cache_bypasses",
    "Blob reads that went on from upstream because the cache failed them locally.",
    registry=REGISTRY,
)
coalesced_work = Counter(
    "hammal_coalesced_work",
    "Calls for shared work (manifest, referrers, token), by whether they started"
    " it or joined a run already in flight.",
    ["work", "outcome"],
    registry=REGISTRY,
)
cache_write_errors = Counter(
    "hammal_cache_write_errors",
    "Cache writes that failed (disk full, read-only, permissions, I/O errors) or were"
    " refused for want of room, by what was written (blob, manifest, tag).",
    ["kind"],
    registry=REGISTRY,
)


def outcome_of(cache_status: str) -> str:
    """The short outcome label for a ``Cache-Status`` value."""
    if "detail=coalesced" in cache_status:
        return "coalesced"
    if "stale-if-error" in cache_status:
        return "stale"
    if "fwd=stale" in cache_status:
        return "revalidated"
    if "fwd=bypass" in cache_status:
        return "bypass"
    if "fwd=miss" in cache_status:
        return "miss"
    return "hit"


sibling_fills = Counter(
    "hammal_blob_sibling_fills",
    "Blob misses served by following the fill of another process sharing the cache"
    " directory (--workers) instead of fetching upstream.",
    registry=REGISTRY,
)

pumped_bodies = Counter(
    "hammal_pumped_bodies",
    "Upstream blob bodies read on a pump thread instead of the event loop, by connection"
    " (tcp, tls).",
    ["kind"],
    registry=REGISTRY,
)


_LABELLED: dict[tuple[object, tuple[str, ...]], Any] = {}


def labelled(metric: Any, *values: str) -> Any:
    """
    C{metric.labels(*values)}, kept: prometheus_client takes a lock and
    builds a key on every C{labels} call, which showed on every request's
    path. Labels are bounded here (routes, statuses, outcomes), and hammal
    never removes a child.
    """
    key = (metric, values)
    child = _LABELLED.get(key)
    if child is None:
        child = _LABELLED[key] = metric.labels(*values)
    return child
