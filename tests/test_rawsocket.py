"""
Tests for L{hammal.cache.rawsocket}: the adapter reads and drives a real
Twisted TCP connection (over a socket pair), so a Twisted release that
renames these private fields fails here first.
"""

from __future__ import annotations

import socket

from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from hammal.cache.rawsocket import RawSocket


class _Producer:
    def resumeProducing(self) -> None:
        pass

    def pauseProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class RawSocketTests(SynchronousTestCase):
    def setUp(self) -> None:
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        self.reactor = MemoryReactor()
        self.transport = tcp.Connection(ours, Protocol(), self.reactor)  # type: ignore[arg-type]
        self.transport.connected = True  # as the port sets it once accepted
        self.socket = RawSocket(self.transport)
        self.ours = ours

    def test_fileno(self) -> None:
        self.assertEqual(self.socket.fileno(), self.ours.fileno())

    def test_buffered(self) -> None:
        """What Twisted holds unwritten counts, whichever buffer it is in."""
        self.assertEqual(self.socket.buffered(), 0)
        self.transport.write(b"x" * 10)
        self.transport.write(b"y" * 5)
        self.assertEqual(self.socket.buffered(), 15)

    def test_resume_when_drained(self) -> None:
        """The producer is paused and the transport waits to write."""
        self.transport.registerProducer(_Producer(), True)
        self.socket.resume_when_drained()
        self.assertTrue(self.transport.producerPaused)
        self.assertIn(self.transport, self.reactor.getWriters())
