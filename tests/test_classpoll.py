"""
L{hammal.classpoll}: requests on open connections are read before the
arrivals and the blob streams of a crowd, which still get their share.
"""

from __future__ import annotations

import itertools
import os
import socket
import ssl
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor, MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from hammal.classpoll import (
    ARRIVING,
    BUDGETS,
    BULK,
    INTERACTIVE,
    ClassedPoller,
    ConnectionClasses,
    classify,
)
from hammal.fairpoll import FairPolling
from hammal.replies import BlobReply, Document
from hammal.tls import ReloadingServerTLS
from hammal.web.limits import ConnectionLimit
from hammal.web.respond import write_document, write_stream
from hammal.web.site import HammalSite
from tests.integration.pki import generate_pki

try:
    from twisted.internet.epollreactor import EPollReactor
except ImportError:  # pragma: no cover - not Linux
    EPollReactor = None  # type: ignore[assignment,misc]


class _World:
    """Which sockets are ready, and the fake epolls (whose descriptors are ready too)."""

    def __init__(self) -> None:
        self.ready: set[int] = set()
        self.epolls: dict[int, _FakeEpoll] = {}
        self._filenos = itertools.count(10_000)

    def new_epoll(self) -> _FakeEpoll:
        epoll = _FakeEpoll(self, next(self._filenos))
        self.epolls[epoll.fileno()] = epoll
        return epoll

    def is_ready(self, fd: int) -> bool:
        nested = self.epolls.get(fd)
        if nested is not None:
            return nested.has_ready()
        return fd in self.ready


class _FakeEpoll:
    """
    Level-triggered epoll: its registered descriptors that are ready, in
    order, the ones handed out moved to the tail (as Linux does).
    """

    def __init__(self, world: _World, fileno: int) -> None:
        self.world = world
        self._fileno = fileno
        self.fds: dict[int, int] = {}
        self.asked: list[int] = []
        self.closed = False

    def fileno(self) -> int:
        return self._fileno

    def has_ready(self) -> bool:
        return any(self.world.is_ready(fd) for fd in self.fds)

    def register(self, fd: int, flags: int = 1) -> None:
        if fd in self.fds:
            raise FileExistsError(fd)
        self.fds[fd] = flags

    def modify(self, fd: int, flags: int) -> None:
        if fd not in self.fds:
            raise FileNotFoundError(fd)
        self.fds[fd] = flags

    def unregister(self, fd: int) -> None:
        if fd not in self.fds:
            raise FileNotFoundError(fd)
        del self.fds[fd]

    def poll(self, timeout: float = -1, maxevents: int = -1) -> list[tuple[int, int]]:
        self.asked.append(maxevents)
        ready = [fd for fd in self.fds if self.world.is_ready(fd)]
        if maxevents > 0:
            ready = ready[:maxevents]
        for fd in ready:  # to the tail, in order
            self.fds[fd] = self.fds.pop(fd)
        return [(fd, self.fds[fd]) for fd in ready]

    def close(self) -> None:
        self.closed = True


def _poller(budgets: dict[str, int]) -> tuple[_World, _FakeEpoll, ClassedPoller]:
    world = _World()
    main = world.new_epoll()
    return world, main, ClassedPoller(main, budgets, world.new_epoll)


