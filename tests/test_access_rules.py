"""
Tests for L{hammal.access.rules}: client addresses behind proxies, and every
allow and deny rule.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.logger import ILogObserver, Logger, LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from hammal.access import rules
from hammal.access.rules import AccessRules
from hammal.errors import Denied

SECRET = "Basic YWxpY2U6c2VjcmV0"


class RulesTestCase(SynchronousTestCase):
    """Captures the rules' log events."""

    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.patch(rules, "log", Logger(observer=cast(ILogObserver, self.events.append)))

    def messages(self) -> list[str]:
        return [formatEvent(event) for event in self.events]

    def admits(
        self,
        access: AccessRules,
        peer: str = "192.0.2.10",
        headers: dict[str, list[str]] | None = None,
        path: str = "/v2/",
    ) -> None:
        access.check(peer, headers or {}, path)

    def refuses(
        self,
        access: AccessRules,
        peer: str = "192.0.2.10",
        headers: dict[str, list[str]] | None = None,
        path: str = "/v2/",
    ) -> str:
        """Assert C{access} refuses; return the logged line."""
        request_headers = {"authorization": [SECRET]}
        request_headers.update(headers or {})
        before = len(self.events)
        error = self.assertRaises(Denied, access.check, peer, request_headers, path)
        self.assertEqual(error.status, 403)
        self.assertEqual(error.code, "DENIED")
        self.assertTrue(error.message.startswith("access denied: "), error.message)
        new = self.events[before:]
        self.assertEqual(len(new), 1)
        self.assertEqual(new[0]["log_level"], LogLevel.info)
        line = formatEvent(new[0])
        self.assertNotIn(SECRET, line)
        self.assertNotIn("YWxpY2U6c2VjcmV0", line)
        self.assertNotIn("YWxpY2U6c2VjcmV0", error.message)
        return line


class NoRulesTests(RulesTestCase):
    def test_everything_admitted(self) -> None:
        access = AccessRules()
        self.admits(access)
        self.admits(access, "2001:db8::1", {"user-agent": ["x"], "x-forwarded-for": ["1.2.3.4"]})
        self.admits(access, "not an address")
        self.assertEqual(self.events, [])


