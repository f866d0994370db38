"""
Request access rules: which clients may use hammal at all, by address,
user agent, path and region.

These run before authentication and before any upstream work, so an
unwanted client costs hammal nothing but the check. Every refusal raises
L{Denied} with a reason the client can read and is logged with the client
address and the rule that matched, so an operator can tell why someone was
turned away. No header value that could hold a secret is ever logged.

Behind a reverse proxy the peer is the proxy, so the client address comes
from the header the proxy writes (C{X-Forwarded-For}, or C{Forwarded} with
C{--forwarded-header forwarded}) -- but only when the peer is a trusted
proxy, since anyone can send those headers.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Iterable, Mapping, Sequence, Union

from twisted.logger import Logger

from hammal.access.forwarding import FORWARDED_HEADERS, forwarded_for
from hammal.errors import Denied

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

# Region codes: ISO 3166-1 alpha-2, plus the two-character codes CDNs add
# (Cloudflare's XX for unknown, T1 for Tor).
_REGION = re.compile(r"[A-Za-z0-9]{2}\Z")

_LOG_LIMIT = 200

log = Logger()


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_address(text: str) -> IPAddress | None:
    """
    C{text} as an address, or L{None} if it is not one. IPv4-mapped IPv6
    addresses (C{::ffff:192.0.2.1}, what a dual-stack socket reports for an
    IPv4 peer) become IPv4, so IPv4 rules apply to them.
    """
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _networks(option: str, texts: Iterable[str]) -> tuple[IPNetwork, ...]:
    networks = []
    for text in texts:
        given = text.strip()
        try:
            network = ipaddress.ip_network(given)
        except ValueError:
            # Maybe host bits are set (10.1.2.3/8): take the network, but
            # say so, as it may be a typo.
            try:
                network = ipaddress.ip_network(given, strict=False)
            except ValueError:
                raise ValueError(
                    f"{_option(option)}: {text[:100]!r} is not an IP address or CIDR"
                ) from None
            log.warn(
                "{option}: {given} has host bits set; using {network}",
                option=_option(option),
                given=given,
                network=str(network),
            )
        networks.append(network)
    return tuple(networks)


def _patterns(option: str, texts: Iterable[str]) -> tuple[re.Pattern[str], ...]:
    patterns = []
    for text in texts:
        try:
            patterns.append(re.compile(text))
        except re.error as failure:
            raise ValueError(
                f"{_option(option)}: invalid regular expression {text[:100]!r}: {failure}"
            ) from None
    return tuple(patterns)


def _regions(option: str, texts: Iterable[str]) -> frozenset[str]:
    regions = set()
    for text in texts:
        if _REGION.match(text.strip()) is None:
            raise ValueError(f"{_option(option)}: {text[:100]!r} is not a two-letter country code")
        regions.add(text.strip().upper())
    return frozenset(regions)


def _find_network(address: IPAddress | None, networks: Sequence[IPNetwork]) -> IPNetwork | None:
    if address is None:
        return None
    for network in networks:
        if address.version == network.version and address in network:
            return network
    return None


def _find_pattern(text: str, patterns: Sequence[re.Pattern[str]]) -> re.Pattern[str] | None:
    for pattern in patterns:
        if pattern.search(text):
            return pattern
    return None


def _shown(text: str) -> str:
    """A client-supplied value, shortened for a log line or a message."""
    return repr(text[:_LOG_LIMIT])


class AccessRules:
    """
    The C{--allow-*}, C{--deny-*}, C{--trusted-proxies} and
    C{--region-header} rules, checked on every request.

    Within each kind of rule a deny beats an allow, and a request must pass
    every kind that is configured. An empty list means the rule is off.

    @param allow_ip: CIDRs (or single addresses); if given, only clients in
        one of them are served.
    @param deny_ip: CIDRs whose clients are refused.
    @param trusted_proxies: CIDRs of reverse proxies whose
        C{forwarded_header} family is believed.
    @param allow_ua: regular expressions (searched); if given, the
        C{User-Agent} must match one.
    @param deny_ua: regular expressions; a matching C{User-Agent} is refused.
    @param allow_path: regular expressions (searched); if given, the request
        path must match one.
    @param region_header: the header carrying the client's country code, set
        by a CDN or proxy in front of hammal (for example C{CF-IPCountry}).
    @param allow_region: country codes; if given, only these are served and
        a request without the header is refused.
    @param deny_region: country codes that are refused.
    @param forwarded_header: which headers the trusted proxies write the
        client's address into (L{hammal.access.forwarding}).
    @raise ValueError: for an invalid CIDR, regular expression or country
        code, or region lists without C{region_header}; the message is one
        line naming the option.
    """

    def __init__(
        self,
        allow_ip: Sequence[str] = (),
        deny_ip: Sequence[str] = (),
        trusted_proxies: Sequence[str] = (),
        allow_ua: Sequence[str] = (),
        deny_ua: Sequence[str] = (),
        allow_path: Sequence[str] = (),
        region_header: str | None = None,
        allow_region: Sequence[str] = (),
        deny_region: Sequence[str] = (),
        forwarded_header: str = "x-forwarded",
    ) -> None:
        if forwarded_header not in FORWARDED_HEADERS:
            raise ValueError(
                f"--forwarded-header: {forwarded_header!r} is not one of"
                f" {', '.join(FORWARDED_HEADERS)}"
            )
        self._forwarded_header = forwarded_header
        self._allow_ip = _networks("allow_ip", allow_ip)
        self._deny_ip = _networks("deny_ip", deny_ip)
        self._trusted = _networks("trusted_proxies", trusted_proxies)
        self._allow_ua = _patterns("allow_ua", allow_ua)
        self._deny_ua = _patterns("deny_ua", deny_ua)
        self._allow_path = _patterns("allow_path", allow_path)
        self._region_header = region_header.strip().lower() if region_header else None
        self._allow_region = _regions("allow_region", allow_region)
        self._deny_region = _regions("deny_region", deny_region)
        if (self._allow_region or self._deny_region) and not self._region_header:
            raise ValueError("--allow-region and --deny-region need --region-header")

    def _is_trusted(self, address: IPAddress | None) -> bool:
        return _find_network(address, self._trusted) is not None

    def client_ip(self, peer_ip: str, forwarded_for: list[str]) -> str:
        """
        The address of the client behind C{peer_ip}.

        C{forwarded_for} (every C{X-Forwarded-For} value, in order) is
        believed only when the peer is a trusted proxy. It is then read from
        the right, skipping trusted proxies; the first untrusted address is
        the client, since anything left of it may have been written by the
        client itself. A malformed entry ends the walk at the last good
        address. When every hop is trusted, the left-most is the client.
        """
        peer = _parse_address(peer_ip)
        if peer is None:
            return peer_ip
        current = peer
        if not self._is_trusted(peer):
            return str(current)
        entries = [entry for value in forwarded_for for entry in value.split(",")]
        for entry in reversed(entries):
            address = _parse_address(entry)
            if address is None:
                break
            current = address
            if not self._is_trusted(address):
                break
        return str(current)

    def client_of(self, peer_ip: str, headers: Mapping[str, Sequence[str]]) -> str:
        """
        The address of the client behind C{peer_ip}, from the forwarding
        headers (names in lower case) of the family the proxies write.
        """
        return self.client_ip(peer_ip, forwarded_for(headers, self._forwarded_header))

    def _deny(self, client: str, peer_ip: str, reason: str, rule: str) -> Denied:
        log.info(
            "refused {client} (peer {peer}): {reason} [{rule}]",
            client=client,
            peer=peer_ip,
            reason=reason,
            rule=rule,
        )
        return Denied(f"access denied: {reason}")

    def check(self, peer_ip: str, headers: dict[str, list[str]], path: str) -> None:
        """
        Refuse the request unless every configured rule admits it.

        @param peer_ip: the address of the connection's other end.
        @param headers: the request headers, names in lower case.
        @param path: the request path.
        @raise Denied: with the reason, naming the kind of rule.
        """
        client = self.client_of(peer_ip, headers)
        address = _parse_address(client)
        agents = headers.get("user-agent") or [""]
        regions = self._regions(headers)

        self._check_denied_ip(client, peer_ip, address)
        for agent in agents:
            pattern = _find_pattern(agent, self._deny_ua)
            if pattern is not None:
                raise self._deny(
                    client,
                    peer_ip,
                    f"user agent {_shown(agent)} is denied",
                    f"--deny-ua {pattern.pattern!r}",
                )
        for region in regions or ():
            if region in self._deny_region:
                raise self._deny(
                    client, peer_ip, f"region {region} is denied", f"--deny-region {region}"
                )

        self._check_allowed_ip(client, peer_ip, address)
        if self._allow_ua:
            for agent in agents:
                if _find_pattern(agent, self._allow_ua) is None:
                    raise self._deny(
                        client,
                        peer_ip,
                        f"user agent {_shown(agent)} is not allowed",
                        "--allow-ua",
                    )
        if self._allow_path and _find_pattern(path, self._allow_path) is None:
            raise self._deny(client, peer_ip, f"path {_shown(path)} is not allowed", "--allow-path")
        if self._allow_region:
            if not regions:
                raise self._deny(
                    client, peer_ip, "region is unknown", f"--allow-region ({self._region_header})"
                )
            for region in regions:
                if region not in self._allow_region:
                    raise self._deny(
                        client, peer_ip, f"region {region} is not allowed", "--allow-region"
                    )

    def check_address(self, peer_ip: str, headers: Mapping[str, Sequence[str]]) -> None:
        """
        Only the address rules (C{--allow-ip}, C{--deny-ip}): for the
        operational pages (C{/metrics}, C{/readyz}), which say how the
        mirror is doing to whoever may use it, but are no pulls, so user
        agent, path and region rules do not apply to them.

        @param headers: the request's forwarding headers, names in lower case.
        @raise Denied: when the client address is refused.
        """
        client = self.client_of(peer_ip, headers)
        address = _parse_address(client)
        self._check_denied_ip(client, peer_ip, address)
        self._check_allowed_ip(client, peer_ip, address)

    def _check_denied_ip(self, client: str, peer_ip: str, address: IPAddress | None) -> None:
        network = _find_network(address, self._deny_ip)
        if network is not None:
            raise self._deny(
                client, peer_ip, f"client address {client} is denied", f"--deny-ip {network}"
            )

    def _check_allowed_ip(self, client: str, peer_ip: str, address: IPAddress | None) -> None:
        if self._allow_ip and _find_network(address, self._allow_ip) is None:
            raise self._deny(
                client, peer_ip, f"client address {client} is not allowed", "--allow-ip"
            )

    def _regions(self, headers: dict[str, list[str]]) -> list[str] | None:
        """
        The region codes the request carries, upper-cased; L{None} when
        region rules are off or the header is missing or blank.

        Several values are all checked: a client cannot hide a denied
        region behind an allowed one. (The header only means something when
        a CDN or proxy in front of hammal sets it and drops the client's.)
        """
        if self._region_header is None:
            return None
        values = [
            code.strip().upper()
            for value in headers.get(self._region_header, [])
            for code in value.split(",")
        ]
        return [code for code in values if code] or None
