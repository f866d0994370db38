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
    resumed = 0

    def resumeProducing(self) -> None:
        self.resumed += 1

    def pauseProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class RawSocketTests(SynchronousTestCase):
    def setUp(self) -> None:
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        self.theirs = theirs
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

    def test_buffered_after_a_partial_write(self) -> None:
        """What the socket did not take stays counted (Twisted's offset into its buffer)."""
        self.ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        self.transport.write(b"z" * (1 << 20))
        self.transport.doWrite()
        self.assertGreater(self.socket.buffered(), 0)
        self.assertLess(self.socket.buffered(), 1 << 20)

    def test_drained_transport_resumes_the_producer(self) -> None:
        """
        Once Twisted wrote what it held, it resumes the producer that
        resume_when_drained paused, and stops waiting to write.
        """
        producer = _Producer()
        self.transport.registerProducer(producer, True)
        self.transport.write(b"headers")
        self.socket.resume_when_drained()
        self.transport.doWrite()
        self.assertEqual(producer.resumed, 1)
        self.assertFalse(self.transport.producerPaused)
        self.assertEqual(self.socket.buffered(), 0)
        self.assertNotIn(self.transport, self.reactor.getWriters())
        self.assertEqual(self.theirs.recv(100), b"headers")
