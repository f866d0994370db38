"""
A bound on the sockets the epoll reactor handles in one turn.

Twisted's L{EPollReactor} asks C{epoll_wait} for as many events as it has
sockets and handles every one it gets before the next turn: when thousands
of slow readers become writable together (they arrived together and read at
the same rate), or close together, one turn handles all of them, a second
or more on a loaded machine, and every delayed call (the per-turn queues of
L{hammal.turns}, timeouts) and every reply waits for it to end.

Linux's level-triggered epoll hands out at most C{maxevents} ready sockets
per C{epoll_wait} and puts those it handed out at the tail of its ready
list (the others stay at its head): a small C{maxevents} serves the ready
sockets round-robin over the next turns and loses none, and the reactor
runs its delayed calls between every batch. L{FairPolling} gives the
installed epoll reactor's poller such a bound while hammal runs; any other
reactor (poll, select, a test's L{MemoryReactor}) is left as it is.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service

#: Ready sockets handled per reactor turn. A cache reader's send or a
#: request's parsing costs up to a millisecond on a loaded machine, so 128
#: bound a turn to roughly 0.1 s at worst and usually a few milliseconds.
EVENTS_PER_TURN = 128


class BoundedPoller:
    """
    An epoll object whose C{poll} returns at most C{events_per_turn} events;
    registering, modifying and closing go to the wrapped one.
    """

    def __init__(self, poller: Any, events_per_turn: int = EVENTS_PER_TURN) -> None:
        if events_per_turn < 1:
            raise ValueError(f"events_per_turn must be at least 1, not {events_per_turn}")
        self.wrapped = poller
        self.events_per_turn = events_per_turn

    def poll(self, timeout: float = -1, maxevents: int = -1) -> list[tuple[int, int]]:
        """C{epoll.poll}, asking for at most C{events_per_turn} events."""
        bound = self.events_per_turn
        if 0 < maxevents < bound:
            bound = maxevents
        events: list[tuple[int, int]] = self.wrapped.poll(timeout, bound)
        return events

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)


def _epoll_reactor(reactor: Any) -> bool:
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # no epoll on this platform
        return False
    return isinstance(reactor, EPollReactor)


class FairPolling(Service):
    """
    While running, the epoll C{reactor} handles at most C{events_per_turn}
    ready sockets per turn; a no-op on any other reactor.
    """

    def __init__(self, reactor: Any, events_per_turn: int = EVENTS_PER_TURN) -> None:
        self._reactor = reactor
        self._events_per_turn = events_per_turn
        self._bounded: BoundedPoller | None = None

    @property
    def bounded(self) -> bool:
        """Whether the reactor's poller is bounded by this service now."""
        return self._bounded is not None

    def startService(self) -> None:
        super().startService()
        if not _epoll_reactor(self._reactor) or self._bounded is not None:
            return
        self._bounded = BoundedPoller(self._reactor._poller, self._events_per_turn)
        self._reactor._poller = self._bounded

    def stopService(self) -> None:
        super().stopService()
        if self._bounded is None:
            return
        if self._reactor._poller is self._bounded:
            self._reactor._poller = self._bounded.wrapped
        self._bounded = None
