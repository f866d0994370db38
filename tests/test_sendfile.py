"""
Tests for L{hammal.cache.sendfile.tcp_transport}: sendfile is used only on plain
TCP connections (the byte-moving itself runs in the integration tests,
over real sockets).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from twisted.internet import tcp
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.trial.unittest import SynchronousTestCase

from hammal.cache.sendfile import tcp_transport


def request_over(transport: Any) -> Any:
    return SimpleNamespace(channel=SimpleNamespace(transport=transport))


class TransportDetectionTests(SynchronousTestCase):
    def test_plain_tcp(self) -> None:
        connection = tcp.Connection.__new__(tcp.Server)
        self.assertIs(tcp_transport(request_over(connection)), connection)

    def test_through_protocol_wrappers(self) -> None:
        connection = tcp.Connection.__new__(tcp.Server)
        wrapper = ProtocolWrapper(WrappingFactory(Factory.forProtocol(Protocol)), Protocol())
        wrapper.transport = connection
        self.assertIs(tcp_transport(request_over(wrapper)), connection)

    def test_not_under_tls(self) -> None:
        connection = tcp.Connection.__new__(tcp.Server)
        tls = TLSMemoryBIOProtocol.__new__(TLSMemoryBIOProtocol)
        tls.transport = connection
        self.assertIsNone(tcp_transport(request_over(tls)))

    def test_not_for_test_doubles(self) -> None:
        self.assertIsNone(tcp_transport(request_over(StringTransport())))
        self.assertIsNone(tcp_transport(object()))  # type: ignore[arg-type]
