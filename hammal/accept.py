"""
Listening ports that accept a bounded number of connections per reactor turn.

Twisted's L{tcp.Port} accepts up to C{numberAccepts} connections each time
its socket is readable, and grows that number by 20 every time it took all
it was allowed: a crowd of thousands of clients arriving at once is
accepted in batches of hundreds. Every connection accepted in one turn has
its request parsed, routed and answered in the next, so a request already
in progress on another connection (a manifest GET on a keep-alive
connection) waits behind all of them: seconds, with 3,000 arrivals.

L{FairPort} accepts at most L{ACCEPTS_PER_TURN} per turn, whatever came
before; the rest wait in the kernel's listen backlog for the next turns,
interleaved with the requests of connections already open.
L{FairListening} builds such ports where the reactor would build
Twisted's own (L{IReactorTCP.listenTCP}, L{IReactorSocket.adoptStreamPort}),
so the dual-stack port, plain C{tcp:} endpoints and the sockets adopted by
C{--workers} all get them.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import tcp
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.internet.posixbase import PosixReactorBase

#: Connections a listening port accepts per reactor turn. Each costs up to
#: a millisecond of request handling in the next turn (a cache hit: parse,
#: route, check access, open the blob), and a request on a keep-alive
#: connection waits for the turn to end. Measured with bench's crowd row
#: (3,000 arriving, quick runs on a shared 2-core machine): 4 gave a manifest
#: p99 of 1.0-1.4 s, 8 of 1.9-2.1 s, 2 of 1.2-2.6 s, and 1 accepted too
#: slowly (a third of the crowd unanswered after 10 s).
ACCEPTS_PER_TURN = 4


class FairPort(tcp.Port):
    """
    A TCP listening port that accepts at most C{accepts_per_turn}
    connections each time the reactor finds it readable.
    """

    accepts_per_turn = ACCEPTS_PER_TURN

    def doRead(self) -> None:
        # tcp.Port.doRead grows numberAccepts after every full batch:
        # hold it at the bound instead.
        self.numberAccepts = self.accepts_per_turn
        super().doRead()


class FairListening:
    """
    A reactor whose TCP listening ports are L{FairPort}s; everything else
    is the wrapped reactor's.

    Only a reactor whose own ports are L{tcp.Port}s (Twisted's POSIX
    reactors: epoll, poll, select) gets L{FairPort}s; any other (a test's
    L{MemoryReactor}, a fake) is asked to listen as usual.
    """

    def __init__(self, reactor: Any, accepts_per_turn: int = ACCEPTS_PER_TURN) -> None:
        self._reactor = reactor
        self._accepts_per_turn = accepts_per_turn

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def _runs_sockets(self) -> bool:
        return isinstance(self._reactor, PosixReactorBase)

    def listenTCP(
        self, port: int, factory: IProtocolFactory, backlog: int = 50, interface: str = ""
    ) -> IListeningPort:
        """L{IReactorTCP.listenTCP}, with a L{FairPort}."""
        if not self._runs_sockets():
            listening: IListeningPort = self._reactor.listenTCP(port, factory, backlog, interface)
            return listening
        fair = FairPort(port, factory, backlog, interface, self._reactor)
        fair.accepts_per_turn = self._accepts_per_turn
        fair.startListening()
        return fair

    def adoptStreamPort(
        self, fileDescriptor: int, addressFamily: int, factory: IProtocolFactory
    ) -> IListeningPort:
        """L{IReactorSocket.adoptStreamPort}, with a L{FairPort} for TCP sockets."""
        if not self._runs_sockets() or addressFamily not in (socket.AF_INET, socket.AF_INET6):
            adopted: IListeningPort = self._reactor.adoptStreamPort(
                fileDescriptor, addressFamily, factory
            )
            return adopted
        fair = FairPort._fromListeningDescriptor(
            self._reactor, fileDescriptor, addressFamily, factory
        )
        fair.accepts_per_turn = self._accepts_per_turn
        fair.startListening()
        return fair
