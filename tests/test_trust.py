"""
``--upstream-ca`` adds a private CA to the system's roots: over real TLS on
127.0.0.1, an upstream signed by the private CA and one signed by a
"system" CA (``SSL_CERT_FILE``, which OpenSSL's default paths honour) are
both trusted; one signed by neither is refused.
"""

from __future__ import annotations

import os
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data

from hammal.registry.client import make_http_client
from hammal.tls import server_tls_options, upstream_tls_policy
from tests.integration.pki import PKIFiles, generate_pki


class UpstreamCATests(TestCase):
    def pki(self) -> PKIFiles:
        directory = self.mktemp()
        os.makedirs(directory)
        return generate_pki(directory)

    def serve(self, pki: PKIFiles) -> int:
        root = Resource()
        root.putChild(b"", Data(b"ok", "text/plain"))
        port = reactor.listenSSL(  # type: ignore[attr-defined]
            0, Site(root), server_tls_options(pki.tls_chain, pki.tls_key), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

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
        self.http = make_http_client(reactor, 5, tls_policy=upstream_tls_policy(self.private.ca_cert))
        pool = self.http._agent._agent._pool  # type: ignore[attr-defined]
        self.addCleanup(pool.closeCachedConnections)

    @inlineCallbacks
    def get(self, port: int) -> Any:
        response = yield self.http.get(f"https://localhost:{port}/", timeout=10)
        body = yield treq.content(response)
        return response.code, body

    @inlineCallbacks
    def test_private_ca_and_system_roots(self) -> Any:
        private = yield self.get(self.serve(self.private))
        self.assertEqual(private, (200, b"ok"))
        system = yield self.get(self.serve(self.system))
        self.assertEqual(system, (200, b"ok"), "--upstream-ca replaced the system roots")

    @inlineCallbacks
    def test_unknown_ca_refused(self) -> Any:
        port = self.serve(self.stranger)
        try:
            yield self.get(port)
        except ResponseNeverReceived as failure:
            reasons = " ".join(str(reason.value) for reason in failure.reasons)
            self.assertIn("certificate verify failed", reasons)
        else:
            self.fail("a certificate from an unknown CA was accepted")
