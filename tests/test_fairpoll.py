"""L{hammal.fairpoll}: the epoll reactor handles a bounded number of sockets per turn."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor, MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from hammal.fairpoll import EVENTS_PER_TURN, BoundedPoller, FairPolling

try:
    from twisted.internet.epollreactor import EPollReactor
except ImportError:  # pragma: no cover - not Linux
    EPollReactor = None  # type: ignore[assignment,misc]


class _FakeEpoll:
    """Level-triggered epoll: the C{ready} fds, the ones handed out moved to the tail."""

    def __init__(self, ready: list[int]) -> None:
        self.ready = list(ready)
        self.asked: list[int] = []
        self.closed = False

    def poll(self, timeout: float = -1, maxevents: int = -1) -> list[tuple[int, int]]:
        self.asked.append(maxevents)
        count = len(self.ready) if maxevents < 1 else min(maxevents, len(self.ready))
        out, self.ready = self.ready[:count], self.ready[count:] + self.ready[:count]
        return [(fd, 1) for fd in out]

    def close(self) -> None:
        self.closed = True


class BoundedPollerTests(SynchronousTestCase):
    def test_asks_for_at_most_the_bound(self) -> None:
        fake = _FakeEpoll(list(range(1000)))
        poller = BoundedPoller(fake, 64)
        self.assertEqual(len(poller.poll(0, 1000)), 64)
        self.assertEqual(len(poller.poll(0, -1)), 64)
        self.assertEqual(len(poller.poll(0, 10)), 10)  # fewer asked: fewer
        self.assertEqual(fake.asked, [64, 64, 10])

    def test_round_robin_loses_no_socket(self) -> None:
        """Over enough turns every ready socket is handed out, each equally often."""
        fake = _FakeEpoll(list(range(300)))
        poller = BoundedPoller(fake, 100)
        seen: dict[int, int] = {}
        for _ in range(6):
            for fd, _event in poller.poll(0, 300):
                seen[fd] = seen.get(fd, 0) + 1
        self.assertEqual(seen, {fd: 2 for fd in range(300)})

    def test_other_calls_reach_the_poller(self) -> None:
        fake = _FakeEpoll([])
        BoundedPoller(fake).close()
        self.assertTrue(fake.closed)

    def test_bound_at_least_one(self) -> None:
        self.assertRaises(ValueError, BoundedPoller, _FakeEpoll([]), 0)


class FairPollingTests(SynchronousTestCase):
    def test_no_op_on_other_reactors(self) -> None:
        memory = MemoryReactor()
        service = FairPolling(memory)
        service.startService()
        self.assertFalse(service.bounded)
        self.assertFalse(hasattr(memory, "_poller"))
        service.stopService()

    def test_bounds_an_epoll_reactor_while_running(self) -> None:
        if EPollReactor is None:  # pragma: no cover
            raise self.skipTest("no epoll")
        epoll = EPollReactor()
        self.addCleanup(epoll._poller.close)
        original = epoll._poller
        service = FairPolling(epoll, 32)
        service.startService()
        self.assertTrue(service.bounded)
        self.assertIsInstance(epoll._poller, BoundedPoller)
        self.assertIs(epoll._poller.wrapped, original)
        self.assertEqual(epoll._poller.events_per_turn, 32)
        service.stopService()
        self.assertIs(epoll._poller, original)
        self.assertFalse(service.bounded)

    def test_in_hammals_service(self) -> None:
        """C{makeService} adds one, so every hammal process (and worker) gets it."""
        from hammal.tap import Options, makeService

        options = Options(environ={})
        options.parseOptions(["--port", "tcp:0", "--cache-dir", self.mktemp()])
        service = makeService(options, MemoryReactorClock())
        fair = [child for child in service if isinstance(child, FairPolling)]
        self.assertEqual(len(fair), 1)

    def test_default_bound(self) -> None:
        self.assertTrue(16 <= EVENTS_PER_TURN <= 256)


class _Turns:
    """Wraps the reactor's poller and counts its polls: one per reactor turn."""

    def __init__(self, poller: Any) -> None:
        self.wrapped = poller
        self.count = 0

    def poll(self, timeout: float = -1, maxevents: int = -1) -> list[tuple[int, int]]:
        self.count += 1
        events: list[tuple[int, int]] = self.wrapped.poll(timeout, maxevents)
        return events

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)


