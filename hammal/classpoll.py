"""
Connections in classes, so that a request on a keep-alive connection is
read in the next reactor turn whatever thousands of other connections do.

Linux's epoll keeps one ready list, first in first out: a socket that
becomes ready joins its tail. With L{hammal.fairpoll}'s bound the epoll
reactor handles that list round-robin, a batch per turn, so a manifest
request arriving on an open connection waits for every socket that was
ready before it: the first requests of a crowd of clients arriving
together, then the writes and, when it leaves together, the closes of the
thousands streaming a blob (measured: 1,300 first requests ready in one
burst, ~0.4 ms each, and 3,000 closes; the request behind them waited
0.5-0.7 s).

L{ClassedPoller} keeps each class of connection in an epoll of its own,
whose descriptor sits in the reactor's epoll (readable while any of its
sockets is ready, so the reactor still sleeps and wakes as before):

- I{interactive} (the reactor's own epoll): everything not put in a class
  (listening ports, upstream connections, the waker) and the server
  connections that answered a request and wait for the next one. Every
  ready one is handled each turn (up to L{hammal.fairpoll}'s bound).
- L{ARRIVING}: server connections until their first response is done.
- L{BULK}: connections streaming a blob body.

Each turn handles every ready interactive socket, then at most its budget
of ready sockets from each class (Linux serves a class's ready sockets
round-robin over the turns, as it does the reactor's). No class starves:
each gets its budget in every turn in which it has ready sockets, and
nothing is lost: level-triggered readiness moves with a socket from one
epoll to another. A request on an interactive connection waits for at most
one turn of bounded size.

Connections are put in classes by the web layer (L{classify}: when a
connection is made, while a blob body is streamed, when a response is
done); on any reactor but Twisted's epoll reactor, and when
L{ConnectionClasses} is not running, that is a no-op.
"""

from __future__ import annotations

import select
from typing import Any, Callable, Mapping

from twisted.application.service import Service

#: The reactor's own epoll: every ready socket handled each turn.
INTERACTIVE = "interactive"
#: Server connections until their first response is done.
ARRIVING = "arriving"
#: Connections streaming a blob body.
BULK = "bulk"

#: Ready sockets of each class handled per reactor turn, after the
#: interactive ones, in this order. A first request costs 0.5-1 ms on a
#: loaded machine (parse, route, open the blob, headers), a streaming
#: socket's write or close 0.2-0.4 ms. A client sending one request after
#: another on a keep-alive connection gets one answer per turn, so turns
#: must stay well under its pace: measured with bench's crowd row (3,000
#: arriving, a manifest GET due every 10 ms), arriving 16 and bulk 16 or
#: 32 gave p99 17-440 ms (turns of 11-45 ms while the crowd arrived),
#: arriving 8 89 ms, arriving 4 (as many as a listening port accepts per
#: turn, L{hammal.accept}) 14-23 ms with bulk 8, 16 or 32.
BUDGETS: Mapping[str, int] = {ARRIVING: 4, BULK: 16}

_EPOLLIN = getattr(select, "EPOLLIN", 1)


def _fileno(fd: Any) -> int:
    return fd if isinstance(fd, int) else int(fd.fileno())


class _Class:
    __slots__ = ("name", "epoll", "budget")

    def __init__(self, name: str, epoll: Any, budget: int) -> None:
        self.name = name
        self.epoll = epoll
        self.budget = budget


class _Entry:
    """A descriptor registered through the poller: its event mask and class."""

    __slots__ = ("flags", "cls")

    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.cls: _Class | None = None


