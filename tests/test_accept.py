"""L{hammal.accept}: listening ports accept a bounded number per reactor turn."""

from __future__ import annotations

import errno
import socket
from typing import Any

from twisted.internet import defer, reactor, tcp
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from hammal.accept import ACCEPTS_PER_TURN, FairListening, FairPort


class _Backlog:
    """A listening socket with C{pending} connections waiting to be accepted."""

    def __init__(self, pending: int) -> None:
        self.pending = pending

    def accept(self) -> tuple[Any, tuple[str, int]]:
        if not self.pending:
            raise BlockingIOError(errno.EAGAIN, "no connection waiting")
        self.pending -= 1
        return _Client(), ("127.0.0.1", 40000 + self.pending)


class _Client:
    def close(self) -> None:
        pass


class _Counting(Factory):
    """Counts the connections offered, and refuses them (no transport needed)."""

    def __init__(self) -> None:
        self.offered = 0

    def buildProtocol(self, addr: IAddress) -> None:  # type: ignore[override]
        self.offered += 1
        return None


def _accepted_per_turn(port: tcp.Port, factory: _Counting, turns: int) -> list[int]:
    counts = []
    for _ in range(turns):
        before = factory.offered
        port.doRead()
        counts.append(factory.offered - before)
    return counts


def _port(kind: type[tcp.Port], pending: int) -> tuple[tcp.Port, _Counting]:
    factory = _Counting()
    port = kind(0, factory, 50, "127.0.0.1", MemoryReactor())
    port.socket = _Backlog(pending)  # type: ignore[assignment]
    port.numberAccepts = 100  # as startListening leaves it
    return port, factory


class FairPortTests(SynchronousTestCase):
    def test_twisted_accepts_ever_more_per_turn(self) -> None:
        """What L{FairPort} changes: Twisted's port takes 100, then 120, ..."""
        port, factory = _port(tcp.Port, 1000)
        self.assertEqual(_accepted_per_turn(port, factory, 3), [100, 120, 140])

    def test_bounded_per_turn(self) -> None:
        port, factory = _port(FairPort, 1000)
        self.assertEqual(_accepted_per_turn(port, factory, 5), [ACCEPTS_PER_TURN] * 5)

    def test_takes_what_is_there(self) -> None:
        port, factory = _port(FairPort, ACCEPTS_PER_TURN + 3)
        self.assertEqual(_accepted_per_turn(port, factory, 3), [ACCEPTS_PER_TURN, 3, 0])

    def test_bound_per_port(self) -> None:
        port, factory = _port(FairPort, 100)
        port.accepts_per_turn = 2  # type: ignore[attr-defined]
        self.assertEqual(_accepted_per_turn(port, factory, 2), [2, 2])


class FairListeningTests(SynchronousTestCase):
    """Reactors that are not Twisted's POSIX reactors listen as they always do."""

    def test_memory_reactor_listens_itself(self) -> None:
        memory = MemoryReactor()
        listening = FairListening(memory)
        listening.listenTCP(5000, Factory(), 7, "127.0.0.1")
        listening.adoptStreamPort(9, socket.AF_INET6, Factory())
        self.assertEqual(memory.tcpServers[0][:3], (5000, memory.tcpServers[0][1], 7))
        self.assertEqual(memory.adoptedPorts[0][:2], (9, socket.AF_INET6))

    def test_other_calls_reach_the_reactor(self) -> None:
        memory = MemoryReactor()
        self.assertEqual(FairListening(memory).tcpServers, memory.tcpServers)


class _Recorder(Protocol):
    factory: _RecordingFactory

    def connectionMade(self) -> None:
        self.factory.made(self)

    def dataReceived(self, data: bytes) -> None:
        self.factory.handled.append(data.strip())
        assert self.transport is not None
        self.transport.write(b"ok\n")
        if len(self.factory.handled) == self.factory.expected:
            self.factory.all_handled.callback(None)


class _RecordingFactory(Factory):
    protocol = _Recorder

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.handled: list[bytes] = []
        self.connections = 0
        self.all_handled: defer.Deferred[None] = defer.Deferred()
        self.first: defer.Deferred[None] = defer.Deferred()
        self.on_second: Any = None

    def made(self, protocol: Protocol) -> None:
        self.connections += 1
        if self.connections == 1:
            self.first.callback(None)
        elif self.connections == 2 and self.on_second is not None:
            self.on_second()


class RealTCPTests(TestCase):
    """Over real TCP on 127.0.0.1: a crowd arrives at a L{FairPort}."""

    @defer.inlineCallbacks
    def test_request_in_progress_goes_before_the_crowd(self) -> Any:
        crowd = 200
        factory = _RecordingFactory(crowd + 1)
        port = FairListening(reactor).listenTCP(0, factory, 1024, "127.0.0.1")
        self.addCleanup(port.stopListening)
        self.assertIsInstance(port, FairPort)
        address = ("127.0.0.1", port.getHost().port)

        existing = socket.create_connection(address)
        self.addCleanup(existing.close)
        yield factory.first  # accepted: a connection already in progress

        # The crowd: connected by the kernel (the listen backlog), each with
        # its request sent, before the reactor runs again.
        clients = []
        for _ in range(crowd):
            client = socket.create_connection(address)
            self.addCleanup(client.close)
            client.sendall(b"new\n")
            clients.append(client)

        # The existing connection's request arrives at the end of the turn
        # that accepts the first of the crowd.
        def send_existing() -> None:
            existing.sendall(b"old\n")

        factory.on_second = lambda: reactor.callLater(0, send_existing)
        yield factory.all_handled

        before = factory.handled.index(b"old")
        self.assertLessEqual(before, ACCEPTS_PER_TURN)
        self.assertEqual(factory.handled.count(b"new"), crowd)
        self.assertEqual(factory.connections, crowd + 1)
