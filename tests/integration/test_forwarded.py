"""hammal behind a TLS-terminating proxy: X-Forwarded-* (or Forwarded, with
``--forwarded-header forwarded``) from a ``--trusted-proxy`` decide the
scheme and host of challenges and the front page, and the access log shows
the forwarded client (real TCP, real hammal)."""

from __future__ import annotations

import time

from tests.integration.environment import HammalProcess
from tests.integration.support import IntegrationTestCase
from tests.integration.test_access import launch_hammal

PUBLIC = [
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "registry.example.com"),
    ("X-Forwarded-For", "203.0.113.9"),
]
FORWARDED = 'for="[2001:db8::5]:4711";proto=https;host=r2.example:8443'


class TrustedProxyTests(IntegrationTestCase):
    def _hammal(self, *extra: str) -> HammalProcess:
        return launch_hammal(
            self,
            [
                "--auth",
                "token",
                "--auth-user",
                "ops",
                "--auth-password",
                "ops-secret-1",
                *extra,
            ],
        )

    def _realm(self, hammal: HammalProcess, headers: list[tuple[str, str]]) -> str:
        response = hammal.request("GET", "/v2/library/alpine/manifests/3.20", headers)
        self.assertEqual(response.status, 401, response.describe())
        return response.header("WWW-Authenticate") or ""

    def test_trusted_proxy_decides_scheme_host_and_client(self) -> None:
        hammal = self._hammal("--trusted-proxy", "127.0.0.1/32")
        challenge = self._realm(hammal, PUBLIC)
        self.assertIn('realm="https://registry.example.com/v2/auth"', challenge)
        page = hammal.request("GET", "/", PUBLIC).body.decode()
        self.assertIn("https://registry.example.com", page)
        self.assertNotIn(hammal.host, page)
        # A Forwarded header the proxy passed through from its client: not read.
        ignored = self._realm(hammal, [("Forwarded", FORWARDED)])
        self.assertIn(f'realm="http://{hammal.host}/v2/auth"', ignored)
        self._wait_for_log(hammal, '203.0.113.9 "GET /v2/library')
        self.assertIn('203.0.113.9 "GET /v2/library/alpine/manifests/3.20" 401', hammal.log_text())
        self.assertNotIn("2001:db8::5", hammal.log_text())

    def test_forwarded_header_when_named(self) -> None:
        """--forwarded-header forwarded: RFC 7239 decides, X-Forwarded-* are ignored."""
        hammal = self._hammal("--trusted-proxy", "127.0.0.1/32", "--forwarded-header", "forwarded")
        challenge = self._realm(hammal, [("Forwarded", FORWARDED), *PUBLIC])
        self.assertIn('realm="https://r2.example:8443/v2/auth"', challenge)
        self._wait_for_log(hammal, '2001:db8::5 "GET /v2/library')
        self.assertIn('2001:db8::5 "GET /v2/library/alpine/manifests/3.20" 401', hammal.log_text())
        self.assertIn(f'realm="http://{hammal.host}/v2/auth"', self._realm(hammal, PUBLIC))
        self.assertNotIn("203.0.113.9", hammal.log_text())

    def _wait_for_log(self, hammal: HammalProcess, text: str) -> None:
        deadline = time.monotonic() + 5
        while text not in hammal.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)

    def test_untrusted_peer_cannot_change_them(self) -> None:
        hammal = self._hammal("--trusted-proxy", "10.0.0.0/8")
        challenge = self._realm(hammal, PUBLIC)
        self.assertIn(f'realm="http://{hammal.host}/v2/auth"', challenge)
        self.assertNotIn("registry.example.com", hammal.request("GET", "/", PUBLIC).body.decode())
        self.assertNotIn('203.0.113.9 "GET', hammal.log_text())