class ClassedPoller:
    """
    The reactor's epoll object (C{poller}), with one nested epoll per class
    of C{budgets}; C{new_epoll} makes them (C{select.epoll}, or a test's
    fake). Registering, modifying and unregistering go to the epoll of the
    descriptor's class; C{poll} returns the interactive events first, then
    up to each class's budget of its events.
    """

    def __init__(
        self,
        poller: Any,
        budgets: Mapping[str, int] = BUDGETS,
        new_epoll: Callable[[], Any] | None = None,
    ) -> None:
        for name, budget in budgets.items():
            if name == INTERACTIVE:
                raise ValueError(f"{INTERACTIVE!r} is the reactor's own epoll, not a class")
            if budget < 1:
                raise ValueError(f"the budget of {name!r} must be at least 1, not {budget}")
        make = new_epoll if new_epoll is not None else select.epoll
        self.wrapped = poller
        self._fds: dict[int, _Entry] = {}
        self._classes: dict[str, _Class] = {}
        self._nested: dict[int, _Class] = {}
        try:
            for name, budget in budgets.items():
                cls = _Class(name, make(), budget)
                self._classes[name] = cls
                nested = _fileno(cls.epoll)
                poller.register(nested, _EPOLLIN)
                self._nested[nested] = cls
        except BaseException:
            self._close_classes()
            raise

    # The epoll object's interface, as the reactor uses it.

    def register(self, fd: Any, eventmask: int = _EPOLLIN) -> None:
        """Register C{fd} in the interactive class."""
        fd = _fileno(fd)
        stale = self._fds.pop(fd, None)
        if stale is not None and stale.cls is not None:
            # closed without being unregistered: epoll forgot it already
            _forget(stale.cls.epoll, fd)
        self.wrapped.register(fd, eventmask)
        self._fds[fd] = _Entry(eventmask)

    def modify(self, fd: Any, eventmask: int) -> None:
        """Change C{fd}'s events, in the epoll of its class."""
        fd = _fileno(fd)
        entry = self._fds.get(fd)
        if entry is None or entry.cls is None:
            self.wrapped.modify(fd, eventmask)
        else:
            entry.cls.epoll.modify(fd, eventmask)
        if entry is not None:
            entry.flags = eventmask

    def unregister(self, fd: Any) -> None:
        """Unregister C{fd} from the epoll of its class; it leaves its class."""
        fd = _fileno(fd)
        entry = self._fds.pop(fd, None)
        if entry is None or entry.cls is None:
            self.wrapped.unregister(fd)
        else:
            entry.cls.epoll.unregister(fd)

    def poll(self, timeout: float = -1, maxevents: int = -1) -> list[tuple[int, int]]:
        """
        The ready interactive descriptors (as the wrapped poller returns
        them), then up to each class's budget of its ready ones.
        """
        events: list[tuple[int, int]] = self.wrapped.poll(timeout, maxevents)
        nested = self._nested
        ready: list[_Class] = []
        for fd, _event in events:
            cls = nested.get(fd)
            if cls is not None:
                ready.append(cls)
        if not ready:
            return events
        result = [event for event in events if event[0] not in nested]
        for cls in self._classes.values():
            if cls in ready:
                result.extend(cls.epoll.poll(0, cls.budget))
        return result

    def close(self) -> None:
        """Close the nested epolls and the wrapped one."""
        self._close_classes()
        self.wrapped.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)

    # Classes.

    def class_of(self, fd: int) -> str | None:
        """C{fd}'s class, or L{None} when it was not registered through this poller."""
        entry = self._fds.get(fd)
        if entry is None:
            return None
        return INTERACTIVE if entry.cls is None else entry.cls.name

    def classify(self, fd: int, name: str) -> bool:
        """
        Move C{fd} to class C{name} (L{INTERACTIVE}, or one of the budgets;
        any other name: L{INTERACTIVE}). Whether C{fd} is in that class now:
        a descriptor not registered through this poller is left alone.
        """
        entry = self._fds.get(fd)
        if entry is None:
            return False
        target = self._classes.get(name)
        if entry.cls is target:
            return True
        source = self.wrapped if entry.cls is None else entry.cls.epoll
        destination = self.wrapped if target is None else target.epoll
        try:
            source.unregister(fd)
        except OSError:
            # closed behind the reactor's back: nothing to move
            del self._fds[fd]
            return False
        try:
            destination.register(fd, entry.flags)
        except OSError:
            source.register(fd, entry.flags)
            return False
        entry.cls = target
        return True

    def release(self) -> Any:
        """
        Put every descriptor back in the wrapped poller, close the nested
        epolls and return the wrapped poller.
        """
        for fd, entry in list(self._fds.items()):
            if entry.cls is not None:
                self.classify(fd, INTERACTIVE)
        self._close_classes()
        return self.wrapped

    def _close_classes(self) -> None:
        for nested in list(self._nested):
            _forget(self.wrapped, nested)
        self._nested.clear()
        for cls in self._classes.values():
            cls.epoll.close()
        self._classes.clear()


def _forget(epoll: Any, fd: int) -> None:
    try:
        epoll.unregister(fd)
    except (OSError, KeyError, ValueError):
        pass


def _epoll_reactor(reactor: Any) -> bool:
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # no epoll on this platform
        return False
    return isinstance(reactor, EPollReactor)


class ConnectionClasses(Service):
    """
    While running, the epoll C{reactor}'s poller is a L{ClassedPoller}
    (around whatever poller it has, e.g. L{hammal.fairpoll}'s bound); a
    no-op on any other reactor.
    """

    def __init__(self, reactor: Any, budgets: Mapping[str, int] = BUDGETS) -> None:
        self._reactor = reactor
        self._budgets = budgets
        self._poller: ClassedPoller | None = None

    @property
    def poller(self) -> ClassedPoller | None:
        """The reactor's L{ClassedPoller} while this service runs it."""
        return self._poller

    def startService(self) -> None:
        super().startService()
        if not _epoll_reactor(self._reactor) or self._poller is not None:
            return
        self._poller = ClassedPoller(self._reactor._poller, self._budgets)
        self._reactor._poller = self._poller

    def stopService(self) -> None:
        super().stopService()
        poller, self._poller = self._poller, None
        if poller is None:
            return
        wrapped = poller.release()
        if self._reactor._poller is poller:
            self._reactor._poller = wrapped


def classify(transport: Any, name: str) -> bool:
    """
    Put the connection under C{transport} (a TCP transport, or a wrapper
    such as TLS that passes attributes through to one) in class C{name};
    whether it is in that class now. A no-op (L{False}) when its reactor
    runs no L{ClassedPoller}, or the connection is closed.
    """
    poller = getattr(getattr(transport, "reactor", None), "_poller", None)
    if not isinstance(poller, ClassedPoller):
        return False
    fileno = getattr(transport, "fileno", None)
    if fileno is None:
        return False
    fd = fileno()
    if not isinstance(fd, int) or fd < 0:
        return False
    return poller.classify(fd, name)
