"""
A request whose client left before it was answered is logged and counted
as aborted (status 499), not as the 200 it never got.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from hammal import metrics
from hammal.web.respond import abort_client
from hammal.web.site import HammalSite
from hammal.web.state import state_of


class _Pending(Resource):
    """Never answers; optionally aborts the client itself."""

    isLeaf = True

    def __init__(self, abort: bool = False) -> None:
        super().__init__()
        self.abort = abort
        self.requests: list[Any] = []

    def render_GET(self, request: Any) -> Any:
        self.requests.append(request)
        state_of(request).route = "blob"
        request.setHeader(b"content-length", b"100")
        request.write(b"x" * 10)
        if self.abort:
            abort_client(request)
        return NOT_DONE_YET


class AbortedRequestTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_namespace") == "hammal.access":
                self.events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def serve(self, resource: Resource) -> tuple[Any, StringTransport]:
        site = HammalSite(resource, Clock())
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"GET /v2/a/blobs/x HTTP/1.1\r\nHost: h\r\n\r\n")
        return channel, transport

    def count(self, status: str) -> float:
        return metrics.requests.labels("blob", status)._value.get()  # type: ignore[attr-defined, no-any-return]

    def test_client_gone_is_499(self) -> None:
        before = self.count("499")
        ok_before = self.count("200")
        channel, _ = self.serve(_Pending())
        channel.connectionLost(Failure(ConnectionLost()))
        (event,) = self.events
        self.assertEqual(event["status"], 499)
        self.assertTrue(event["aborted"])
        self.assertIn('"GET /v2/a/blobs/x" 499 ', event["access"])
        self.assertEqual(self.count("499"), before + 1)
        self.assertEqual(self.count("200"), ok_before)

    def test_aborted_by_hammal_keeps_its_status(self) -> None:
        """hammal cutting a transfer (upstream broke) is not the client's doing."""
        channel, transport = self.serve(_Pending(abort=True))
        channel.connectionLost(Failure(ConnectionLost()))
        (event,) = self.events
        self.assertEqual(event["status"], 200)
        self.assertTrue(event["aborted"])
