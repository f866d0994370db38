"""hammal's errors: OCI JSON with the right status and code."""

from __future__ import annotations

import socket
import ssl
import time

from tests.integration.environment import (
    SilentServer,
    free_port,
    start_hammal,
)
from tests.integration.images import ALL_MANIFEST_TYPES
from tests.integration.support import IntegrationTestCase

ACCEPT = [("Accept", t) for t in ALL_MANIFEST_TYPES]


class ClientErrorTests(IntegrationTestCase):
    """Errors the client caused or the upstream reports."""

    def setUp(self) -> None:
        super().setUp()
        self.hammal = self.start_hammal()

    def test_unknown_tag(self) -> None:
        response = self.hammal.request("GET", "/v2/library/alpine/manifests/no-such-tag", ACCEPT)
        self.assertOCIError(response, 404, "MANIFEST_UNKNOWN")
        head = self.hammal.request("HEAD", "/v2/library/alpine/manifests/no-such-tag", ACCEPT)
        self.assertEqual(head.status, 404, head.describe())
        self.assertEqual(head.body, b"")

    def test_unknown_repository(self) -> None:
        response = self.hammal.request("GET", "/v2/nosuchrepo/manifests/1", ACCEPT)
        self.assertEqual(response.status, 404, response.describe())
        self.assertIn("errors", response.json())

    def test_bad_names(self) -> None:
        for name in ("UPPER", "library/bad!name", "a..b", "-leading", "x" * 300):
            for kind, ref in (("manifests", "latest"), ("blobs", "sha256:" + "a" * 64)):
                response = self.hammal.request("GET", f"/v2/{name}/{kind}/{ref}", ACCEPT)
                self.assertOCIError(response, 400, "NAME_INVALID")
        # A bad name is refused without asking upstream.
        self.assertEqual(self.env.token_log(), [])

    def test_rate_limited_token_server(self) -> None:
        self.env.set_ratelimit(True)
        self.addCleanup(self.env.set_ratelimit, False)
        response = self.hammal.request("GET", "/v2/library/alpine/manifests/3.20", ACCEPT)
        self.assertOCIError(response, 429, "TOOMANYREQUESTS")
        self.assertTrue(self.env.token_log(), "hammal did not ask for a token")
        # Once the limit is lifted, the same hammal recovers.
        self.env.set_ratelimit(False)
        response = self.hammal.request("GET", "/v2/library/alpine/manifests/3.20", ACCEPT)
        self.assertEqual(response.status, 200, response.describe())

    def test_rate_limit_keeps_retry_after(self) -> None:
        self.env.set_ratelimit(True)
        self.addCleanup(self.env.set_ratelimit, False)
        response = self.hammal.request("GET", "/v2/library/ociimg/manifests/1", ACCEPT)
        self.assertEqual(response.status, 429, response.describe())
        self.assertEqual(response.header("Retry-After"), "60", response.describe())


class UpstreamFailureTests(IntegrationTestCase):
    """An upstream that is down or silent."""

    def test_upstream_down_502(self) -> None:
        port = free_port()  # nothing listens there
        hammal = self.start_hammal(upstream=f"http://127.0.0.1:{port}")
        started = time.monotonic()
        response = hammal.request("GET", "/v2/library/alpine/manifests/3.20", ACCEPT)
        elapsed = time.monotonic() - started
        self.assertOCIError(response, 502, None, message_contains=[f"127.0.0.1:{port}"])
        self.assertLess(elapsed, 10, "connection refused should fail fast")
        blob = hammal.request("GET", "/v2/library/alpine/blobs/sha256:" + "a" * 64)
        self.assertOCIError(blob, 502, None, message_contains=[f"127.0.0.1:{port}"])

    def test_upstream_silent_504(self) -> None:
        silent = SilentServer()
        self.addCleanup(silent.close)
        hammal = self.start_hammal(upstream=silent.url, read_timeout=1, retries=1)
        started = time.monotonic()
        response = hammal.request("GET", "/v2/library/alpine/manifests/3.20", ACCEPT, timeout=60)
        elapsed = time.monotonic() - started
        self.assertGreater(silent.accepted, 0, "hammal never connected")
        self.assertIn(b"GET /v2/", silent.received, "hammal never sent its request")
        self.assertOCIError(response, 504, None)
        self.assertLess(elapsed, 20, "read timeout 1 s, one retry: should give up quickly")
        self.assertGreaterEqual(elapsed, 0.9, "gave up before the read timeout")


class TLSProbeTests(IntegrationTestCase):
    """A TLS ClientHello on hammal's plain-HTTP port must be refused quickly.

    skopeo and podman (``--tls-verify=false`` / ``insecure=true``) try HTTPS
    first and fall back to HTTP only when that attempt fails; Go's TLS
    handshake timeout is 10 s, so a server that keeps the connection open
    without answering adds 10 s to every pull.  Distribution answers such a
    probe at once.  This test runs hammal with its default idle timeout.
    """

    def test_tls_probe_fails_fast(self) -> None:
        hammal = start_hammal(idle_timeout=None)
        self.addCleanup(hammal.stop)
        self._hammals.append(hammal)
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        started = time.monotonic()
        outcome = "no answer"
        with socket.create_connection(("127.0.0.1", hammal.port), timeout=5) as sock:
            try:
                context.wrap_socket(sock, server_hostname="127.0.0.1")
                outcome = "handshake succeeded?!"
            except socket.timeout:
                outcome = "timed out after 5 s: hammal held the connection open"
            except (ssl.SSLError, OSError) as e:
                outcome = f"refused: {e!r}"
        elapsed = time.monotonic() - started
        self.assertTrue(outcome.startswith("refused"), outcome)
        self.assertLess(elapsed, 3, outcome)
