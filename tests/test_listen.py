"""L{hammal.listen}: a bare port listens on IPv6 and IPv4."""

from __future__ import annotations

import errno
import socket
from typing import Any

from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from hammal.listen import DualStackEndpoint, dual_stack_endpoint
from hammal.tap import with_backlog


class DescriptionTests(SynchronousTestCase):
    def test_all_interfaces_only(self) -> None:
        endpoint = dual_stack_endpoint(MemoryReactor(), with_backlog("tcp:5000"))
        self.assertIsInstance(endpoint, DualStackEndpoint)
        self.assertEqual((endpoint._port, endpoint._backlog), (5000, 1024))  # type: ignore[union-attr]
        for description in (
            "tcp:5000:interface=127.0.0.1",
            r"tcp6:5000:interface=\:\:",
            "unix:/x",
            "ssl:443",
        ):
            self.assertIsNone(dual_stack_endpoint(MemoryReactor(), description))


class EndpointTests(SynchronousTestCase):
    def test_adopts_an_ipv6_socket_accepting_ipv4(self) -> None:
        reactor = MemoryReactor()
        factory = Site(Resource())
        self.successResultOf(DualStackEndpoint(reactor, 0, 7).listen(factory))
        ((fd, family, adopted),) = reactor.adoptedPorts
        self.assertEqual(family, socket.AF_INET6)
        self.assertIs(adopted, factory)

    def test_without_ipv6_listens_on_ipv4(self) -> None:
        import hammal.listen

        def no_ipv6() -> socket.socket:
            raise OSError(97, "Address family not supported by protocol")

        self.patch(hammal.listen, "_dual_stack_socket", no_ipv6)
        reactor = MemoryReactor()
        self.successResultOf(DualStackEndpoint(reactor, 5000, 7).listen(Site(Resource())))
        self.assertEqual(reactor.tcpServers[0][0], 5000)
        self.assertEqual(reactor.tcpServers[0][2], 7)
        self.assertEqual(reactor.adoptedPorts, [])


class AccessLogAddressTests(SynchronousTestCase):
    def test_ipv4_mapped_clients_are_logged_as_ipv4(self) -> None:
        from twisted.internet.address import IPv6Address

        from hammal.web.site import _client_address

        class _Request:
            forwarded = None

            def __init__(self, host: str) -> None:
                self._host = host

            def getClientAddress(self) -> IPv6Address:
                return IPv6Address("TCP", self._host, 1234)

        self.assertEqual(_client_address(_Request("::ffff:192.0.2.4")), "192.0.2.4")  # type: ignore[arg-type]
        self.assertEqual(_client_address(_Request("2001:db8::1")), "2001:db8::1")  # type: ignore[arg-type]


class BindFailureTests(SynchronousTestCase):
    def _endpoint_failing_with(self, number: int) -> tuple[MemoryReactor, Any]:
        import hammal.listen

        class _Socket:
            def bind(self, address: Any) -> None:
                raise OSError(number, "bind failed")

            def close(self) -> None:
                pass

        self.patch(hammal.listen, "_dual_stack_socket", _Socket)
        reactor = MemoryReactor()
        return reactor, DualStackEndpoint(reactor, 5000, 7).listen(Site(Resource()))

    def test_port_in_use_is_an_error(self) -> None:
        from twisted.internet.error import CannotListenError

        reactor, d = self._endpoint_failing_with(errno.EADDRINUSE)
        self.failureResultOf(d, CannotListenError)
        self.assertEqual(reactor.tcpServers, [])

    def test_unusable_ipv6_falls_back_to_ipv4(self) -> None:
        reactor, d = self._endpoint_failing_with(errno.EADDRNOTAVAIL)
        self.successResultOf(d)
        self.assertEqual(reactor.tcpServers[0][0], 5000)
