"""
``--upstream-ca`` adds a private CA to the system's roots: a TLS handshake
(in memory, through the client side hammal's upstream policy builds) with
an upstream signed by the private CA and with one signed by a "system" CA
(``SSL_CERT_FILE``, which OpenSSL's default paths honour) both verify; one
signed by neither is refused.
"""

from __future__ import annotations

import os

from OpenSSL import SSL
from twisted.trial.unittest import SynchronousTestCase

from hammal.tls import server_tls_options, upstream_tls_policy
from tests.integration.pki import PKIFiles, generate_pki


class _Factory:
    wrappedFactory = None  # offers no ALPN protocols of its own


class _TLSProtocol:
    """What Twisted's client connection reports a failed verification to."""

    factory = _Factory()

    def __init__(self) -> None:
        self.failure: object = None

    def failVerification(self, reason: object) -> None:
        self.failure = reason


class UpstreamCATests(SynchronousTestCase):
    def pki(self) -> PKIFiles:
        directory = self.mktemp()
        os.makedirs(directory)
        return generate_pki(directory)

    def setUp(self) -> None:
        self.private, self.system, self.stranger = self.pki(), self.pki(), self.pki()
        previous = os.environ.get("SSL_CERT_FILE")
        os.environ["SSL_CERT_FILE"] = self.system.ca_cert

        def restore() -> None:
            if previous is None:
                os.environ.pop("SSL_CERT_FILE", None)
            else:
                os.environ["SSL_CERT_FILE"] = previous

        self.addCleanup(restore)
        self.policy = upstream_tls_policy(self.private.ca_cert)

    def verified(self, upstream: PKIFiles) -> bool:
        """Whether hammal's client completes a verified handshake with C{upstream}."""
        server = SSL.Connection(
            server_tls_options(upstream.tls_chain, upstream.tls_key).getContext()
        )
        server.set_accept_state()
        protocol = _TLSProtocol()
        creator = self.policy.creatorForNetloc(b"localhost", 443)
        client = creator.clientConnectionForTLS(protocol)  # type: ignore[arg-type]
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
        return protocol.failure is None and client.get_peer_certificate() is not None

    def test_private_ca(self) -> None:
        self.assertTrue(self.verified(self.private))

    def test_system_roots_kept(self) -> None:
        self.assertTrue(self.verified(self.system), "--upstream-ca replaced the system roots")

    def test_unknown_ca_refused(self) -> None:
        self.assertFalse(self.verified(self.stranger))
