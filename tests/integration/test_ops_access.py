"""``/metrics`` and ``/readyz`` obey ``--allow-ip``/``--deny-ip`` over real
TCP (issue 10); ``/healthz`` stays open to every prober."""

from __future__ import annotations

import os

from tests.integration.support import IntegrationTestCase
from tests.integration.test_access import fetch, launch_hammal


class OperationalPagesTests(IntegrationTestCase):
    def test_denied_address(self) -> None:
        hammal = launch_hammal(self, ["--deny-ip", "127.0.0.0/8"])
        for path in ("/metrics", "/readyz"):
            response = fetch(hammal.url + path)
            self.assertOCIError(response, 403, "DENIED")
            self.assertNotIn(b"hammal_", response.body)
        self.assertEqual(fetch(hammal.url + "/healthz").status, 200)

    def test_allowed_address(self) -> None:
        hammal = launch_hammal(self, ["--allow-ip", "127.0.0.0/8", "--deny-ua", "^curl/"])
        metrics = fetch(hammal.url + "/metrics", [("User-Agent", "curl/8.0")])
        self.assertEqual(metrics.status, 200, metrics.describe())
        self.assertIn(b"hammal_", metrics.body)
        ready = fetch(hammal.url + "/readyz")
        self.assertEqual(ready.status, 200, ready.describe())
        # Polling /readyz leaves nothing in the cache directory.
        cache = hammal.owned_cache_dir or ""
        before = sorted(os.listdir(cache))
        for _ in range(5):
            fetch(hammal.url + "/readyz")
        self.assertEqual(sorted(os.listdir(cache)), before)
