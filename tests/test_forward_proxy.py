"""L{hammal.upstream.forward_proxy}: CONNECT tunnels and per-URL routing."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ProxyAgent
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from zope.interface import implementer

from hammal.upstream.client import make_http_client
from hammal.upstream.forward_proxy import ProxyingAgent, TunnelEndpoint, TunnelError
from hammal.upstream.proxy_rules import ProxyRules, parse_proxy_url


class _Resolver:
    """Resolves every name to 127.0.0.1 and remembers which were asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def resolveHostName(
        self, receiver: Any, hostName: str, portNumber: int = 0, *args: Any, **kwargs: Any
    ) -> Any:
        from twisted.internet.address import IPv4Address as Address

        self.asked.append(hostName)
        receiver.resolutionBegan(None)
        receiver.addressResolved(Address("TCP", "127.0.0.1", portNumber))
        receiver.resolutionComplete()
        return receiver


def _reactor() -> tuple[MemoryReactorClock, _Resolver]:
    reactor = MemoryReactorClock()
    resolver = _Resolver()
    reactor.installNameResolver(resolver)  # type: ignore[arg-type]
    return reactor, resolver


class _Endpoint:
    """Connects the factory's protocol to a StringTransport on demand."""

    def __init__(self) -> None:
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 3128))
        self.protocol: Any = None
        self.pending: defer.Deferred[Any] = defer.Deferred()

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        self.protocol = factory.buildProtocol(None)
        return self.pending

    def established(self) -> None:
        self.protocol.makeConnection(self.transport)
        self.pending.callback(self.protocol)


