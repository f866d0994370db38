"""
Which outbound requests go through a forward proxy, and which proxy.

The rules are those of curl and Python's urllib: ``HTTPS_PROXY`` for
``https://`` URLs, ``HTTP_PROXY`` for ``http://`` ones (lower-case names
win over upper-case ones), ``--upstream-proxy`` over both, and only
``NO_PROXY`` exempts a host -- loopback addresses included, so that a test
upstream on 127.0.0.1 goes through the proxy unless listed.

``NO_PROXY`` holds comma- or space-separated entries: ``*`` (every host),
host names matched as suffixes at a dot boundary (``example.com`` and
``.example.com`` both cover ``a.example.com``; urllib's own matcher does
this), optionally with ``:PORT``, and IP addresses or CIDR blocks matched
against IP-literal hosts.

Nothing here touches the network: L{ProxyRules.proxy_for} is a pure
function of a URL.
"""

from __future__ import annotations

import base64
import ipaddress
from typing import Mapping, Union
from urllib.parse import unquote, urlsplit
from urllib.request import proxy_bypass_environment  # type: ignore[attr-defined]

import attrs

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

#: ``--upstream-proxy`` values that mean "no proxy, whatever the environment says".
DIRECT = frozenset({"none", "direct"})


@attrs.frozen
class ProxyURL:
    """
    A forward proxy: ``http://[user:password@]host:port``. The credentials
    are never part of C{repr} or L{safe_url}.
    """

    host: str
    port: int
    username: str | None = attrs.field(default=None, repr=False)
    password: str | None = attrs.field(default=None, repr=False)

    @property
    def safe_url(self) -> str:
        """The URL for logs and messages: credentials replaced by ``***``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        userinfo = "***@" if self.username is not None else ""
        return f"http://{userinfo}{host}:{self.port}"

    @property
    def authorization(self) -> bytes | None:
        """The ``Proxy-Authorization`` value for the URL's userinfo, if any."""
        if self.username is None:
            return None
        pair = f"{self.username}:{self.password or ''}".encode()
        return b"Basic " + base64.b64encode(pair)


def parse_proxy_url(text: str, what: str) -> ProxyURL:
    """
    Parse a proxy URL (a bare ``host:port`` means ``http://host:port``).

    @raise ValueError: one line naming C{what}, never quoting credentials.
    """
    value = text.strip()
    if "://" not in value:
        value = "http://" + value
    parts = urlsplit(value)
    if parts.scheme != "http":
        raise ValueError(
            f"{what} must be an http:// proxy URL (https:// and SOCKS proxies are not supported)"
        )
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{what} has an invalid port") from None
    if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{what} must look like http://[user:password@]proxy.example.com:3128")
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return ProxyURL(parts.hostname, port or 80, username, password)


@attrs.frozen
class NoProxy:
    """The parsed ``NO_PROXY`` list."""

    everything: bool = False
    names: tuple[str, ...] = ()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, text: str) -> NoProxy:
        entries = [entry for entry in text.replace(",", " ").split() if entry]
        names: list[str] = []
        networks: list[IPNetwork] = []
        for entry in entries:
            if entry == "*":
                return cls(everything=True)
            network = _network(entry)
            if network is not None:
                networks.append(network)
            else:
                names.append(entry.lower())
        return cls(False, tuple(names), tuple(networks))

    def exempts(self, host: str, port: int) -> bool:
        """Whether a request to C{host}:C{port} goes direct."""
        if self.everything:
            return True
        host = host.lower().strip("[]")
        address = _address(host)
        if address is not None:
            if any(address.version == n.version and address in n for n in self.networks):
                return True
        if not self.names:
            return False
        shown = f"[{host}]" if ":" in host else host
        return proxy_bypass_environment(f"{shown}:{port}", {"no": ",".join(self.names)})


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _network(entry: str) -> IPNetwork | None:
    """An IP address or CIDR entry as a network, L{None} for a host name."""
    try:
        return ipaddress.ip_network(entry.strip("[]"), strict=False)
    except ValueError:
        return None


@attrs.frozen
class ProxyRules:
    """
    The proxies for C{http://} and C{https://} URLs and the exemptions.
    C{ProxyRules()} sends everything direct.
    """

    http: ProxyURL | None = None
    https: ProxyURL | None = None
    no_proxy: NoProxy = NoProxy()

    @property
    def active(self) -> bool:
        return self.http is not None or self.https is not None

    def proxy_for(self, url: str) -> ProxyURL | None:
        """The proxy a request to C{url} goes through, L{None} for direct."""
        parts = urlsplit(url)
        proxy = self.https if parts.scheme == "https" else self.http
        if proxy is None or not parts.hostname:
            return None
        port = parts.port or (443 if parts.scheme == "https" else 80)
        if self.no_proxy.exempts(parts.hostname, port):
            return None
        return proxy

    def describe(self) -> str:
        """One line for the start-up log (no credentials)."""
        if not self.active:
            return "direct"
        parts = []
        if self.https is not None:
            parts.append(f"https via {self.https.safe_url} (CONNECT)")
        if self.http is not None:
            parts.append(f"http via {self.http.safe_url}")
        exempt = (
            "*"
            if self.no_proxy.everything
            else ",".join([*self.no_proxy.names, *(str(n) for n in self.no_proxy.networks)])
        )
        return "; ".join(parts) + (f"; NO_PROXY {exempt}" if exempt else "")

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str], override: str | None = None, what: str = "--upstream-proxy"
    ) -> ProxyRules:
        """
        The rules from C{HTTP(S)_PROXY}/C{NO_PROXY} (lower-case first), or
        from C{override} (a proxy URL for both schemes, or C{none}).

        @raise ValueError: for an unusable proxy URL.
        """
        no_proxy = NoProxy.parse(_variable(environ, "no_proxy") or "")
        if override is not None and override.strip():
            if override.strip().lower() in DIRECT:
                return cls()
            proxy = parse_proxy_url(override, what)
            return cls(proxy, proxy, no_proxy)
        http_text = _variable(environ, "http_proxy")
        https_text = _variable(environ, "https_proxy")
        return cls(
            parse_proxy_url(http_text, "HTTP_PROXY") if http_text else None,
            parse_proxy_url(https_text, "HTTPS_PROXY") if https_text else None,
            no_proxy,
        )


def _variable(environ: Mapping[str, str], name: str) -> str | None:
    for key in (name, name.upper()):
        value = environ.get(key)
        if value is not None and value.strip():
            return value.strip()
    return None
