"""
What a trusted reverse proxy says about a request: the scheme and host the
client used, and the client's address.

Behind a TLS-terminating proxy or CDN, hammal sees plain HTTP from the
proxy's address with the proxy's idea of ``Host``. When the peer is a
``--trusted-proxy``, the headers of the family it writes
(``--forwarded-header``: ``X-Forwarded-Proto``, ``X-Forwarded-Host`` with
``X-Forwarded-Port`` and ``X-Forwarded-For`` by default, or RFC 7239's
``Forwarded``; the other family is ignored, L{hammal.access.forwarding})
decide the scheme and host hammal writes into challenges (``realm=``), the
front page and URLs it builds, and the client address in the access log.
From any other peer these headers are ignored.

The scheme and host come from the first (client-side) entry: proxies in
front of the trusted one may append, and the first is what the client
used. The client address is found as the access rules find it: from the
right, skipping trusted proxies.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Sequence

import attrs
from twisted.web.http import Request

from hammal.access.forwarding import FORWARDED_HEADERS, forwarded_for, parse_forwarded
from hammal.access.rules import AccessRules

#: A host as a client may name it: name or IPv4 (with a port), or [IPv6].
_HOST = re.compile(r"(?:[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::(\d{1,5}))?\Z")


@attrs.frozen
class Forwarded:
    """What the proxy said: any of scheme, host (``name[:port]``) and client."""

    scheme: str | None = None
    host: str | None = None
    client: str | None = None


class ForwardedHeaders:
    """
    Reads forwarding headers from C{trusted} peers (CIDRs) only, and of
    those only the C{family} the proxy writes (L{FORWARDED_HEADERS}).
    """

    def __init__(self, trusted: Sequence[str], family: str = "x-forwarded") -> None:
        if family not in FORWARDED_HEADERS:
            raise ValueError(f"unknown forwarded header family {family!r}")
        self._family = family
        self._rules = AccessRules(trusted_proxies=trusted, forwarded_header=family)
        self._trusted = [ipaddress.ip_network(t.strip(), strict=False) for t in trusted]

    def trusts(self, peer: str) -> bool:
        """Whether C{peer} is a trusted proxy."""
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address.version == n.version and address in n for n in self._trusted)

    def read(self, peer: str, headers: dict[str, list[str]]) -> Forwarded | None:
        """
        What the proxy at C{peer} says about the request (header names in
        lower case), or L{None} when C{peer} is not trusted.
        """
        if not self.trusts(peer):
            return None
        if self._family == "forwarded":
            elements = parse_forwarded(headers.get("forwarded", []))
            scheme = elements[0].get("proto") if elements else None
            host = elements[0].get("host") if elements else None
        else:
            scheme = _first(headers.get("x-forwarded-proto"))
            host = _first(headers.get("x-forwarded-host"))
            port = _first(headers.get("x-forwarded-port"))
            if (
                host is not None
                and port is not None
                and port.isdigit()
                and ":" not in host.rsplit("]", 1)[-1]
            ):
                host = f"{host}:{port}"
        hops = forwarded_for(headers, self._family)
        client = self._rules.client_ip(peer, hops) if hops else None
        scheme = scheme.lower() if scheme and scheme.lower() in ("http", "https") else None
        host = host if host and _HOST.match(host) else None
        return Forwarded(scheme, host, client if client != peer else None)

    def apply(self, request: Request) -> Forwarded | None:
        """
        Make C{request} look as the client sent it: C{Host}, L{isSecure}
        and the URLs twisted.web builds. Returns what was applied.
        """
        address = request.getClientAddress()
        peer = str(getattr(address, "host", ""))
        headers = forwarding_headers(request)
        if not headers:
            return None
        forwarded = self.read(peer, headers)
        if forwarded is None:
            return None
        secure = request.isSecure() if forwarded.scheme is None else forwarded.scheme == "https"
        host = forwarded.host or (request.getHeader(b"host") or b"").decode("latin-1")
        if host and _HOST.match(host):
            name, port = _split_host(host, 443 if secure else 80)
            request.setHost(name.encode("ascii"), port, secure)
        return forwarded


_NAMES = frozenset(
    {
        b"forwarded",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-port",
    }
)


def _first(values: list[str] | None) -> str | None:
    if not values:
        return None
    first = values[0].split(",", 1)[0].strip()
    return first or None


def _split_host(host: str, default_port: int) -> tuple[str, int]:
    match = _HOST.match(host)
    if match is None:
        raise RuntimeError("hammal bug: expected match is not None")
    if match.group(1) is None:
        return host, default_port
    return host[: -len(match.group(1)) - 1], int(match.group(1))


def forwarding_headers(request: Request) -> dict[str, list[str]]:
    """The request's forwarding headers of either family, names in lower case."""
    return {
        name.decode("latin-1").lower(): [v.decode("latin-1") for v in values]
        for name, values in request.requestHeaders.getAllRawHeaders()
        if name.lower() in _NAMES
    }
