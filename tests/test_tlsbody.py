"""
Tests for L{hammal.cache.tlsbody}: the adapter reads a real Twisted TLS
client connection (an HTTPS response over 127.0.0.1), so a Twisted release
that renames the private fields it relies on fails here first (in
production the adapter would then refuse every hand-over: no pump, no
harm).
"""

from __future__ import annotations

import os
from typing import Any

from OpenSSL import SSL
from twisted.internet import tcp
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource

from hammal.cache.tlsbody import TLSBody, tls_body_connection
from tests.test_pump import _Stalls, _turn
from tests.test_pump_tls import tls_upstream


class _Body(Protocol):
    """Keeps the body's transport; fires C{started} with it."""

    def __init__(self) -> None:
        self.started: Deferred[Any] = Deferred()

    def connectionMade(self) -> None:
        self.started.callback(self.transport)

    def connectionLost(self, reason: Any = None) -> None:
        pass


class TLSBodyTests(TestCase):
    def setUp(self) -> None:
        self.web = Resource()
        self.stalls = _Stalls(os.urandom(256 * 1024), sent=64 * 1024)
        self.web.putChild(b"stalls", self.stalls)
        self.base, self.agent, _ = tls_upstream(self, self.web)

    def tearDown(self) -> None:
        for request in self.stalls.open:
            request.channel.transport.abortConnection()

    @inlineCallbacks
    def body(self) -> Any:
        """The body transport of an HTTPS response, and its adapter."""
        response = yield self.agent.request(b"GET", self.base + b"stalls")
        body = _Body()
        response.deliverBody(body)
        transport = yield body.started
        found = tls_body_connection(transport)
        self.assertIsInstance(found, TLSBody)
        self.addCleanup(found.abort)
        return transport, found

    @inlineCallbacks
    def test_taken_over_once_reading_stopped(self) -> Any:
        """
        A TLS response body's connection: TLS directly over TCP, the
        handshake done, nothing for Twisted to send: it can be handed over.
        """
        transport, found = yield self.body()
        self.assertIsInstance(found.tcp, tcp.Connection)
        found.tcp.stopReading()
        yield _turn()
        self.assertIsNone(found.problem())
        self.assertIsInstance(found.connection(), SSL.Connection)
        self.assertEqual(found.connection().pending(), 0)

    @inlineCallbacks
    def test_not_while_twisted_has_bytes_to_send(self) -> Any:
        """Bytes written over TLS and not sent yet keep the connection on the event loop."""
        transport, found = yield self.body()
        found.tcp.stopReading()
        transport._producer.write(b"x")  # the TLS layer's own (aggregated) write
        self.assertEqual(found.problem(), "Twisted has bytes to send over TLS")

    @inlineCallbacks
    def test_not_once_aborted(self) -> Any:
        """A connection on its way down cannot be handed over."""
        transport, found = yield self.body()
        found.abort()
        self.assertIsNotNone(found.problem())

    def test_not_tls(self) -> None:
        """Anything but a TLS connection over TCP is not this adapter's."""
        self.assertIsNone(tls_body_connection(None))
        self.assertIsNone(tls_body_connection(object()))
