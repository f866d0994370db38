"""L{hammal.web.forwarded}: believing a trusted reverse proxy, only."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from hammal.access.forwarding import parse_forwarded
from hammal.web.forwarded import Forwarded, ForwardedHeaders


class ParseForwardedTests(SynchronousTestCase):
    def test_elements_and_quotes(self) -> None:
        self.assertEqual(
            parse_forwarded(
                ['for=192.0.2.60;proto=https;host="r.example:8443", for="[2001:db8::17]:4711"']
            ),
            [
                {"for": "192.0.2.60", "proto": "https", "host": "r.example:8443"},
                {"for": "[2001:db8::17]:4711"},
            ],
        )

    def test_several_header_lines(self) -> None:
        self.assertEqual(
            parse_forwarded(["For=a", "for=b;Proto=http"]),
            [{"for": "a"}, {"for": "b", "proto": "http"}],
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
            self.headers.read(
                "10.1.1.1",
                {
                    "x-forwarded-proto": ["https"],
                    "x-forwarded-host": ["registry.example.com"],
                    "x-forwarded-for": ["203.0.113.9"],
                },
            ),
            Forwarded("https", "registry.example.com", "203.0.113.9"),
        )

    def test_ipv4_mapped_peer(self) -> None:
        self.assertEqual(
            self.headers.read("::ffff:10.1.1.1", {"x-forwarded-proto": ["https"]}),
            Forwarded("https"),
        )

    def test_port(self) -> None:
        self.assertEqual(
            self.headers.read(
                "10.1.1.1", {"x-forwarded-host": ["r.example"], "x-forwarded-port": ["8443"]}
            ).host,  # type: ignore[union-attr]
            "r.example:8443",
        )

    def test_first_value_is_the_clients(self) -> None:
        forwarded = self.headers.read(
            "10.1.1.1",
            {
                "x-forwarded-proto": ["https, http"],
                "x-forwarded-host": ["public.example, internal"],
            },
        )
        self.assertEqual(forwarded, Forwarded("https", "public.example"))

    def test_forwarded_ignored_by_default(self) -> None:
        """
        A proxy that writes X-Forwarded-* passes a client's own Forwarded
        through: by default it is not read.
        """
        forwarded = self.headers.read(
            "10.1.1.1",
            {
                "forwarded": ["for=198.51.100.4;proto=https;host=a.example"],
                "x-forwarded-proto": ["http"],
                "x-forwarded-host": ["b.example"],
                "x-forwarded-for": ["1.1.1.1"],
            },
        )
        self.assertEqual(forwarded, Forwarded("http", "b.example", "1.1.1.1"))

    def test_forwarded_when_named(self) -> None:
        """
        With the forwarded family, Forwarded alone is read: X-Forwarded-*
        are the client's own then.
        """
        headers = ForwardedHeaders(["10.0.0.0/8"], "forwarded")
        forwarded = headers.read(
            "10.1.1.1",
            {
                "forwarded": ["for=198.51.100.4;proto=https;host=a.example, for=10.2.2.2"],
                "x-forwarded-proto": ["http"],
                "x-forwarded-host": ["b.example"],
                "x-forwarded-for": ["1.1.1.1"],
            },
        )
        self.assertEqual(forwarded, Forwarded("https", "a.example", "198.51.100.4"))
        self.assertEqual(headers.read("10.1.1.1", {"x-forwarded-for": ["1.1.1.1"]}), Forwarded())

    def test_unknown_family_refused(self) -> None:
        self.assertRaises(ValueError, ForwardedHeaders, ["10.0.0.0/8"], "x-real-ip")

    def test_client_walk_stops_at_first_untrusted(self) -> None:
        forwarded = self.headers.read(
            "10.1.1.1", {"x-forwarded-for": ["6.6.6.6, 203.0.113.9, 10.3.3.3"]}
        )
        self.assertEqual(forwarded, Forwarded(client="203.0.113.9"))

    def test_hostile_values_are_dropped(self) -> None:
        forwarded = self.headers.read(
            "10.1.1.1",
            {
                "x-forwarded-proto": ["javascript"],
                "x-forwarded-host": ['evil"><script>'],
            },
        )
        self.assertEqual(forwarded, Forwarded())


class _Echo:
    """A leaf resource that answers with what the request believes about itself."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        return b"%s %s %s" % (
            request.prePathURL(),
            request.getHeader(b"host"),
            b"secure" if request.isSecure() else b"plain",
        )


class SiteTests(SynchronousTestCase):
    """L{HammalSite} applies the headers before any resource sees the request."""

    def answer(self, peer: str, headers: bytes) -> bytes:
        from twisted.internet.address import IPv4Address
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport
        from twisted.web.resource import IResource
        from zope.interface import directlyProvides

        from hammal.web.site import HammalSite

        resource = _Echo()
        directlyProvides(resource, IResource)
        site = HammalSite(resource, Clock(), forwarded=ForwardedHeaders(["10.0.0.0/8"]))  # type: ignore[arg-type]
        channel = site.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 4321))
        channel.makeConnection(transport)
        channel.dataReceived(
            b"GET /v2/x HTTP/1.1\r\nHost: hammal.internal:5000\r\n" + headers + b"\r\n"
        )
        return transport.value().split(b"\r\n\r\n", 1)[1]

    def test_trusted(self) -> None:
        body = self.answer(
            "10.0.0.5", b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: registry.example.com\r\n"
        )
        self.assertEqual(body, b"https://registry.example.com/ registry.example.com secure")

    def test_proto_alone_keeps_the_host(self) -> None:
        body = self.answer("10.0.0.5", b"X-Forwarded-Proto: https\r\n")
        self.assertEqual(body, b"https://hammal.internal:5000/ hammal.internal:5000 secure")

    def test_untrusted(self) -> None:
        body = self.answer(
            "192.0.2.5", b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: registry.example.com\r\n"
        )
        self.assertTrue(body.startswith(b"http://hammal.internal:"), body)  # twisted.web's own port
        self.assertTrue(body.endswith(b" hammal.internal:5000 plain"), body)
