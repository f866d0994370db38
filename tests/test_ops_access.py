"""
``/metrics`` and ``/readyz`` obey ``--allow-ip``/``--deny-ip``, and
``/readyz`` leaves the disk alone.
"""

from __future__ import annotations

import json
import os
from typing import Any

from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from hammal.access import AccessRules
from hammal.metrics import REGISTRY as METRICS
from hammal.stream import read_body
from hammal.web import health
from hammal.web.health import Readiness, ReadyResource, cache_dir_writable
from hammal.web.root import MetricsResource, address_guard, build_root


class _Site:
    def __init__(self, rules: AccessRules | None) -> None:
        root = build_root(
            Resource(),
            ReadyResource(Readiness()),
            MetricsResource(METRICS),
            guard=None if rules is None else address_guard(rules),
        )
        self.agent = RequestTraversalAgent(root)

    def get(self, path: str, headers: dict[bytes, list[bytes]] | None = None) -> tuple[int, Any]:
        d = self.agent.request(b"GET", f"http://mirror.test{path}".encode(), Headers(headers or {}))
        self.agent.flush()
        responses: list[Any] = []
        d.addBoth(responses.append)
        body = read_body(responses[0], 1 << 20)
        self.agent.flush()
        bodies: list[Any] = []
        body.addBoth(bodies.append)
        return responses[0].code, bodies[0]


class OperationalPagesTests(SynchronousTestCase):
    def test_denied_address(self) -> None:
        site = _Site(AccessRules(deny_ip=["127.0.0.0/8"]))
        for path in ("/metrics", "/readyz"):
            status, body = site.get(path)
            self.assertEqual(status, 403, path)
            self.assertEqual(json.loads(body)["errors"][0]["code"], "DENIED")
            self.assertNotIn(b"hammal_", body)
        self.assertEqual(site.get("/healthz")[0], 200)

    def test_allowed_addresses_only(self) -> None:
        site = _Site(AccessRules(allow_ip=["192.0.2.0/24"], trusted_proxies=["127.0.0.0/8"]))
        self.assertEqual(site.get("/metrics")[0], 403)
        inside = {b"x-forwarded-for": [b"192.0.2.9"]}
        self.assertEqual(site.get("/metrics", inside)[0], 200)
        self.assertEqual(site.get("/readyz", inside)[0], 200)
        outside = {b"x-forwarded-for": [b"198.51.100.1"]}
        self.assertEqual(site.get("/readyz", outside)[0], 403)

    def test_only_address_rules(self) -> None:
        """Pull rules (user agent, path) do not lock the probes out."""
        site = _Site(AccessRules(deny_ua=["curl"], allow_path=["^/v2/"]))
        self.assertEqual(site.get("/readyz", {b"user-agent": [b"curl/8"]})[0], 200)
        self.assertEqual(site.get("/metrics")[0], 200)

    def test_no_rules(self) -> None:
        self.assertEqual(_Site(None).get("/metrics")[0], 200)


class ReadinessDiskTests(SynchronousTestCase):
    def test_no_file_written(self) -> None:
        opened: list[Any] = []
        # The module's own name `open` shadows the builtin for its code.
        health.open = lambda *a, **k: opened.append(a)  # type: ignore[attr-defined]
        self.addCleanup(delattr, health, "open")
        directory = self.mktemp()
        os.makedirs(directory)
        check = cache_dir_writable(directory)
        for _ in range(3):
            self.assertIsNone(self.successResultOf(Deferred.fromCoroutine(check())))  # type: ignore[arg-type]
        self.assertEqual(opened, [])
        self.assertEqual(os.listdir(directory), [])

    def test_missing_directory(self) -> None:
        check = cache_dir_writable(os.path.join(self.mktemp(), "missing"))
        problem = self.successResultOf(Deferred.fromCoroutine(check()))  # type: ignore[arg-type]
        self.assertIn("not writable", problem)
