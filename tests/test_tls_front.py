"""
Tests for server TLS (loading, reloading), upstream CA policy, and the
front page.
"""

from __future__ import annotations

import os
import shutil

from OpenSSL import SSL
from twisted.trial.unittest import SynchronousTestCase

from hammal.config import ConfigError
from hammal.tls import ReloadingServerTLS, server_tls_options, upstream_tls_policy
from hammal.web.front import front_page
from tests.integration.pki import generate_pki
from tests.test_v2 import Mirror


class ServerTLSTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.pki = generate_pki(self.directory)

    def test_loads_chain_and_key(self) -> None:
        options = server_tls_options(self.pki.tls_chain, self.pki.tls_key)
        context = options.getContext()
        self.assertIsNotNone(context)

    def handshake(self, max_version: int) -> bool:
        """Whether a client capped at C{max_version} completes a handshake."""
        server = SSL.Connection(
            server_tls_options(self.pki.tls_chain, self.pki.tls_key).getContext()
        )
        server.set_accept_state()
        client_context = SSL.Context(SSL.TLS_METHOD)
        client_context.set_min_proto_version(0)
        client_context.set_max_proto_version(max_version)
        client_context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        client = SSL.Connection(client_context)
        client.set_connect_state()
        for _ in range(20):
            for one, other in ((client, server), (server, client)):
                try:
                    one.do_handshake()
                except SSL.WantReadError:
                    pass
                except SSL.Error:
                    return False
                try:
                    other.bio_write(one.bio_read(65536))
                except SSL.WantReadError:
                    pass
        return (
            client.get_protocol_version_name() != "Unknown"
            and server.get_protocol_version_name() != "Unknown"
        )

    def test_tls_1_2_minimum(self) -> None:
        """TLS 1.2 clients connect; TLS 1.1 ones are refused."""
        self.assertTrue(self.handshake(SSL.TLS1_2_VERSION))
        self.assertFalse(self.handshake(SSL.TLS1_1_VERSION))

    def test_missing_or_bad_files(self) -> None:
        self.assertRaises(ConfigError, server_tls_options, "/nonexistent.pem", self.pki.tls_key)
        garbage = os.path.join(self.directory, "garbage.pem")
        with open(garbage, "w") as f:
            f.write("not a certificate")
        self.assertRaises(ConfigError, server_tls_options, garbage, self.pki.tls_key)
        # a key that does not belong to the certificate
        self.assertRaises(ConfigError, server_tls_options, self.pki.tls_chain, self.pki.ca_key)

    def test_reload_picks_up_new_certificate(self) -> None:
        cert = os.path.join(self.directory, "live-cert.pem")
        key = os.path.join(self.directory, "live-key.pem")
        shutil.copy(self.pki.tls_chain, cert)
        shutil.copy(self.pki.tls_key, key)
        tls = ReloadingServerTLS(cert, key)
        before = tls._options
        other_directory = self.mktemp()
        os.makedirs(other_directory)
        other = generate_pki(other_directory)
        shutil.copy(other.tls_chain, cert)
        shutil.copy(other.tls_key, key)
        self.assertTrue(tls.reload())
        self.assertIsNot(tls._options, before)

    def test_reload_keeps_old_on_broken_files(self) -> None:
        cert = os.path.join(self.directory, "live-cert.pem")
        shutil.copy(self.pki.tls_chain, cert)
        tls = ReloadingServerTLS(cert, self.pki.tls_key)
        before = tls._options
        with open(cert, "w") as f:
            f.write("truncated")
        self.assertFalse(tls.reload())
        self.assertIs(tls._options, before)

    def test_upstream_ca(self) -> None:
        self.assertIsNotNone(upstream_tls_policy(self.pki.ca_cert))
        self.assertRaises(ConfigError, upstream_tls_policy, "/nonexistent")


class FrontPageTests(SynchronousTestCase):
    def test_usage_for_this_host(self) -> None:
        page = front_page("hammal.example.com:5000", secure=True).decode()
        self.assertIn('"registry-mirrors": ["https://hammal.example.com:5000"]', page)
        self.assertIn("docker pull hammal.example.com:5000/library/alpine", page)
        self.assertIn('location = "hammal.example.com:5000"', page)

    def test_header_injection(self) -> None:
        """A hostile Host header never reaches the page as markup."""
        for host in (
            "<script>alert(1)</script>",
            'a.example.com"><img src=x onerror=alert(1)>',
            "a.example.com\r\nSet-Cookie: x=1",
            "a.example.com/<b>",
        ):
            page = front_page(host, secure=False).decode()
            self.assertNotIn("<script>alert", page)
            self.assertNotIn("<img", page)
            self.assertNotIn("Set-Cookie", page)
            self.assertIn("mirror.example.com", page)

    def test_served_with_safe_headers(self) -> None:
        mirror = Mirror()
        response = mirror.request(b"GET", "/", {b"host": [b"<evil>"]})
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"x-content-type-options"), [b"nosniff"])
        self.assertNotIn(b"<evil>", mirror.body(response))


class ALPNTests(SynchronousTestCase):
    """The factory TLS wraps tells Twisted's ALPN callback what hammal speaks."""

    def test_connection_limit_offers_http_1_1(self) -> None:
        from twisted.internet.interfaces import IProtocolNegotiationFactory
        from twisted.web.resource import Resource
        from twisted.web.server import Site

        from hammal.web.limits import ConnectionLimit

        factory = ConnectionLimit(Site(Resource()), None)
        self.assertTrue(IProtocolNegotiationFactory.providedBy(factory))
        self.assertEqual(factory.acceptableProtocols(), [b"http/1.1"])