class _Inner(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.lost = reason


class _InnerFactory:
    def __init__(self) -> None:
        self.built: list[_Inner] = []

    def buildProtocol(self, addr: Any) -> _Inner:
        protocol = _Inner()
        self.built.append(protocol)
        return protocol


class TunnelEndpointTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.proxy_endpoint = _Endpoint()
        self.proxy = parse_proxy_url("http://bob:hunter2@proxy.corp:3128", "test")
        self.endpoint = TunnelEndpoint(
            self.proxy_endpoint, self.proxy, "registry.example", 443, self.clock, 5.0
        )
        self.factory = _InnerFactory()
        self.d = self.endpoint.connect(self.factory)  # type: ignore[arg-type]
        self.proxy_endpoint.established()

    def test_sends_connect_with_credentials(self) -> None:
        self.assertEqual(
            self.proxy_endpoint.transport.value(),
            b"CONNECT registry.example:443 HTTP/1.1\r\nHost: registry.example:443\r\n"
            b"Proxy-Authorization: Basic Ym9iOmh1bnRlcjI=\r\n\r\n",
        )
        self.assertNoResult(self.d)

    def test_200_hands_the_connection_over(self) -> None:
        self.proxy_endpoint.transport.clear()
        protocol = self.proxy_endpoint.protocol
        protocol.dataReceived(b"HTTP/1.0 200 Connection established\r\nProxy-agent: x\r\n")
        self.assertNoResult(self.d)
        protocol.dataReceived(b"\r\n\x16\x03first bytes")
        inner = self.successResultOf(self.d)
        self.assertIs(inner, self.factory.built[0])
        self.assertEqual(inner.received, b"\x16\x03first bytes")
        protocol.dataReceived(b" more")
        self.assertEqual(inner.received, b"\x16\x03first bytes more")
        self.assertIs(inner.transport, self.proxy_endpoint.transport)
        self.clock.advance(60)  # the CONNECT timer was cancelled
        self.assertFalse(self.proxy_endpoint.transport.disconnecting)
        protocol.connectionLost(Failure(Exception("gone")))
        self.assertIsNotNone(inner.lost)

    def test_refusal_is_a_connect_error_without_secrets(self) -> None:
        self.proxy_endpoint.protocol.dataReceived(
            b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n\r\n"
        )
        failure = self.failureResultOf(self.d, TunnelError)
        self.assertIn("407 Proxy Authentication Required", str(failure.value))
        self.assertNotIn("hunter2", str(failure.value))
        self.assertNotIn("bob", str(failure.value))
        self.assertEqual(self.factory.built, [])

    def test_silent_proxy_times_out(self) -> None:
        self.clock.advance(4.9)
        self.assertNoResult(self.d)
        self.clock.advance(0.2)
        failure = self.failureResultOf(self.d, TunnelError)
        self.assertIn("did not answer CONNECT within 5s", str(failure.value))

    def test_closed_before_answer(self) -> None:
        self.proxy_endpoint.protocol.connectionLost(Failure(Exception("reset")))
        self.failureResultOf(self.d, TunnelError)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_oversized_answer(self) -> None:
        self.proxy_endpoint.protocol.dataReceived(b"HTTP/1.1 200 OK\r\n" + b"x" * 20000)
        self.failureResultOf(self.d, TunnelError)

    def test_cancel_aborts(self) -> None:
        self.d.cancel()
        self.failureResultOf(self.d, defer.CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class TunnelWithoutCredentialsTests(SynchronousTestCase):
    def test_no_authorization_header(self) -> None:
        endpoint = _Endpoint()
        tunnel = TunnelEndpoint(
            endpoint, parse_proxy_url("proxy:3128", "t"), "::1", 5000, Clock(), 5.0
        )
        tunnel.connect(_InnerFactory())  # type: ignore[arg-type]
        endpoint.established()
        self.assertEqual(
            endpoint.transport.value(), b"CONNECT [::1]:5000 HTTP/1.1\r\nHost: [::1]:5000\r\n\r\n"
        )


@implementer(IAgent)
class _RecordingAgent:
    def __init__(self) -> None:
        self.seen: list[tuple[bytes, Headers | None]] = []

    def request(
        self, method: bytes, uri: bytes, headers: Headers | None = None, bodyProducer: Any = None
    ) -> Any:
        self.seen.append((uri, headers))
        return defer.Deferred()


class ProxyingAgentTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor, self.resolver = _reactor()
        self.direct = _RecordingAgent()
        rules = ProxyRules.from_environment(
            {
                "HTTPS_PROXY": "http://u:pw@10.9.9.1:3128",
                "HTTP_PROXY": "http://u:pw@10.9.9.2:8080",
                "NO_PROXY": "internal.example,10.0.0.0/8",
            }
        )
        from twisted.web.client import HTTPConnectionPool

        self.agent = ProxyingAgent(
            self.reactor, rules, self.direct, lambda: HTTPConnectionPool(self.reactor), 3.0
        )

    def test_exempt_hosts_go_direct(self) -> None:
        self.agent.request(b"GET", b"https://r.internal.example/v2/")
        self.agent.request(b"GET", b"http://10.1.2.3:5000/v2/")
        self.assertEqual(
            [uri for uri, _ in self.direct.seen],
            [b"https://r.internal.example/v2/", b"http://10.1.2.3:5000/v2/"],
        )
        self.assertEqual(self.reactor.tcpClients, [])

    def test_https_connects_to_the_proxy(self) -> None:
        self.agent.request(b"GET", b"https://registry-1.docker.io/v2/")
        self.assertEqual(self.direct.seen, [])
        self.assertEqual(self.reactor.tcpClients[0][1], 3128)
        self.assertEqual(self.resolver.asked, ["10.9.9.1"])
        self.assertEqual(self.reactor.tcpClients[0][3], 3.0)

    def test_http_uses_absolute_form_with_credentials(self) -> None:
        accept = Headers({b"accept": [b"application/a", b"application/b"]})
        self.agent.request(b"GET", b"http://cdn.example/blob?sig=1", accept)
        self.assertEqual(self.reactor.tcpClients[0][1], 8080)
        self.assertEqual(self.resolver.asked, ["10.9.9.2"])
        _, _, factory, _, _ = self.reactor.tcpClients[0]
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        sent = transport.value()
        self.assertTrue(sent.startswith(b"GET http://cdn.example/blob?sig=1 HTTP/1.1\r\n"), sent)
        self.assertIn(b"Proxy-Authorization: Basic dTpwdw==", sent)
        self.assertIn(b"Host: cdn.example", sent)
        # Proxies keep one line of each name: repeated headers are folded.
        self.assertIn(b"\r\nAccept: application/a, application/b\r\n", sent)

    def _answer(self, response: bytes) -> Any:
        d = self.agent.request(b"GET", b"http://cdn.example/blob")
        _, _, factory, _, _ = self.reactor.tcpClients[0]
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(response)
        return d

    def test_407_from_the_proxy_is_a_connection_failure(self) -> None:
        d = self._answer(
            b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n"
            b"Content-Length: 5\r\n\r\ndenied"
        )
        failure = self.failureResultOf(d, TunnelError)
        self.assertIn("407", str(failure.value))
        self.assertNotIn("pw", str(failure.value).replace("://", ""))

    def test_other_answers_pass(self) -> None:
        d = self._answer(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.successResultOf(d).code, 404)

    def test_agents_are_reused(self) -> None:
        self.assertIs(
            self.agent._agent("http", self.agent._rules.http),
            self.agent._agent("http", self.agent._rules.http),
        )  # type: ignore[arg-type]
        self.assertIsInstance(self.agent._agent("http", self.agent._rules.http)._agent, ProxyAgent)  # type: ignore[arg-type,attr-defined]


class MakeHttpClientTests(SynchronousTestCase):
    def test_no_proxy_configured_connects_direct(self) -> None:
        reactor, resolver = _reactor()
        client = make_http_client(reactor, 2.0, proxies=ProxyRules())
        client.get("https://registry.example/v2/")
        self.assertEqual(reactor.tcpClients[0][1], 443)
        self.assertEqual(resolver.asked, ["registry.example"])

    def test_proxy_configured(self) -> None:
        reactor, resolver = _reactor()
        client = make_http_client(
            reactor, 2.0, proxies=ProxyRules.from_environment({"https_proxy": "10.9.9.3:3128"})
        )
        client.get("https://registry.example/v2/")
        self.assertEqual(reactor.tcpClients[0][1], 3128)
        self.assertEqual(resolver.asked, ["10.9.9.3"])
