"""L{hammal.web.forwarded}: believing a trusted reverse proxy, only."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from hammal.web.forwarded import Forwarded, ForwardedHeaders, parse_forwarded


class ParseForwardedTests(SynchronousTestCase):
    def test_elements_and_quotes(self) -> None:
        self.assertEqual(
            parse_forwarded(['for=192.0.2.60;proto=https;host="r.example:8443", for="[2001:db8::17]:4711"']),
            [{"for": "192.0.2.60", "proto": "https", "host": "r.example:8443"}, {"for": "[2001:db8::17]:4711"}],
        )

    def test_several_header_lines(self) -> None:
        self.assertEqual(
            parse_forwarded(["For=a", "for=b;Proto=http"]), [{"for": "a"}, {"for": "b", "proto": "http"}]
        )

    def test_malformed_ends_the_list(self) -> None:
        self.assertEqual(parse_forwarded(["for=a, garbage here"]), [{"for": "a"}])


class ReadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.headers = ForwardedHeaders(["10.0.0.0/8"])

    def test_untrusted_peer_is_ignored(self) -> None:
        self.assertIsNone(self.headers.read("192.0.2.7", {"x-forwarded-proto": ["https"]}))

    def test_x_forwarded(self) -> None:
        self.assertEqual(
            self.headers.read("10.1.1.1", {
                "x-forwarded-proto": ["https"], "x-forwarded-host": ["registry.example.com"],
                "x-forwarded-for": ["203.0.113.9"],
            }),
            Forwarded("https", "registry.example.com", "203.0.113.9"),
        )

    def test_ipv4_mapped_peer(self) -> None:
        self.assertEqual(
            self.headers.read("::ffff:10.1.1.1", {"x-forwarded-proto": ["https"]}), Forwarded("https")
        )

    def test_port(self) -> None:
        self.assertEqual(
            self.headers.read("10.1.1.1", {"x-forwarded-host": ["r.example"], "x-forwarded-port": ["8443"]}).host,  # type: ignore[union-attr]
            "r.example:8443",
        )

    def test_first_value_is_the_clients(self) -> None:
        forwarded = self.headers.read("10.1.1.1", {
            "x-forwarded-proto": ["https, http"], "x-forwarded-host": ["public.example, internal"],
        })
        self.assertEqual(forwarded, Forwarded("https", "public.example"))

    def test_forwarded_wins(self) -> None:
        forwarded = self.headers.read("10.1.1.1", {
            "forwarded": ['for=198.51.100.4;proto=https;host=a.example, for=10.2.2.2'],
            "x-forwarded-proto": ["http"], "x-forwarded-host": ["b.example"], "x-forwarded-for": ["1.1.1.1"],
        })
        self.assertEqual(forwarded, Forwarded("https", "a.example", "198.51.100.4"))

    def test_client_walk_stops_at_first_untrusted(self) -> None:
        forwarded = self.headers.read("10.1.1.1", {"x-forwarded-for": ["6.6.6.6, 203.0.113.9, 10.3.3.3"]})
        self.assertEqual(forwarded, Forwarded(client="203.0.113.9"))

    def test_hostile_values_are_dropped(self) -> None:
        forwarded = self.headers.read("10.1.1.1", {
            "x-forwarded-proto": ["javascript"], "x-forwarded-host": ['evil"><script>'],
        })
        self.assertEqual(forwarded, Forwarded())
