"""
The HAProxy harness: a real C{haproxy} spreading requests round-robin over
two trivial Twisted backends, and taking a dead one out.
"""

from __future__ import annotations

import collections
import os
import subprocess
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from tests.cluster.harness import HAPROXY_BIN, HAProxy, haproxy_config, require_binaries
from tests.integration.environment import REPO_ROOT


class _Named(Resource):
    isLeaf = True

    def __init__(self, name: bytes) -> None:
        super().__init__()
        self.name = name

    def render_GET(self, request: Request) -> bytes:
        return self.name


class ConfigTests(SynchronousTestCase):
    def test_round_robin_over_backends(self) -> None:
        config = haproxy_config(8080, [("127.0.0.1", 1), ("127.0.0.1", 2)], timeout=300)
        self.assertIn("    bind 127.0.0.1:8080\n", config)
        self.assertIn("    balance roundrobin\n", config)
        self.assertIn("    server node1 127.0.0.1:1\n", config)
        self.assertIn("    server node2 127.0.0.1:2\n", config)
        self.assertIn("    timeout server 300s\n", config)
        self.assertIn("    option redispatch 1\n", config)
        self.assertNotIn("httpchk", config)

    def test_health_checks(self) -> None:
        config = haproxy_config(1, [("10.0.0.1", 5000)], health_path="/healthz")
        self.assertIn("    option httpchk GET /healthz\n", config)
        self.assertIn("    server node1 10.0.0.1:5000 check inter 1s fall 2 rise 1\n", config)


class ShippedConfigTests(SynchronousTestCase):
    def test_deploy_config_is_valid(self) -> None:
        """deploy/cluster/haproxy.cfg passes C{haproxy -c}."""
        require_binaries(HAPROXY_BIN)
        config = os.path.join(REPO_ROOT, "deploy", "cluster", "haproxy.cfg")
        check = subprocess.run(
            [HAPROXY_BIN, "-c", "-f", config], capture_output=True, text=True, timeout=30
        )
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr)
        self.assertIn("balance roundrobin", open(config).read())


class BalancingTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        require_binaries(HAPROXY_BIN)
        self.ports = []
        for name in (b"one", b"two"):
            port = reactor.listenTCP(0, Site(_Named(name)), interface="127.0.0.1")
            self.addCleanup(port.stopListening)
            self.ports.append(port)
        backends = [("127.0.0.1", p.getHost().port) for p in self.ports]
        self.haproxy = HAProxy(backends, timeout=30).start()
        self.addCleanup(self.haproxy.stop)
        self.haproxy.wait_ready()
        # New connection per request: balancing is per request anyway.
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = HTTPClient(Agent(reactor, pool=self.pool))

    @inlineCallbacks
    def names(self, count: int) -> Any:
        seen: collections.Counter[bytes] = collections.Counter()
        for _ in range(count):
            response = yield self.http.get(self.haproxy.url + "/")
            self.assertEqual(response.code, 200)
            seen[(yield response.content())] += 1
        return seen

    @inlineCallbacks
    def test_round_robin(self) -> Any:
        seen = yield self.names(10)
        self.assertEqual(seen, {b"one": 5, b"two": 5})

    @inlineCallbacks
    def test_round_robin_on_one_connection(self) -> Any:
        """Balancing is per request, not per connection (keep-alive)."""
        pool = HTTPConnectionPool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        http = HTTPClient(Agent(reactor, pool=pool))
        seen: collections.Counter[bytes] = collections.Counter()
        for _ in range(6):
            response = yield http.get(self.haproxy.url + "/")
            seen[(yield response.content())] += 1
        self.assertEqual(seen, {b"one": 3, b"two": 3})

    @inlineCallbacks
    def test_dead_backend_costs_no_request(self) -> Any:
        """A backend that refuses connections: requests go to the other."""
        yield self.ports[1].stopListening()
        seen = yield self.names(6)
        self.assertEqual(seen, {b"one": 6})
