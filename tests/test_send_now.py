"""L{hammal.web.send_now}: a small document leaves in the turn that answered it."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from hammal.cache.readers import tcp_transport
from hammal.replies import Document
from hammal.web.limits import ConnectionLimit
from hammal.web.respond import write_document
from hammal.web.send_now import send_now
from hammal.web.site import HammalSite

BODY = b'{"schemaVersion": 2}'


class _Manifest(Resource):
    """Answers with a small document, then looks at what the client's socket holds."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.client: socket.socket | None = None
        self.in_same_turn = defer.Deferred[bytes]()

    def render_GET(self, request: Any) -> Any:
        write_document(request, Document(200, [(b"content-type", [b"x/json"])], BODY))
        if self.client is not None:
            try:
                arrived = self.client.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                arrived = b""
            self.in_same_turn.callback(arrived)
        return NOT_DONE_YET


class RealTCPTests(TestCase):
    @defer.inlineCallbacks
    def _answer(self, factory: Any, resource: _Manifest) -> Any:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
        self.addCleanup(client.close)
        client.sendall(b"GET /v2/x/manifests/latest HTTP/1.1\r\nHost: x\r\n\r\n")
        client.setblocking(False)  # the resource looks without waiting
        resource.client = client
        arrived = yield resource.in_same_turn
        return arrived

    @defer.inlineCallbacks
    def test_answer_sent_before_the_turn_ends(self) -> Any:
        """Through hammal's connection limit, as C{makeService} builds it."""
        resource = _Manifest()
        factory = ConnectionLimit(HammalSite(resource, reactor), 100)
        arrived = yield self._answer(factory, resource)
        self.assertTrue(arrived.startswith(b"HTTP/1.1 200"), arrived)
        self.assertTrue(arrived.endswith(BODY), arrived)

    @defer.inlineCallbacks
    def test_bare_site(self) -> Any:
        resource = _Manifest()
        arrived = yield self._answer(HammalSite(resource, reactor), resource)
        self.assertTrue(arrived.endswith(BODY), arrived)


class NotTCPTests(SynchronousTestCase):
    def test_no_tcp_transport(self) -> None:
        request = DummyRequest([b""])
        self.assertIsNone(tcp_transport(request))  # type: ignore[arg-type]
        send_now(None)  # nothing to do

    def test_string_transport(self) -> None:
        request = DummyRequest([b""])
        request.channel = type("C", (), {"transport": StringTransport()})()
        self.assertIsNone(tcp_transport(request))  # type: ignore[arg-type]
