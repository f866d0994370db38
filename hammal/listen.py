"""
``--port 5000`` on every address family the machine has.

Twisted's ``tcp:5000`` listens on IPv4's ``0.0.0.0`` only, so IPv6 clients
(``localhost`` resolving to ``::1`` first, IPv6-only pods) cannot connect.
A port number or ``tcp:N`` without an interface therefore becomes one IPv6
socket on ``::`` with ``IPV6_V6ONLY`` off -- IPv4 clients arrive as
``::ffff:a.b.c.d`` -- adopted by the reactor (L{IReactorSocket.adoptStreamPort}).
Where the machine has no IPv6, it is plain ``tcp:N``. Any other endpoint
string (an interface, ``tcp6:``, ``unix:``, ``systemd:``) is used as given.
"""

from __future__ import annotations

import errno
import re
import socket
from typing import Any

from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from zope.interface import implementer

_ALL_INTERFACES = re.compile(r"tcp:(\d+)(?::backlog=(\d+))?\Z")


@implementer(IStreamServerEndpoint)
class DualStackEndpoint:
    """Listens on C{port} of every IPv6 and IPv4 address."""

    def __init__(self, reactor: Any, port: int, backlog: int = 50) -> None:
        self._reactor = reactor
        self._port = port
        self._backlog = backlog

    def listen(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IListeningPort]:
        return defer.execute(self._listen, protocolFactory)

    def _listen(self, factory: IProtocolFactory) -> IListeningPort:
        try:
            sock = _dual_stack_socket()
        except OSError:
            # No IPv6 here: IPv4 is all there is.
            port: IListeningPort = self._reactor.listenTCP(self._port, factory, self._backlog)
            return port
        try:
            sock.bind(("::", self._port))
            sock.listen(self._backlog)
            sock.setblocking(False)
            port = self._reactor.adoptStreamPort(sock.fileno(), socket.AF_INET6, factory)
        except OSError as failure:
            if failure.errno in (errno.EADDRINUSE, errno.EACCES):
                raise CannotListenError("::", self._port, failure)
            # IPv6 present but unusable (disabled addresses): IPv4 then.
            port = self._reactor.listenTCP(self._port, factory, self._backlog)
        finally:
            sock.close()  # the reactor holds its own descriptor
        return port


def _dual_stack_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    except OSError:
        sock.close()
        raise
    return sock


def dual_stack_endpoint(reactor: Any, description: str) -> DualStackEndpoint | None:
    """The endpoint for ``tcp:N[:backlog=B]`` (all interfaces), else L{None}."""
    match = _ALL_INTERFACES.match(description)
    if match is None:
        return None
    backlog = int(match.group(2)) if match.group(2) else 50
    return DualStackEndpoint(reactor, int(match.group(1)), backlog)