class ClassedPollerTests(SynchronousTestCase):
    def test_interactive_first_and_classes_within_budget(self) -> None:
        """However many bulk sockets are ready, the interactive one comes first, every poll."""
        world, _main, poller = _poller({ARRIVING: 4, BULK: 8})
        for fd in range(1, 1001):
            poller.register(fd, 1)
            self.assertTrue(poller.classify(fd, BULK))
        poller.register(5000, 1)
        world.ready.update(range(1, 1001))
        world.ready.add(5000)
        for _ in range(20):
            events = poller.poll(0, 2000)
            self.assertEqual(events[0], (5000, 1))
            self.assertEqual(len(events), 1 + 8)

    def test_each_class_its_budget_in_order(self) -> None:
        world, _main, poller = _poller({ARRIVING: 2, BULK: 3})
        for fd in range(1, 11):
            poller.register(fd, 1)
            poller.classify(fd, ARRIVING if fd <= 5 else BULK)
        world.ready.update(range(1, 11))
        events = [fd for fd, _ in poller.poll(0, 100)]
        self.assertEqual(events, [1, 2, 6, 7, 8])

    def test_round_robin_loses_no_socket(self) -> None:
        """Over enough turns every ready bulk socket is handed out, each equally often."""
        world, _main, poller = _poller({BULK: 30})
        for fd in range(300):
            poller.register(fd, 1)
            poller.classify(fd, BULK)
        world.ready.update(range(300))
        seen: dict[int, int] = {}
        for _ in range(20):
            for fd, _event in poller.poll(0, 300):
                seen[fd] = seen.get(fd, 0) + 1
        self.assertEqual(seen, {fd: 2 for fd in range(300)})

    def test_nested_descriptors_never_returned(self) -> None:
        world, main, poller = _poller({ARRIVING: 4, BULK: 4})
        poller.register(3, 1)
        poller.classify(3, BULK)
        world.ready.add(3)
        self.assertEqual(poller.poll(0, 10), [(3, 1)])
        world.ready.clear()
        self.assertEqual(poller.poll(0, 10), [])
        self.assertEqual(len(main.fds), 2)  # the two nested epolls

    def test_moves_with_its_events(self) -> None:
        """A socket moved to a class keeps its event mask; modify and unregister follow it."""
        world, main, poller = _poller({BULK: 4})
        bulk = world.epolls[max(world.epolls)]
        poller.register(7, 5)
        self.assertEqual(poller.class_of(7), INTERACTIVE)
        self.assertTrue(poller.classify(7, BULK))
        self.assertEqual(poller.class_of(7), BULK)
        self.assertNotIn(7, main.fds)
        self.assertEqual(bulk.fds[7], 5)
        poller.modify(7, 1)
        self.assertEqual(bulk.fds[7], 1)
        self.assertTrue(poller.classify(7, INTERACTIVE))
        self.assertEqual(main.fds[7], 1)
        self.assertNotIn(7, bulk.fds)
        poller.classify(7, BULK)
        poller.unregister(7)
        self.assertNotIn(7, bulk.fds)
        self.assertIsNone(poller.class_of(7))

    def test_a_new_registration_is_interactive(self) -> None:
        """The class goes with the registration: a descriptor number reused starts over."""
        world, main, poller = _poller({BULK: 4})
        poller.register(7, 1)
        poller.classify(7, BULK)
        poller.unregister(7)
        poller.register(7, 1)
        self.assertEqual(poller.class_of(7), INTERACTIVE)
        self.assertIn(7, main.fds)

    def test_unknown_descriptors_left_alone(self) -> None:
        world, main, poller = _poller({BULK: 4})
        main.register(8, 1)  # before the poller was installed
        self.assertFalse(poller.classify(8, BULK))
        self.assertFalse(poller.classify(9, BULK))
        poller.modify(8, 4)
        self.assertEqual(main.fds[8], 4)
        poller.unregister(8)
        self.assertNotIn(8, main.fds)

    def test_unknown_class_is_interactive(self) -> None:
        world, main, poller = _poller({BULK: 4})
        poller.register(7, 1)
        poller.classify(7, BULK)
        self.assertTrue(poller.classify(7, "no such class"))
        self.assertEqual(poller.class_of(7), INTERACTIVE)
        self.assertIn(7, main.fds)

    def test_closed_behind_its_back(self) -> None:
        """A descriptor epoll forgot (closed unregistered) is dropped, not moved."""
        world, main, poller = _poller({BULK: 4})
        poller.register(7, 1)
        del main.fds[7]
        self.assertFalse(poller.classify(7, BULK))
        self.assertIsNone(poller.class_of(7))

    def test_release_puts_everything_back(self) -> None:
        world, main, poller = _poller({ARRIVING: 4, BULK: 4})
        nested = [world.epolls[fd] for fd in main.fds]
        for fd, name in ((1, ARRIVING), (2, BULK), (3, INTERACTIVE)):
            poller.register(fd, fd)
            poller.classify(fd, name)
        self.assertIs(poller.release(), main)
        self.assertEqual(main.fds, {1: 1, 2: 2, 3: 3})
        self.assertTrue(all(epoll.closed for epoll in nested))
        self.assertFalse(main.closed)

    def test_close_closes_all(self) -> None:
        world, main, poller = _poller({BULK: 4})
        nested = [world.epolls[fd] for fd in main.fds]
        poller.close()
        self.assertTrue(main.closed)
        self.assertTrue(all(epoll.closed for epoll in nested))

    def test_budgets_checked(self) -> None:
        world = _World()
        main = world.new_epoll()
        self.assertRaises(ValueError, ClassedPoller, main, {BULK: 0}, world.new_epoll)
        self.assertRaises(ValueError, ClassedPoller, main, {INTERACTIVE: 4}, world.new_epoll)

    def test_default_budgets(self) -> None:
        self.assertEqual(list(BUDGETS), [ARRIVING, BULK])
        self.assertTrue(all(4 <= budget <= 64 for budget in BUDGETS.values()))


