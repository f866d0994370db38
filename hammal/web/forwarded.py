"""
What a trusted reverse proxy says about a request: the scheme and host the
client used, and the client's address.

Behind a TLS-terminating proxy or CDN, hammal sees plain HTTP from the
proxy's address with the proxy's idea of ``Host``. When the peer is a
``--trusted-proxy``, ``Forwarded`` (RFC 7239) or else ``X-Forwarded-Proto``,
``X-Forwarded-Host`` (with ``X-Forwarded-Port``) and ``X-Forwarded-For``
decide the scheme and host hammal writes into challenges (``realm=``), the
front page and URLs it builds, and the client address in the access log.
From any other peer these headers are ignored.

The scheme and host come from the first (client-side) entry: proxies in
front of the trusted one may append, and the first is what the client
used. The client address is found like C{X-Forwarded-For} in the access
rules: from the right, skipping trusted proxies.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Sequence

import attrs
from twisted.web.http import Request

from hammal.access.rules import AccessRules

#: A host as a client may name it: name or IPv4 (with a port), or [IPv6].
_HOST = re.compile(r"(?:[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::(\d{1,5}))?\Z")

_PAIR = re.compile(r'\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*("(?:[^"\\]|\\.)*"|[^;,\s]*)\s*')


@attrs.frozen
class Forwarded:
    """What the proxy said: any of scheme, host (``name[:port]``) and client."""

    scheme: str | None = None
    host: str | None = None
    client: str | None = None


def parse_forwarded(values: Sequence[str]) -> list[dict[str, str]]:
    """
    The elements of ``Forwarded`` header values, each a dict of lower-case
    parameter names to unquoted values. A malformed element ends the list.
    """
    elements: list[dict[str, str]] = []
    text = ",".join(values)
    position = 0
    element: dict[str, str] = {}
    while position < len(text):
        match = _PAIR.match(text, position)
        if match is None:
            break
        value = match.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        element[match.group(1).lower()] = value
        position = match.end()
        if position < len(text) and text[position] == ";":
            position += 1
        elif position >= len(text) or text[position] == ",":
            elements.append(element)
            element = {}
            position += 1
        else:
            break
    return elements


def _node_address(node: str) -> str:
    """A ``for=`` node without brackets or port (``[::1]:80`` -> ``::1``)."""
    node = node.strip()
    if node.startswith("["):
        return node[1:].split("]", 1)[0]
    if node.count(":") == 1:
        return node.split(":", 1)[0]
    return node


class ForwardedHeaders:
    """Reads forwarding headers from C{trusted} peers (CIDRs) only."""

    def __init__(self, trusted: Sequence[str]) -> None:
        self._rules = AccessRules(trusted_proxies=trusted)
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
        elements = parse_forwarded(headers.get("forwarded", []))
        scheme = host = None
        if elements:
            scheme = elements[0].get("proto")
            host = elements[0].get("host")
            nodes = [_node_address(e["for"]) for e in elements if "for" in e]
            client = self._rules.client_ip(peer, nodes) if nodes else None
        else:
            client = None
        if scheme is None:
            scheme = _first(headers.get("x-forwarded-proto"))
        if host is None:
            host = _first(headers.get("x-forwarded-host"))
            port = _first(headers.get("x-forwarded-port"))
            if (
                host is not None
                and port is not None
                and port.isdigit()
                and ":" not in host.rsplit("]", 1)[-1]
            ):
                host = f"{host}:{port}"
        if client is None and headers.get("x-forwarded-for"):
            client = self._rules.client_ip(peer, headers["x-forwarded-for"])
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
        headers = {
            name.decode("latin-1").lower(): [v.decode("latin-1") for v in values]
            for name, values in request.requestHeaders.getAllRawHeaders()
            if name.lower() in _NAMES
        }
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