class IPRuleTests(RulesTestCase):
    """C{allow_ip} and C{deny_ip}, IPv4 and IPv6."""

    def test_deny_ipv4(self) -> None:
        access = AccessRules(deny_ip=["203.0.113.0/24"])
        line = self.refuses(access, "203.0.113.7")
        self.assertIn("203.0.113.7", line)
        self.assertIn("--deny-ip 203.0.113.0/24", line)
        self.admits(access, "203.0.114.7")

    def test_deny_ipv6(self) -> None:
        access = AccessRules(deny_ip=["2001:db8:bad::/48"])
        line = self.refuses(access, "2001:db8:bad:1::5")
        self.assertIn("2001:db8:bad:1::5", line)
        self.admits(access, "2001:db8:600d::5")
        self.admits(access, "192.0.2.1")

    def test_allow_ipv4(self) -> None:
        access = AccessRules(allow_ip=["10.0.0.0/8", "192.168.1.5"])
        self.admits(access, "10.20.30.40")
        self.admits(access, "192.168.1.5")
        line = self.refuses(access, "192.168.1.6")
        self.assertIn("192.168.1.6", line)
        self.assertIn("--allow-ip", line)

    def test_allow_ipv6(self) -> None:
        access = AccessRules(allow_ip=["fd00::/8"])
        self.admits(access, "fd12:3456::1")
        self.refuses(access, "2001:db8::1")
        self.refuses(access, "10.0.0.1")

    def test_mixed_families(self) -> None:
        access = AccessRules(allow_ip=["10.0.0.0/8", "2001:db8::/32"])
        self.admits(access, "10.1.1.1")
        self.admits(access, "2001:db8::1")
        self.refuses(access, "2001:db9::1")

    def test_ipv4_mapped_peer(self) -> None:
        """A dual-stack socket's C{::ffff:a.b.c.d} is matched as IPv4."""
        access = AccessRules(allow_ip=["10.0.0.0/8"], deny_ip=["10.6.6.0/24"])
        self.admits(access, "::ffff:10.1.2.3")
        self.refuses(access, "::ffff:10.6.6.6")
        self.refuses(access, "::ffff:192.0.2.1")

    def test_deny_beats_allow(self) -> None:
        access = AccessRules(allow_ip=["10.0.0.0/8"], deny_ip=["10.0.0.0/24"])
        self.admits(access, "10.0.1.1")
        self.assertIn("--deny-ip", self.refuses(access, "10.0.0.1"))

    def test_unparsable_peer(self) -> None:
        """An address that cannot be read is in no allow list."""
        self.refuses(AccessRules(allow_ip=["0.0.0.0/0", "::/0"]), "unix-socket")
        self.admits(AccessRules(deny_ip=["0.0.0.0/0", "::/0"]), "unix-socket")

    def test_host_bits_accepted_with_warning(self) -> None:
        access = AccessRules(allow_ip=["10.1.2.3/8"])
        self.admits(access, "10.9.9.9")
        warnings = [e for e in self.events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        self.assertIn("10.0.0.0/8", formatEvent(warnings[0]))
        # Canonical spellings do not warn.
        AccessRules(allow_ip=["2001:DB8::/32", " 10.0.0.0/8 ", "::1"])
        self.assertEqual(len(self.events), 1)

    def test_invalid_cidr(self) -> None:
        for option, value in [
            ("allow_ip", "10.0.0.0/33"),
            ("deny_ip", "not-an-ip"),
            ("trusted_proxies", "2001:db8::/129"),
            ("allow_ip", ""),
        ]:
            error = self.assertRaises(ValueError, AccessRules, **{option: [value]})
            message = str(error)
            self.assertIn("--" + option.replace("_", "-"), message)
            self.assertNotIn("\n", message)


class ClientAddressTests(RulesTestCase):
    """L{AccessRules.client_ip}: X-Forwarded-For only from trusted proxies."""

    def test_no_forwarded_for(self) -> None:
        access = AccessRules(trusted_proxies=["10.0.0.0/8"])
        self.assertEqual(access.client_ip("10.0.0.1", []), "10.0.0.1")
        self.assertEqual(access.client_ip("192.0.2.1", []), "192.0.2.1")

    def test_untrusted_peer_cannot_spoof(self) -> None:
        access = AccessRules(trusted_proxies=["10.0.0.0/8"])
        self.assertEqual(access.client_ip("192.0.2.1", ["10.0.0.5"]), "192.0.2.1")
        self.assertEqual(access.client_ip("192.0.2.1", ["198.51.100.1"]), "192.0.2.1")

    def test_no_trusted_proxies_means_header_ignored(self) -> None:
        access = AccessRules()
        self.assertEqual(access.client_ip("10.0.0.1", ["198.51.100.1"]), "10.0.0.1")

    def test_one_trusted_proxy(self) -> None:
        access = AccessRules(trusted_proxies=["10.0.0.0/8"])
        self.assertEqual(access.client_ip("10.0.0.1", ["198.51.100.7"]), "198.51.100.7")

    def test_right_most_untrusted(self) -> None:
        """
        What the client wrote itself (left of the first untrusted hop) is
        not believed.
        """
        access = AccessRules(trusted_proxies=["10.0.0.0/8"])
        self.assertEqual(access.client_ip("10.0.0.1", ["6.6.6.6, 198.51.100.7"]), "198.51.100.7")

    def test_chain_of_trusted_proxies(self) -> None:
        access = AccessRules(trusted_proxies=["10.0.0.0/8", "172.16.0.0/12"])
        self.assertEqual(
            access.client_ip("10.0.0.1", ["6.6.6.6, 198.51.100.7, 172.16.0.9, 10.0.0.2"]),
            "198.51.100.7",
        )

    def test_several_headers(self) -> None:
        access = AccessRules(trusted_proxies=["10.0.0.0/8"])
        self.assertEqual(
            access.client_ip("10.0.0.1", ["6.6.6.6, 198.51.100.7", "10.0.0.3"]),
            "198.51.100.7",
        )

    def test_all_hops_trusted(self) -> None:
        access = AccessRules(trusted_proxies=["10.0.0.0/8"])
        self.assertEqual(access.client_ip("10.0.0.1", ["10.0.0.3, 10.0.0.2"]), "10.0.0.3")

    def test_malformed_entry_stops_the_walk(self) -> None:
        access = AccessRules(trusted_proxies=["10.0.0.0/8"])
        self.assertEqual(
            access.client_ip("10.0.0.1", ["198.51.100.7, unknown, 10.0.0.2"]), "10.0.0.2"
        )
        self.assertEqual(access.client_ip("10.0.0.1", ["garbage"]), "10.0.0.1")
        self.assertEqual(access.client_ip("10.0.0.1", [""]), "10.0.0.1")
        self.assertEqual(access.client_ip("10.0.0.1", ["1.2.3.4:5678"]), "10.0.0.1")
        self.assertEqual(access.client_ip("10.0.0.1", ["1.2.3.4,,10.0.0.2"]), "10.0.0.2")

    def test_ipv6_chain(self) -> None:
        access = AccessRules(trusted_proxies=["fd00::/8", "10.0.0.0/8"])
        self.assertEqual(
            access.client_ip("fd00::1", ["2001:db8::77, 10.0.0.2, fd00::2"]), "2001:db8::77"
        )
        self.assertEqual(access.client_ip("::ffff:10.0.0.1", ["2001:db8::1"]), "2001:db8::1")

    def test_unparsable_peer_returned_as_is(self) -> None:
        access = AccessRules(trusted_proxies=["0.0.0.0/0"])
        self.assertEqual(access.client_ip("", ["198.51.100.7"]), "")

    def test_check_uses_forwarded_client(self) -> None:
        access = AccessRules(trusted_proxies=["10.0.0.0/8"], deny_ip=["198.51.100.0/24"])
        line = self.refuses(access, "10.0.0.1", {"x-forwarded-for": ["198.51.100.7"]})
        self.assertIn("198.51.100.7", line)
        self.assertIn("10.0.0.1", line)
        self.admits(access, "10.0.0.1", {"x-forwarded-for": ["192.0.2.7"]})

    def test_forwarded_family(self) -> None:
        """
        With forwarded_header="forwarded" the client is Forwarded's for=
        (brackets and ports dropped) and X-Forwarded-For is not read; by
        default it is the other way round.
        """
        named = AccessRules(
            trusted_proxies=["10.0.0.0/8"],
            allow_ip=["192.168.0.0/16"],
            forwarded_header="forwarded",
        )
        self.refuses(named, "10.0.0.1", {"forwarded": ["for=203.0.113.9"]})
        self.refuses(
            named,
            "10.0.0.1",
            {"forwarded": ["for=203.0.113.9"], "x-forwarded-for": ["192.168.1.1"]},
        )
        self.admits(named, "10.0.0.1", {"forwarded": ['for="192.168.1.1:4711"']})
        self.assertEqual(
            named.client_of("10.0.0.1", {"forwarded": ['for="[2001:db8::7]:80"']}), "2001:db8::7"
        )
        default = AccessRules(trusted_proxies=["10.0.0.0/8"], allow_ip=["192.168.0.0/16"])
        self.refuses(
            default,
            "10.0.0.1",
            {"forwarded": ["for=192.168.1.1"], "x-forwarded-for": ["203.0.113.9"]},
        )
        self.assertRaises(ValueError, AccessRules, forwarded_header="x-real-ip")

    def test_spoofed_header_does_not_open_allow_list(self) -> None:
        access = AccessRules(trusted_proxies=["10.0.0.0/8"], allow_ip=["192.168.0.0/16"])
        self.refuses(access, "203.0.113.9", {"x-forwarded-for": ["192.168.1.1"]})
        self.admits(access, "10.0.0.1", {"x-forwarded-for": ["192.168.1.1"]})

    def test_spoofed_header_does_not_dodge_deny(self) -> None:
        access = AccessRules(trusted_proxies=["10.0.0.0/8"], deny_ip=["203.0.113.0/24"])
        self.refuses(access, "203.0.113.9", {"x-forwarded-for": ["192.0.2.1"]})
        self.refuses(access, "10.0.0.1", {"x-forwarded-for": ["192.0.2.1, 203.0.113.9"]})


class UserAgentRuleTests(RulesTestCase):
    """C{allow_ua} and C{deny_ua}."""

    def test_deny(self) -> None:
        access = AccessRules(deny_ua=["curl", r"^python-requests/"])
        line = self.refuses(access, headers={"user-agent": ["curl/8.0"]})
        self.assertIn("--deny-ua 'curl'", line)
        self.refuses(access, headers={"user-agent": ["python-requests/2.31"]})
        self.admits(access, headers={"user-agent": ["docker/24.0.5 go/go1.20"]})
        self.admits(access, headers={"user-agent": ["my-python-requests/1"]})
        self.admits(access)

    def test_allow(self) -> None:
        access = AccessRules(allow_ua=[r"^docker/", "containerd"])
        self.admits(access, headers={"user-agent": ["docker/24.0.5"]})
        self.admits(access, headers={"user-agent": ["moby containerd/1.7"]})
        self.assertIn("--allow-ua", self.refuses(access, headers={"user-agent": ["curl/8"]}))

    def test_missing_counts_as_empty(self) -> None:
        self.refuses(AccessRules(allow_ua=["^docker/"]))
        self.refuses(AccessRules(allow_ua=["^docker/"]), headers={"user-agent": []})
        self.admits(AccessRules(allow_ua=["^docker/", "^$"]))
        self.refuses(AccessRules(deny_ua=["^$"]))

    def test_deny_beats_allow(self) -> None:
        access = AccessRules(allow_ua=["^docker/"], deny_ua=["docker/1[0-7]\\."])
        self.admits(access, headers={"user-agent": ["docker/24.0"]})
        self.assertIn("--deny-ua", self.refuses(access, headers={"user-agent": ["docker/17.03"]}))

    def test_several_values_all_checked(self) -> None:
        access = AccessRules(allow_ua=["^docker/"], deny_ua=["evil"])
        self.refuses(access, headers={"user-agent": ["docker/24", "evil/1"]})
        self.refuses(access, headers={"user-agent": ["docker/24", "curl/8"]})
        self.admits(access, headers={"user-agent": ["docker/24", "docker/25"]})

    def test_long_agent_shortened_in_log(self) -> None:
        line = self.refuses(AccessRules(deny_ua=["x"]), headers={"user-agent": ["x" * 5000]})
        self.assertLess(len(line), 1000)

    def test_invalid_regex(self) -> None:
        for option in ["allow_ua", "deny_ua", "allow_path"]:
            error = self.assertRaises(ValueError, AccessRules, **{option: ["(unclosed"]})
            self.assertIn("--" + option.replace("_", "-"), str(error))
            self.assertIn("(unclosed", str(error))
            self.assertNotIn("\n", str(error))


class PathRuleTests(RulesTestCase):
    """C{allow_path}."""

    def test_allow_path(self) -> None:
        access = AccessRules(allow_path=[r"^/v2/$", r"^/v2/library/"])
        self.admits(access, path="/v2/")
        self.admits(access, path="/v2/library/alpine/manifests/latest")
        line = self.refuses(access, path="/v2/private/app/manifests/1")
        self.assertIn("--allow-path", line)
        self.assertIn("/v2/private/app/manifests/1", line)

    def test_no_allow_path_admits_all(self) -> None:
        self.admits(AccessRules(), path="/anything")


class RegionRuleTests(RulesTestCase):
    """C{region_header} with C{allow_region} and C{deny_region}."""

    def test_deny(self) -> None:
        access = AccessRules(region_header="CF-IPCountry", deny_region=["kp", "IR"])
        line = self.refuses(access, headers={"cf-ipcountry": ["KP"]})
        self.assertIn("--deny-region KP", line)
        self.refuses(access, headers={"cf-ipcountry": ["ir"]})
        self.admits(access, headers={"cf-ipcountry": ["DE"]})

    def test_missing_header_passes_deny_only(self) -> None:
        access = AccessRules(region_header="CF-IPCountry", deny_region=["KP"])
        self.admits(access)
        self.admits(access, headers={"cf-ipcountry": [" "]})

    def test_allow(self) -> None:
        access = AccessRules(region_header="X-Country", allow_region=["de", "AT"])
        self.admits(access, headers={"x-country": ["DE"]})
        self.admits(access, headers={"x-country": ["at"]})
        self.assertIn("--allow-region", self.refuses(access, headers={"x-country": ["US"]}))

    def test_missing_header_refused_with_allow(self) -> None:
        access = AccessRules(region_header="X-Country", allow_region=["DE"])
        self.assertIn("unknown", self.refuses(access))
        self.refuses(access, headers={"x-country": [""]})

    def test_deny_beats_allow(self) -> None:
        access = AccessRules(region_header="X-Country", allow_region=["DE"], deny_region=["DE"])
        self.assertIn("--deny-region", self.refuses(access, headers={"x-country": ["DE"]}))

    def test_several_values(self) -> None:
        access = AccessRules(region_header="X-Country", allow_region=["DE"], deny_region=["KP"])
        self.refuses(access, headers={"x-country": ["DE", "KP"]})
        self.refuses(access, headers={"x-country": ["DE, US"]})
        self.admits(access, headers={"x-country": ["DE", "de"]})

    def test_header_without_lists_is_a_no_op(self) -> None:
        self.admits(AccessRules(region_header="X-Country"), headers={"x-country": ["KP"]})

    def test_no_header_configured_ignores_header(self) -> None:
        self.admits(AccessRules(), headers={"x-country": ["KP"]})

    def test_lists_need_header(self) -> None:
        self.assertRaises(ValueError, AccessRules, allow_region=["DE"])
        self.assertRaises(ValueError, AccessRules, deny_region=["DE"], region_header="")

    def test_invalid_codes(self) -> None:
        for value in ["DEU", "D", "", "d e", "DE,AT"]:
            error = self.assertRaises(
                ValueError, AccessRules, region_header="X-Country", deny_region=[value]
            )
            self.assertIn("--deny-region", str(error))


class CombinedRuleTests(RulesTestCase):
    """Every configured kind of rule must admit the request."""

    def setUp(self) -> None:
        super().setUp()
        self.access = AccessRules(
            allow_ip=["10.0.0.0/8", "2001:db8::/32"],
            deny_ip=["10.6.0.0/16"],
            trusted_proxies=["172.16.0.0/12"],
            allow_ua=["^docker/"],
            deny_ua=["docker/1\\."],
            allow_path=["^/v2/"],
            region_header="X-Country",
            allow_region=["DE", "FR"],
            deny_region=["FR"],
        )
        self.good: dict[str, list[str]] = {
            "user-agent": ["docker/24.0"],
            "x-country": ["DE"],
        }

    def headers(self, **changes: list[str]) -> dict[str, list[str]]:
        headers = dict(self.good)
        headers.update({name.replace("_", "-"): value for name, value in changes.items()})
        return headers

    def test_admitted(self) -> None:
        self.admits(self.access, "10.1.1.1", self.good, "/v2/x/manifests/1")
        self.admits(self.access, "2001:db8::5", self.good, "/v2/")
        self.admits(
            self.access,
            "172.16.0.1",
            self.headers(x_forwarded_for=["10.1.1.1"]),
            "/v2/",
        )

    def test_each_rule_refuses(self) -> None:
        cases: list[tuple[str, dict[str, list[str]], str, str]] = [
            ("10.6.0.1", self.good, "/v2/", "--deny-ip"),
            ("192.0.2.1", self.good, "/v2/", "--allow-ip"),
            ("10.1.1.1", self.headers(user_agent=["docker/1.13"]), "/v2/", "--deny-ua"),
            ("10.1.1.1", self.headers(user_agent=["curl/8"]), "/v2/", "--allow-ua"),
            ("10.1.1.1", self.good, "/metrics", "--allow-path"),
            ("10.1.1.1", self.headers(x_country=["FR"]), "/v2/", "--deny-region"),
            ("10.1.1.1", self.headers(x_country=["US"]), "/v2/", "--allow-region"),
            ("10.1.1.1", {"user-agent": ["docker/24.0"]}, "/v2/", "--allow-region"),
            (
                "172.16.0.1",
                self.headers(x_forwarded_for=["10.6.0.1"]),
                "/v2/",
                "--deny-ip",
            ),
        ]
        for peer, headers, path, rule in cases:
            self.assertIn(rule, self.refuses(self.access, peer, headers, path), (peer, rule))

    def test_messages_name_the_reason(self) -> None:
        error = self.assertRaises(Denied, self.access.check, "192.0.2.1", self.good, "/v2/")
        self.assertEqual(error.message, "access denied: client address 192.0.2.1 is not allowed")
        error = self.assertRaises(
            Denied, self.access.check, "10.1.1.1", self.headers(user_agent=["curl/8"]), "/v2/"
        )
        self.assertEqual(error.message, "access denied: user agent 'curl/8' is not allowed")
