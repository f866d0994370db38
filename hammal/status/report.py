"""
The status report: everything ``/status`` and ``/status.json`` show, as
one JSON-ready document built on request.

It reads live objects (the recorder, the quota board, the upstream clients,
the blob cache) and hammal's Prometheus registry, and copies out plain
numbers and names. Nothing secret goes in: upstream accounts appear by
their non-secret name, URLs without credentials, and client addresses only
masked to their network unless C{show_clients}.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from typing import TYPE_CHECKING, Any, Sequence
from urllib.parse import urlsplit

import attrs
from prometheus_client import CollectorRegistry

from hammal import __version__, metrics
from hammal.status.recorder import StatusRecorder
from hammal.upstream.quota import QuotaBoard

if TYPE_CHECKING:
    from hammal.cache.blobs import BlobCache

#: The report's format; bumped when a field changes meaning or goes away.
SCHEMA = 1

HOUR_MINUTES = 60


@attrs.frozen
class RouteSource:
    """
    One configured upstream and how requests reach it.

    @ivar name: C{"default"} for ``--upstream``, else the ``--route`` host.
    @ivar client: its L{hammal.upstream.client.RegistryClient} (a
        L{hammal.pull.upstreams.FailoverClient} when it has mirrors).
    """

    name: str
    url: str
    client: Any


def mask_address(address: str) -> str:
    """A client address cut to its network: ``/24`` for IPv4, ``/48`` for IPv6."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return "-"
    prefix = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def _bare_url(url: str) -> str:
    """C{url} without any user information."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}"


def _ratio(hits: float, lookups: float) -> float | None:
    return round(hits / lookups, 4) if lookups else None


class RepositoryNames:
    """
    Repository names as the status page may show them: as they are, or
    (with C{--auth passthrough}, where each tenant's repositories are its
    own) as a digest keyed with a secret of this process, so that the page
    still tells one repository from another without naming any.
    """

    def __init__(self, shown: bool, key: bytes | None = None) -> None:
        self._shown = shown
        self._key = key if key is not None else os.urandom(32)

    def shown(self, upstream: str, repository: str) -> str:
        """C{repository} of C{upstream}, or its stand-in."""
        if self._shown:
            return repository
        mac = hmac.new(self._key, f"{upstream}/{repository}".encode(), hashlib.sha256)
        return f"hidden:{mac.hexdigest()[:12]}"


class StatusReport:
    """Builds the status document from hammal's live objects."""

    def __init__(
        self,
        recorder: StatusRecorder,
        quotas: QuotaBoard,
        routes: Sequence[RouteSource] = (),
        blobs: BlobCache | None = None,
        cache_max_size: int | None = None,
        show_clients: bool = False,
        registry: CollectorRegistry = metrics.REGISTRY,
        show_repositories: bool = True,
    ) -> None:
        self._recorder = recorder
        self._quotas = quotas
        self._routes = list(routes)
        self._blobs = blobs
        self._cache_max_size = cache_max_size
        self._show_clients = show_clients
        self._registry = registry
        self._repository_names = RepositoryNames(show_repositories)

    def build(self) -> dict[str, Any]:
        """The whole document."""
        recorder = self._recorder
        recorder.catch_up()
        now = recorder.clock.seconds()
        hour = recorder.minutes.series(now, HOUR_MINUTES)
        day = recorder.minutes.series(now, recorder.minutes.size)
        by_pulls, by_bytes = recorder.repositories.top(now, 10)
        return {
            "schema": SCHEMA,
            "version": __version__,
            "now": now,
            "uptime_seconds": round(now - recorder.started_at, 3),
            "upstreams": self._upstreams(now),
            "cache": self._cache(hour, day),
            "totals": {"hour": _totals(hour), "day": _totals(day)},
            "series": {
                "minute_seconds": 60,
                "hour": hour,
                "day": day,
            },
            "transfers": self._transfers(),
            "top_repositories": {
                "window_hours": 24,
                "by_pulls": [self._use(use) for use in by_pulls],
                "by_bytes": [self._use(use) for use in by_bytes],
            },
            "quota": self._quota(now),
        }

    def _use(self, use: Any) -> dict[str, Any]:
        entry = attrs.asdict(use)
        entry["repository"] = self._repository_names.shown(use.upstream, use.repository)
        return entry

    def _upstreams(self, now: float) -> list[dict[str, Any]]:
        errors = self._samples("hammal_upstream_errors_total")
        failovers = self._samples("hammal_upstream_failovers_total")
        out = []
        for route in self._routes:
            health = getattr(route.client, "health", None)
            members = health() if health is not None else [(route.client, None)]
            shown = []
            for member, resting_until in members:
                host = member.upstream.host
                reached = getattr(member, "last_reached", None)
                member_errors = {
                    labels["kind"]: int(value)
                    for labels, value in errors
                    if labels.get("host") == host and value
                }
                state = "unknown"
                if resting_until is not None:
                    state = "cooling down"
                elif reached is not None:
                    state = "ok"
                elif member_errors:
                    state = "failing"
                shown.append(
                    {
                        "host": host,
                        "url": _bare_url(member.upstream.url),
                        "state": state,
                        "last_success_seconds_ago": (
                            None if reached is None else round(now - reached, 3)
                        ),
                        "cooldown_seconds_left": (
                            None if resting_until is None else round(resting_until - now, 3)
                        ),
                        "errors": member_errors,
                        "failovers": int(
                            sum(v for labels, v in failovers if labels.get("host") == host)
                        ),
                    }
                )
            out.append({"route": route.name, "url": _bare_url(route.url), "members": shown})
        return out

    def _cache(self, hour: dict[str, list[float]], day: dict[str, list[float]]) -> dict[str, Any]:
        blobs = self._blobs
        document: dict[str, Any] = {
            "enabled": blobs is not None,
            "size_bytes": blobs.store.total_size if blobs is not None else 0,
            "max_size_bytes": self._cache_max_size,
            "blobs": len(blobs.store) if blobs is not None else 0,
        }
        for name, series in (("hour", hour), ("day", day)):
            document[name] = {
                "hit_ratio": _ratio(sum(series["cache_hits"]), sum(series["cache_lookups"])),
                "bytes_from_cache": int(sum(series["bytes_from_cache"])),
                "bytes_from_upstream": int(sum(series["bytes_from_upstream"])),
            }
        return document

    def _transfers(self) -> list[dict[str, Any]]:
        if self._blobs is None:
            return []
        out = []
        for transfer in self._blobs.transfers():
            fetch = transfer.fetch
            clients = list(transfer.clients)
            entry: dict[str, Any] = {
                "digest": str(fetch.digest),
                "upstream": transfer.upstream,
                "repository": self._repository_names.shown(transfer.upstream, transfer.repository),
                "bytes": fetch.written,
                "size": fetch.size,
                "clients": len(clients),
            }
            entry["client_addresses"] = (
                clients if self._show_clients else sorted({mask_address(c) for c in clients})
            )
            out.append(entry)
        return out

    def _quota(self, now: float) -> list[dict[str, Any]]:
        return [
            {
                "upstream": quota.upstream,
                "account": quota.account,
                "remaining": quota.remaining,
                "limit": quota.limit,
                "window_seconds": quota.window,
                "observed_seconds_ago": (
                    None if quota.observed_at is None else round(now - quota.observed_at, 3)
                ),
                "resting_seconds_left": (
                    None
                    if quota.resting_until is None or quota.resting_until <= now
                    else round(quota.resting_until - now, 3)
                ),
            }
            for quota in self._quotas.quotas()
        ]

    def _samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        return [
            (sample.labels, sample.value)
            for family in self._registry.collect()
            for sample in family.samples
            if sample.name == name
        ]


def _totals(series: dict[str, list[float]]) -> dict[str, Any]:
    totals: dict[str, Any] = {field: int(sum(values)) for field, values in series.items()}
    totals["hit_ratio"] = _ratio(totals["cache_hits"], totals["cache_lookups"])
    return totals
