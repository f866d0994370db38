"""
A client that closes its connection in the middle of a streamed blob is
logged once, as aborted (499): no warning, no abort of a connection that is
gone already (thousands of readers leaving together paid for both).
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.interfaces import IConsumer
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from hammal.replies import BlobReply
from hammal.stream import TransferBroken
from hammal.web.respond import write_stream
from hammal.web.site import HammalSite
from hammal.web.state import state_of


class _Endless:
    """A body that writes a chunk and waits; fails as a cache reader does when stopped."""

    def __init__(self) -> None:
        self.delivering = defer.Deferred[None]()
        self.stopped = defer.Deferred[None]()
        self._done: defer.Deferred[int] | None = None

    def deliver(self, consumer: IConsumer) -> defer.Deferred[int]:
        self._done = defer.Deferred()
        consumer.registerProducer(self, True)
        consumer.write(b"x" * 1024)
        self.delivering.callback(None)
        return self._done

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        # hammal.cache.readers.BlobReader.stopProducing: "the client went away"
        if self._done is not None and not self._done.called:
            self._done.errback(TransferBroken("the client went away"))
        if not self.stopped.called:
            self.stopped.callback(None)

    def stop(self) -> None:
        self.stopProducing()


class _Blob(Resource):
    isLeaf = True

    def __init__(self, body: _Endless) -> None:
        super().__init__()
        self.body = body
        self.finished = defer.Deferred[None]()

    def render_GET(self, request: Any) -> Any:
        state_of(request).route = "blob"
        reply = BlobReply(200, [], 1 << 30, self.body)  # type: ignore[arg-type]
        streaming = defer.ensureDeferred(write_stream(request, reply))
        streaming.addBoth(lambda _: self.finished.callback(None))
        return NOT_DONE_YET


class ClientClosesTests(TestCase):
    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    @defer.inlineCallbacks
    def test_close_mid_body_is_one_access_line(self) -> Any:
        body = _Endless()
        resource = _Blob(body)
        port = reactor.listenTCP(0, HammalSite(resource, reactor), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
        self.addCleanup(client.close)
        client.sendall(b"GET /v2/x/blobs/sha256:00 HTTP/1.1\r\nHost: x\r\n\r\n")
        yield body.delivering
        client.close()
        yield body.stopped
        yield resource.finished
        # the request hears of the loss in the same connectionLost, after the body
        yield deferLater(reactor, 0, lambda: None)
        loud = ("warn", "error", "critical")
        warnings = [e for e in self.events if getattr(e.get("log_level"), "name", "") in loud]
        self.assertEqual(warnings, [])
        access = [e for e in self.events if e.get("log_namespace") == "hammal.access"]
        self.assertEqual(len(access), 1)
        self.assertEqual(access[0]["status"], 499)
