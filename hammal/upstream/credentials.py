"""
Where hammal's upstream credentials may go.

A configured password is for one registry. It goes to a token realm only if
that realm is the registry's own host, shares its registrable domain
(``registry-1.docker.io`` and ``auth.docker.io`` are both ``docker.io``,
judged by the Public Suffix List, so ``a.github.io`` and ``b.github.io`` are
not one site) or was listed by the operator (``--trusted-realm``); and it
never travels in clear over plain HTTP to a host that is not loopback unless
the operator said so (``--plain-http-credentials``).
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from urllib.parse import urlsplit

import attrs
from publicsuffixlist import PublicSuffixList


@lru_cache(maxsize=1)
def _suffixes() -> PublicSuffixList:
    # The list ships with the package: nothing is fetched at run time.
    return PublicSuffixList()


def load_suffix_list() -> None:
    """Parse the Public Suffix List now (about 0.1 s), not in a request."""
    _suffixes()


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def registrable_domain(host: str) -> str | None:
    """
    The registrable domain of C{host} (``docker.io`` for
    ``registry-1.docker.io``); L{None} for IP addresses and public suffixes.
    """
    host = host.lower().rstrip(".")
    if not host or _ip(host) is not None:
        return None
    domain: str | None = _suffixes().privatesuffix(host)
    return domain


def same_site(first: str, second: str) -> bool:
    """Whether two host names are one host or share a registrable domain."""
    first, second = first.lower().rstrip("."), second.lower().rstrip(".")
    if first == second:
        return True
    domain = registrable_domain(first)
    return domain is not None and domain == registrable_domain(second)


def is_loopback_host(host: str) -> bool:
    """``localhost``, ``*.localhost`` or a loopback address literal."""
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    address = _ip(host)
    return address is not None and address.is_loopback


@attrs.frozen
class CredentialPolicy:
    """
    The operator's rules for sending upstream credentials.

    @ivar trusted_realms: token realm hosts trusted beyond the upstream's
        own site (``--trusted-realm``), lower case.
    @ivar plain_http: send credentials over plain HTTP to non-loopback
        hosts too (``--plain-http-credentials``).
    """

    trusted_realms: frozenset[str] = frozenset()
    plain_http: bool = False

    def realm_trusted(self, upstream_host: str, realm_host: str) -> bool:
        """Whether the upstream's credentials may go to the token realm C{realm_host}."""
        realm_host = realm_host.lower()
        return realm_host in self.trusted_realms or same_site(upstream_host, realm_host)

    def transport_allowed(self, url: str) -> bool:
        """Whether credentials may travel to C{url} given its scheme."""
        parts = urlsplit(url)
        if parts.scheme == "https":
            return True
        return self.plain_http or is_loopback_host(parts.hostname or "")