class ClassifyTests(SynchronousTestCase):
    def test_no_op_without_a_classed_poller(self) -> None:
        self.assertFalse(classify(StringTransport(), BULK))
        self.assertFalse(classify(object(), BULK))

    def test_through_the_transport(self) -> None:
        world, main, poller = _poller({BULK: 4})
        poller.register(7, 1)
        transport = _Transport(type("R", (), {"_poller": poller})(), 7)
        self.assertTrue(classify(transport, BULK))
        self.assertEqual(poller.class_of(7), BULK)
        transport.fd = -1  # closed
        self.assertFalse(classify(transport, INTERACTIVE))
        self.assertEqual(poller.class_of(7), BULK)


class _Transport:
    def __init__(self, reactor: Any, fd: int) -> None:
        self.reactor = reactor
        self.fd = fd

    def fileno(self) -> int:
        return self.fd


class ConnectionClassesTests(SynchronousTestCase):
    def test_no_op_on_other_reactors(self) -> None:
        memory = MemoryReactor()
        service = ConnectionClasses(memory)
        service.startService()
        self.assertIsNone(service.poller)
        self.assertFalse(hasattr(memory, "_poller"))
        service.stopService()

    def test_installed_on_an_epoll_reactor_while_running(self) -> None:
        if EPollReactor is None:  # pragma: no cover
            raise self.skipTest("no epoll")
        epoll = EPollReactor()
        self.addCleanup(epoll._poller.close)
        original = epoll._poller
        service = ConnectionClasses(epoll)
        service.startService()
        self.assertIsInstance(epoll._poller, ClassedPoller)
        self.assertIs(epoll._poller.wrapped, original)
        self.assertIs(service.poller, epoll._poller)
        service.stopService()
        self.assertIs(epoll._poller, original)
        self.assertIsNone(service.poller)

    def test_in_hammals_service_after_the_bound(self) -> None:
        """C{makeService} adds one, started after L{FairPolling} (so it wraps the bound)."""
        from hammal.tap import Options, makeService

        options = Options(environ={})
        options.parseOptions(["--port", "tcp:0", "--cache-dir", self.mktemp()])
        service = makeService(options, MemoryReactorClock())
        kinds = [type(child) for child in service]
        self.assertEqual(kinds.count(ConnectionClasses), 1)
        self.assertLess(kinds.index(FairPolling), kinds.index(ConnectionClasses))


class _Turns:
    """Wraps the reactor's epoll and counts its polls: one per reactor turn."""

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
    """A socket with a byte never read: readable every turn; logs its turns."""

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


class _Leaving(Protocol):
    """A server connection streaming a blob, as far as its class goes; logs its loss."""

    def __init__(self, turns: _Turns, log: list[int]) -> None:
        self._turns = turns
        self._log = log

    def connectionMade(self) -> None:
        classify(self.transport, BULK)

    def connectionLost(self, reason: Any = None) -> None:
        self._log.append(self._turns.count)


def _next_turn() -> defer.Deferred[None]:
    """Fires from a delayed call due at once: in the reactor's next turn."""
    done = defer.Deferred[None]()
    reactor.callLater(0, done.callback, None)
    return done


