"""
Many registries behind one mirror: choosing the upstream for a request,
and failing over between an upstream and its mirrors.

A request names its upstream, in order of precedence, by ``?upstream=``
(only hosts in ``--allow-upstream``), containerd's ``?ns=`` (only configured
registries), a registry host as the first path component
(``/v2/ghcr.io/owner/repo/...``), or the ``Host`` header (``--route``);
otherwise the default ``--upstream`` serves it. Nothing a client sends ever
becomes a host hammal connects to unless the operator listed it.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from hammal import metrics
from hammal.errors import Denied, NotFound, RegistryError, UpstreamTimeout, UpstreamUnavailable
from hammal.pull.service import PullService
from hammal.reference import registry_names
from hammal.upstream.client import Trace, Upstream, UpstreamClient

__all__ = ["FailoverClient", "Selection", "UpstreamSelector", "registry_names"]


@attrs.frozen
class Selection:
    """The proxy for a request, and the repository name with any prefix removed."""

    proxy: PullService
    name: str


class UpstreamSelector:
    """
    Picks the L{PullService} for each request.

    @param default: serves requests nothing else claims; L{None} answers
        them with a 404 listing the configured hosts.
    @param by_host: mirror host names (``Host`` header) to proxies.
    @param registries: every configured proxy; ``?ns=`` and path prefixes
        may name any of them by registry host.
    @param adhoc: builds a proxy for an ``--allow-upstream`` host.
    @param stands_for: upstream URL to the registry it stands for
        (``--upstream docker.io=https://mirror.gcr.io``): clients' ``?ns=``
        and path prefixes may name it by that registry too.
    """

    log = Logger()

    def __init__(
        self,
        default: PullService | None,
        by_host: dict[str, PullService],
        registries: Sequence[tuple[str, PullService]],
        allow_upstream: frozenset[str] = frozenset(),
        adhoc: Callable[[str], PullService] | None = None,
        stands_for: Mapping[str, str] | None = None,
    ) -> None:
        self._default = default
        self._by_host = {host.lower(): proxy for host, proxy in by_host.items()}
        self._by_registry: dict[str, PullService] = {}
        aliases = stands_for or {}
        for url, proxy in registries:
            for name in registry_names(url, aliases.get(url)):
                self._by_registry.setdefault(name, proxy)
        self._allow_upstream = frozenset(h.lower() for h in allow_upstream)
        self._adhoc = adhoc
        self._adhoc_proxies: dict[str, PullService] = {}

    def select(
        self, host: str | None, ns: str | None, upstream: str | None, name: str
    ) -> Selection:
        """
        The proxy for a request to repository C{name}.

        @raise Denied: for an ``?upstream=`` or ``?ns=`` hammal may not use.
        @raise NotFound: when no upstream serves the request.
        """
        if upstream is not None:
            return Selection(self._allowed_upstream(upstream), name)
        if ns is not None:
            proxy = self._by_registry.get(ns.lower())
            if proxy is None:
                raise Denied(f"ns={ns[:100]!r} is not a registry this mirror serves")
            return Selection(proxy, name)
        first, _, rest = name.partition("/")
        if rest and ("." in first or first == "localhost"):
            proxy = self._by_registry.get(first)
            if proxy is not None:
                return Selection(proxy, rest)
        proxy = self._by_host.get(_host_name(host))
        if proxy is not None:
            return Selection(proxy, name)
        if self._default is not None:
            return Selection(self._default, name)
        raise NotFound(
            "this mirror does not serve that host",
            detail={"hosts": sorted(self._by_host)},
        )

    def registry_prefix(self, name: str) -> str | None:
        """
        The registry host C{name} starts with when that prefix routes the
        request (``ghcr.io`` for ``ghcr.io/owner/repo``), else L{None}.
        """
        first, _, rest = name.partition("/")
        if rest and ("." in first or first == "localhost") and first in self._by_registry:
            return first
        return None

    def base_allowed(self, host: str | None) -> bool:
        """Whether ``/v2/`` on C{host} should answer (any upstream serves it)."""
        return self._default is not None or _host_name(host) in self._by_host

    def hosts(self) -> list[str]:
        return sorted(self._by_host)

    def _allowed_upstream(self, value: str) -> PullService:
        # Only hosts the operator listed are ever contacted, so loopback,
        # link-local and private addresses are reachable only when listed.
        host = value.strip().lower()
        if host not in self._allow_upstream or self._adhoc is None:
            raise Denied(f"upstream={value[:100]!r} is not allowed on this mirror")
        proxy = self._adhoc_proxies.get(host)
        if proxy is None:
            proxy = self._adhoc_proxies[host] = self._adhoc(host)
        return proxy


def _host_name(host: str | None) -> str:
    """The host of a ``Host`` header, lower-case, without the port."""
    if not host:
        return ""
    host = host.strip().lower()
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class FailoverClient:
    """
    An upstream and its mirrors, tried in order: a member that fails to
    answer (connection, timeout, 5xx) is skipped for C{cooldown} seconds.
    Presents L{UpstreamClient}'s interface.
    """

    log = Logger()

    def __init__(
        self, members: Sequence[UpstreamClient], clock: IReactorTime, cooldown: float = 30.0
    ) -> None:
        if not members:
            raise RuntimeError("hammal bug: expected members")
        self._members = list(members)
        self._clock = clock
        self._cooldown = cooldown
        self._resting: dict[int, float] = {}

    @property
    def upstream(self) -> Upstream:
        return self._members[0].upstream

    @property
    def read_timeout(self) -> float:
        return self._members[0].read_timeout

    @property
    def deadline(self) -> float:
        return self._members[0].deadline

    def _order(self) -> list[int]:
        now = self._clock.seconds()
        healthy = [i for i in range(len(self._members)) if self._resting.get(i, 0) <= now]
        resting = sorted(
            (i for i in range(len(self._members)) if i not in healthy),
            key=lambda i: self._resting[i],
        )
        return healthy + resting

    async def request(
        self,
        method: bytes,
        name: str,
        path: str,
        headers: Headers,
        trace: Trace,
        follow_redirects: bool = True,
    ) -> IResponse:
        last_error: RegistryError | None = None
        order = self._order()
        for position, index in enumerate(order):
            member = self._members[index]
            try:
                response = await member.request(
                    method, name, path, headers, trace, follow_redirects
                )
            except (UpstreamUnavailable, UpstreamTimeout) as failure:
                last_error = failure
                self._rest(index, failure.message)
                continue
            if response.code >= 500 and position < len(order) - 1:
                self._rest(index, f"HTTP {response.code}")
                # However large, slow or stalled its error page: on to the next.
                await member.discard(response)
                continue
            return response
        if last_error is None:
            raise RuntimeError("hammal bug: expected last_error is not None")
        raise last_error

    def _rest(self, index: int, reason: str) -> None:
        host = self._members[index].upstream.host
        if self._resting.get(index, 0) <= self._clock.seconds():
            self.log.warn(
                "upstream {host} failed ({reason}); trying the next mirror for {cooldown:g}s",
                host=host,
                reason=reason,
                cooldown=self._cooldown,
            )
        self._resting[index] = self._clock.seconds() + self._cooldown
        metrics.upstream_failovers.labels(host).inc()

    async def fetch_document(self, response: IResponse, limit: int) -> bytes:
        return await self._members[0].fetch_document(response, limit)

    async def discard(self, response: IResponse) -> None:
        await self._members[0].discard(response)

    async def send_direct(self, method: bytes, url: str, headers: Headers) -> IResponse:
        return await self._members[0].send_direct(method, url, headers)

    async def reachable(self, within: float) -> str | None:
        problems = []
        for member in self._members:
            problem = await member.reachable(within)
            if problem is None:
                return None
            problems.append(problem)
        return "; ".join(problems)

    def health(self) -> list[tuple[UpstreamClient, float | None]]:
        """Each member, and until when it rests after a failure (L{None}: not resting)."""
        now = self._clock.seconds()
        return [
            (member, self._resting[i] if self._resting.get(i, 0) > now else None)
            for i, member in enumerate(self._members)
        ]
