"""L{hammal.upstream.proxy_rules}: which requests go through which proxy."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from hammal.upstream.proxy_rules import NoProxy, ProxyRules, parse_proxy_url


class ProxyURLTests(SynchronousTestCase):
    def test_bare_host_port_is_http(self) -> None:
        proxy = parse_proxy_url("proxy.corp:3128", "HTTP_PROXY")
        self.assertEqual((proxy.host, proxy.port, proxy.authorization), ("proxy.corp", 3128, None))

    def test_credentials_become_basic_and_are_hidden(self) -> None:
        proxy = parse_proxy_url("http://bob%40corp:s%3Acret@10.0.0.1:8080/", "HTTPS_PROXY")
        self.assertEqual(proxy.authorization, b"Basic Ym9iQGNvcnA6czpjcmV0")
        self.assertEqual(proxy.safe_url, "http://***@10.0.0.1:8080")
        self.assertNotIn("cret", repr(proxy))
        self.assertNotIn("bob", repr(proxy))

    def test_default_port(self) -> None:
        self.assertEqual(parse_proxy_url("http://proxy", "x").port, 80)

    def test_refused_schemes_never_quote_credentials(self) -> None:
        for text in (
            "socks5://u:secret@proxy:1080",
            "https://u:secret@proxy:443",
            "http://u:secret@proxy:99999",
        ):
            with self.assertRaises(ValueError) as caught:
                parse_proxy_url(text, "--upstream-proxy")
            self.assertNotIn("secret", str(caught.exception))
            self.assertIn("--upstream-proxy", str(caught.exception))


class NoProxyTests(SynchronousTestCase):
    def test_suffixes(self) -> None:
        rules = NoProxy.parse("example.com, .corp.net")
        self.assertTrue(rules.exempts("example.com", 443))
        self.assertTrue(rules.exempts("registry.example.com", 443))
        self.assertTrue(rules.exempts("a.corp.net", 443))
        self.assertTrue(rules.exempts("corp.net", 443))
        self.assertFalse(rules.exempts("badexample.com", 443))
        self.assertFalse(rules.exempts("example.com.evil.org", 443))

    def test_host_with_port(self) -> None:
        rules = NoProxy.parse("registry.local:5000")
        self.assertTrue(rules.exempts("registry.local", 5000))
        self.assertFalse(rules.exempts("registry.local", 443))

    def test_cidr_and_addresses(self) -> None:
        rules = NoProxy.parse("10.0.0.0/8,192.168.1.7 fd00::/8")
        self.assertTrue(rules.exempts("10.20.30.40", 80))
        self.assertTrue(rules.exempts("192.168.1.7", 80))
        self.assertFalse(rules.exempts("192.168.1.8", 80))
        self.assertTrue(rules.exempts("[fd12::1]", 443))
        self.assertTrue(rules.exempts("fd12::1", 443))
        self.assertFalse(rules.exempts("11.0.0.1", 80))

    def test_star(self) -> None:
        self.assertTrue(NoProxy.parse("*").exempts("anything.example", 1))

    def test_loopback_is_not_exempt_unless_listed(self) -> None:
        self.assertFalse(NoProxy.parse("").exempts("127.0.0.1", 5000))
        self.assertFalse(NoProxy.parse("example.com").exempts("localhost", 5000))
        self.assertTrue(NoProxy.parse("127.0.0.0/8").exempts("127.0.0.1", 5000))
        self.assertTrue(NoProxy.parse("localhost").exempts("localhost", 5000))


class ProxyRulesTests(SynchronousTestCase):
    def test_scheme_picks_the_variable(self) -> None:
        rules = ProxyRules.from_environment(
            {"HTTP_PROXY": "http://plain:3128", "HTTPS_PROXY": "http://tunnel:3128"}
        )
        self.assertEqual(rules.proxy_for("http://cdn.example/x").host, "plain")  # type: ignore[union-attr]
        self.assertEqual(rules.proxy_for("https://registry.example/v2/").host, "tunnel")  # type: ignore[union-attr]

    def test_lower_case_wins(self) -> None:
        rules = ProxyRules.from_environment(
            {
                "https_proxy": "http://lower:1",
                "HTTPS_PROXY": "http://upper:2",
                "no_proxy": "a.example",
                "NO_PROXY": "b.example",
            }
        )
        self.assertEqual(rules.https.host, "lower")  # type: ignore[union-attr]
        self.assertIsNone(rules.proxy_for("https://a.example/"))
        self.assertIsNotNone(rules.proxy_for("https://b.example/"))

    def test_option_wins_over_environment_but_no_proxy_applies(self) -> None:
        environ = {
            "HTTPS_PROXY": "http://env:1",
            "HTTP_PROXY": "http://env:1",
            "NO_PROXY": "internal.example",
        }
        rules = ProxyRules.from_environment(environ, "http://option:3128")
        self.assertEqual(rules.proxy_for("https://registry-1.docker.io/v2/").host, "option")  # type: ignore[union-attr]
        self.assertEqual(rules.proxy_for("http://cdn.example/blob").host, "option")  # type: ignore[union-attr]
        self.assertIsNone(rules.proxy_for("https://r.internal.example/v2/"))

    def test_none_disables_the_environment(self) -> None:
        rules = ProxyRules.from_environment({"HTTPS_PROXY": "http://env:1"}, "none")
        self.assertIsNone(rules.proxy_for("https://registry-1.docker.io/"))
        self.assertEqual(rules.describe(), "direct")

    def test_default_port_of_the_url_scheme(self) -> None:
        rules = ProxyRules.from_environment({"HTTPS_PROXY": "p:1", "NO_PROXY": "h.example:443"})
        self.assertIsNone(rules.proxy_for("https://h.example/v2/"))
        self.assertIsNotNone(rules.proxy_for("https://h.example:8443/v2/"))

    def test_describe_hides_credentials(self) -> None:
        rules = ProxyRules.from_environment(
            {"HTTPS_PROXY": "http://u:topsecret@p:1", "NO_PROXY": "10.0.0.0/8"}
        )
        self.assertNotIn("topsecret", rules.describe())
        self.assertIn("10.0.0.0/8", rules.describe())

    def test_nothing_set_is_direct(self) -> None:
        self.assertIsNone(
            ProxyRules.from_environment({}).proxy_for("https://registry-1.docker.io/")
        )


class OptionTests(SynchronousTestCase):
    """--upstream-proxy and the proxy variables reach L{Settings}."""

    def settings(self, argv: list[str], environ: dict[str, str]) -> Any:
        from hammal.tap import Options

        options = Options(environ=environ)
        options.parseOptions(argv)
        return options.settings

    def test_environment_variables(self) -> None:
        proxies = self.settings(
            [], {"HTTPS_PROXY": "http://p.corp:3128", "NO_PROXY": "10.0.0.0/8"}
        ).proxies
        self.assertEqual(proxies.proxy_for("https://registry-1.docker.io/v2/").host, "p.corp")
        self.assertIsNone(proxies.proxy_for("https://10.1.1.1/v2/"))

    def test_option_and_its_variable(self) -> None:
        self.assertEqual(
            self.settings(
                ["--upstream-proxy", "http://opt:1"], {"HTTPS_PROXY": "http://env:2"}
            ).proxies.https.host,
            "opt",
        )
        self.assertEqual(
            self.settings([], {"HAMMAL_UPSTREAM_PROXY": "http://hammal-env:3"}).proxies.http.port, 3
        )

    def test_unusable_proxy_is_a_usage_error_without_the_password(self) -> None:
        from twisted.python.usage import UsageError

        with self.assertRaises(UsageError) as caught:
            self.settings(["--upstream-proxy", "socks5://u:pa55@p:1080"], {})
        self.assertNotIn("pa55", str(caught.exception))
        with self.assertRaises(UsageError):
            self.settings([], {"https_proxy": "ftp://p:21"})