class RealTCPTests(TestCase):
    """
    Through the running epoll reactor, as C{makeService} sets it up (the
    bound, then the classes): hundreds of bulk sockets ready every turn or
    closing together, and a request over real TCP on another connection.
    """

    READY = 400
    BOUND = 64
    BUDGET = 8

    def setUp(self) -> Any:
        if not isinstance(reactor, EPollReactor or ()):  # pragma: no cover
            raise self.skipTest("not the epoll reactor")
        self.turns = _Turns(reactor._poller)
        reactor._poller = self.turns  # type: ignore[attr-defined]
        self.addCleanup(setattr, reactor, "_poller", self.turns.wrapped)
        fair = FairPolling(reactor, self.BOUND)
        fair.startService()
        self.addCleanup(fair.stopService)
        self.classes = ConnectionClasses(reactor, {ARRIVING: self.BUDGET, BULK: self.BUDGET})
        self.classes.startService()
        self.addCleanup(self.classes.stopService)
        self.poller = self.classes.poller
        if self.poller is None:  # pragma: no cover
            raise self.skipTest("not classed")
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

    def _ready_crowd(self) -> tuple[list[_AlwaysReady], list[int]]:
        reads: list[int] = []
        crowd = [_AlwaysReady(self.turns, reads) for _ in range(self.READY)]
        for ready in crowd:
            self.addCleanup(ready.close)
            self.addCleanup(reactor.removeReader, ready)
            reactor.addReader(ready)
            self.assertTrue(self.poller.classify(ready.fileno(), BULK))
        return crowd, reads

    @defer.inlineCallbacks
    def test_request_answered_in_a_few_turns_however_many_are_ready(self) -> Any:
        """
        Write the ping, read it, write the pong, read it: a turn each,
        whatever the 400 bulk sockets ready every turn.
        """
        crowd, reads = self._ready_crowd()
        yield _next_turn()
        sent_at = self.turns.count
        self.ping.transport.write(b"ping")  # type: ignore[union-attr]
        answered_at = yield self.ping.answered
        self.assertLessEqual(answered_at - sent_at, 6)
        per_turn: dict[int, int] = {}
        for turn in reads:
            per_turn[turn] = per_turn.get(turn, 0) + 1
        self.assertLessEqual(max(per_turn.values()), self.BUDGET)

    @defer.inlineCallbacks
    def test_bulk_not_starved(self) -> Any:
        """Every ready bulk socket is served, round-robin, a budget per turn."""
        crowd, reads = self._ready_crowd()
        start = self.turns.count
        while self.turns.count < start + 3 * self.READY // self.BUDGET:
            yield _next_turn()
        self.assertGreaterEqual(min(ready.reads for ready in crowd), 2)

    @defer.inlineCallbacks
    def test_closes_wait_behind_the_request(self) -> Any:
        """
        300 streaming connections closed by their clients at once: a
        request on another connection is answered in a few turns, every
        close is seen, a budget per turn.
        """
        lost: list[int] = []
        made: list[_Leaving] = []

        def build() -> _Leaving:
            made.append(_Leaving(self.turns, lost))
            return made[-1]

        port = reactor.listenTCP(0, Factory.forProtocol(build), backlog=512, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        clients = []
        for _ in range(300):
            client = socket.socket()
            self.addCleanup(client.close)
            client.setblocking(False)
            client.connect_ex(("127.0.0.1", port.getHost().port))
            clients.append(client)
        while len(made) < len(clients):
            yield _next_turn()
        for client in clients:
            client.close()
        yield _next_turn()
        sent_at = self.turns.count
        self.ping.transport.write(b"ping")  # type: ignore[union-attr]
        answered_at = yield self.ping.answered
        self.assertLessEqual(answered_at - sent_at, 6)
        self.assertLess(len(lost), len(clients))  # the request did not wait for them all
        while len(lost) < len(clients):
            yield _next_turn()
        per_turn: dict[int, int] = {}
        for turn in lost:
            per_turn[turn] = per_turn.get(turn, 0) + 1
        self.assertLessEqual(max(per_turn.values()), self.BUDGET)


class _Body:
    """A blob body whose delivery the test ends."""

    def __init__(self) -> None:
        self.delivering = defer.Deferred[Any]()
        self._done = defer.Deferred[int]()

    def deliver(self, consumer: Any) -> defer.Deferred[int]:
        self.delivering.callback(consumer)
        return self._done

    def finish(self, consumer: Any) -> None:
        consumer.write(b"12345")
        self._done.callback(5)

    def stop(self) -> None:
        pass


class _Registry(Resource):
    """A manifest (a document) and a blob (a stream), noting their connection's class."""

    isLeaf = True

    def __init__(self, poller: ClassedPoller) -> None:
        super().__init__()
        self.poller = poller
        self.classes: list[str | None] = []
        self.body = _Body()

    def render_GET(self, request: Any) -> Any:
        self.classes.append(self.poller.class_of(request.channel.transport.fileno()))
        if request.path.endswith(b"/blob"):
            reply = BlobReply(200, [], 5, self.body)
            defer.ensureDeferred(write_stream(request, reply))
        else:
            write_document(request, Document(200, [(b"content-type", [b"x/json"])], b"{}"))
        return NOT_DONE_YET


class HammalConnectionsTests(TestCase):
    """hammal's site puts its connections in classes, over real TCP."""

    def setUp(self) -> Any:
        if not isinstance(reactor, EPollReactor or ()):  # pragma: no cover
            raise self.skipTest("not the epoll reactor")
        classes = ConnectionClasses(reactor)
        classes.startService()
        self.addCleanup(classes.stopService)
        if classes.poller is None:  # pragma: no cover
            raise self.skipTest("not classed")
        self.poller = classes.poller
        self.resource = _Registry(self.poller)
        port = reactor.listenTCP(0, self.factory(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
        self.addCleanup(self.client.close)
        self.client.setblocking(False)
        return self.connected()

    def factory(self) -> Any:
        """What C{makeService} listens with, without TLS."""
        return ConnectionLimit(HammalSite(self.resource, reactor), 100)

    def connected(self) -> Any:
        return None

    def _get(self, path: str) -> None:
        self.client.send(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())

    @defer.inlineCallbacks
    def test_arriving_then_interactive(self) -> Any:
        """A new connection arrives; once answered, it is interactive."""
        for _ in range(2):
            self._get("/v2/x/manifests/1")
            yield _response(self.client, b"{}")
        self.assertEqual(self.resource.classes, [ARRIVING, INTERACTIVE])

    @defer.inlineCallbacks
    def test_bulk_while_streaming(self) -> Any:
        self._get("/v2/x/manifests/1")
        yield _response(self.client, b"{}")
        self._get("/v2/x/blobs/blob")
        request = yield self.resource.body.delivering
        fd = request.channel.transport.fileno()
        self.assertEqual(self.poller.class_of(fd), BULK)
        self.resource.body.finish(request)
        yield _response(self.client, b"12345")
        self.assertEqual(self.poller.class_of(fd), INTERACTIVE)
        self._get("/v2/x/manifests/1")
        yield _response(self.client, b"{}")
        self.assertEqual(self.resource.classes, [ARRIVING, INTERACTIVE, INTERACTIVE])


@defer.inlineCallbacks
def _response(client: socket.socket, body: bytes) -> Any:
    """What C{client} receives up to the end of C{body}, read between reactor turns."""
    data = b""
    while not data.endswith(body):
        try:
            chunk = client.recv(65536)
        except (BlockingIOError, ssl.SSLWantReadError):
            yield _next_turn()
            continue
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    return data


class HammalTLSConnectionsTests(HammalConnectionsTests):
    """The same through TLS, as C{makeService} wraps the site with C{--tls}."""

    def factory(self) -> Any:
        directory = self.mktemp()
        os.makedirs(directory)
        pki = generate_pki(directory)
        tls = ReloadingServerTLS(pki.tls_chain, pki.tls_key)
        return TLSMemoryBIOFactory(tls, False, super().factory())

    @defer.inlineCallbacks
    def connected(self) -> Any:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        self.client = context.wrap_socket(self.client, do_handshake_on_connect=False)
        self.addCleanup(self.client.close)  # it took the socket over
        while True:
            try:
                self.client.do_handshake()
                return
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                yield _next_turn()