class _AlwaysReady:
    """A socket with a byte never read: readable every turn; counts its turns."""

    def __init__(self, turns: _Turns, log: list[int]) -> None:
        self._mine, self._other = socket.socketpair()
        self._other.send(b"x")
        self._turns = turns
        self._log = log
        self.reads = 0

    def fileno(self) -> int:
        return self._mine.fileno()

    def doRead(self) -> None:
        self.reads += 1
        self._log.append(self._turns.count)

    def connectionLost(self, reason: Any) -> None:
        pass

    def logPrefix(self) -> str:
        return "always-ready"

    def close(self) -> None:
        self._mine.close()
        self._other.close()


class _Pong(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"pong")  # type: ignore[union-attr]


class _Ping(Protocol):
    def __init__(self, turns: _Turns) -> None:
        self.turns = turns
        self.connected_ = defer.Deferred[None]()
        self.answered = defer.Deferred[int]()

    def connectionMade(self) -> None:
        self.connected_.callback(None)

    def dataReceived(self, data: bytes) -> None:
        if not self.answered.called:
            self.answered.callback(self.turns.count)


class RealTCPTests(TestCase):
    """
    Hundreds of sockets ready every turn, and a request over real TCP
    through the running epoll reactor.
    """

    READY = 400
    BOUND = 64

    def setUp(self) -> Any:
        if not isinstance(reactor, EPollReactor or ()):  # pragma: no cover
            raise self.skipTest("not the epoll reactor")
        self.turns = _Turns(reactor._poller)
        reactor._poller = self.turns  # type: ignore[attr-defined]
        self.addCleanup(setattr, reactor, "_poller", self.turns.wrapped)
        self.fair = FairPolling(reactor, self.BOUND)
        self.fair.startService()
        self.addCleanup(self.fair.stopService)
        self.reads: list[int] = []
        self.crowd = [_AlwaysReady(self.turns, self.reads) for _ in range(self.READY)]
        for ready in self.crowd:
            self.addCleanup(ready.close)
            self.addCleanup(reactor.removeReader, ready)
        port = reactor.listenTCP(0, Factory.forProtocol(_Pong), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.ping = _Ping(self.turns)
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        client.setblocking(False)
        self.client = reactor.adoptStreamConnection(
            client.fileno(), socket.AF_INET, Factory.forProtocol(lambda: self.ping)
        )
        client.close()  # adopted: the reactor holds its own descriptor
        self.addCleanup(self.ping.transport.abortConnection)
        return self.ping.connected_

    def _start_crowd(self) -> None:
        for ready in self.crowd:
            reactor.addReader(ready)

    def _reads_per_turn(self) -> dict[int, int]:
        per_turn: dict[int, int] = {}
        for turn in self.reads:
            per_turn[turn] = per_turn.get(turn, 0) + 1
        return per_turn

    @defer.inlineCallbacks
    def test_turn_handles_at_most_the_bound(self) -> Any:
        """No turn handles more than the bound; every ready socket is served."""
        self._start_crowd()
        start = self.turns.count
        while self.turns.count < start + 3 * self.READY // self.BOUND:
            yield _next_turn()
        per_turn = self._reads_per_turn()
        self.assertLessEqual(max(per_turn.values()), self.BOUND)
        self.assertGreaterEqual(min(ready.reads for ready in self.crowd), 2)

    @defer.inlineCallbacks
    def test_delayed_call_runs_between_batches(self) -> Any:
        """A call due now waits for at most a batch or two of ready sockets, not for all."""
        self._start_crowd()
        yield _next_turn()
        before = len(self.reads)
        yield _next_turn()
        self.assertLessEqual(len(self.reads) - before, 2 * self.BOUND)

    @defer.inlineCallbacks
    def test_request_answered_within_bounded_turns(self) -> Any:
        """The crowd served round-robin: a request is read and answered in a few rounds."""
        self._start_crowd()
        yield _next_turn()
        sent_at = self.turns.count
        self.ping.transport.write(b"ping")  # type: ignore[union-attr]
        answered_at = yield self.ping.answered
        rounds = -(-(self.READY + 3) // self.BOUND)  # turns to serve every ready socket once
        # write the ping, read it, write the pong, read it: each within a round
        self.assertLessEqual(answered_at - sent_at, 4 * (rounds + 1))
        self.assertLessEqual(max(self._reads_per_turn().values()), self.BOUND)


def _next_turn() -> defer.Deferred[None]:
    """Fires from a delayed call due at once: in the reactor's next turn."""
    done = defer.Deferred[None]()
    reactor.callLater(0, done.callback, None)
    return done
