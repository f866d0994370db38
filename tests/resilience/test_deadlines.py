"""Nothing waits forever: upstream bodies that stall (a token, a manifest,
an error page) end in a clean error within hammal's deadlines, shared work
is dropped with them, and the next pull of the same repository succeeds.

The upstream is :class:`tests.resilience.upstream.FaultyRegistry` over real
TCP on 127.0.0.1, with Docker-Hub-like token auth; hammal runs with
``--read-timeout 1 --upstream-deadline 5 --retries 2``.
"""

from __future__ import annotations

import time

from tests.integration.environment import HTTPResponse, http_request
from tests.resilience.support import (
    ResilienceCase,
    Sandbox,
    cache_problems,
    sha256,
    start_sandboxed_hammal,
)
from tests.resilience.test_upstream_faults import READ_TIMEOUT, _FaultCase
from tests.resilience.upstream import OCI_MANIFEST, FaultyRegistry, Image

DEADLINE = 5.0
#: The longest a request may take when upstream stalls: every attempt
#: (retries + 1) waits out the idle limit, plus backoff and scheduling.
WITHIN = 3 * READ_TIMEOUT + DEADLINE + 3
#: How long the test waits for an answer: well past WITHIN, so a hang
#: shows as a test failure and not as a slow pass.
CLIENT_TIMEOUT = 20.0


def _options() -> dict:
    return dict(
        read_timeout=READ_TIMEOUT,
        retries=2,
        retry_backoff=0.05,
        extra_args=["--upstream-deadline", str(DEADLINE)],
    )


class _DeadlineCase(_FaultCase):
    token_auth = True

    @classmethod
    def start_fixture(cls) -> None:
        cls.registry = FaultyRegistry(token_auth=cls.token_auth)
        cls.sandbox = start_sandboxed_hammal(cls.registry.url, **_options())  # type: ignore[arg-type]

    def manifest(self, image: Image, reference: str = "latest") -> HTTPResponse:
        return http_request(
            "GET",
            f"{self.sandbox.hammal.url}/v2/{image.name}/manifests/{reference}",
            [("Accept", OCI_MANIFEST)],
            timeout=CLIENT_TIMEOUT,
        )

    def assertManifest(self, resp: HTTPResponse, image: Image) -> None:
        self.assertEqual(resp.status, 200, resp.describe())
        self.assertEqual(sha256(resp.body), image.digest)
        self.assertEqual(resp.header("Docker-Content-Digest"), image.digest)

    def assertTimedOut(self, resp: HTTPResponse, started: float) -> None:
        """A clean 504 in OCI form, within the deadlines."""
        took = time.monotonic() - started
        self.assertEqual(resp.status, 504, resp.describe())
        error = resp.json()["errors"][0]
        self.assertEqual(error["code"], "UNAVAILABLE")
        self.assertTrue(error["message"])
        self.assertLess(took, WITHIN, f"the error took {took:.1f}s")


class TokenDeadlineTests(_DeadlineCase):
    """A token endpoint that sends its headers and then stalls."""

    def test_stalled_token_body(self) -> None:
        """
        The first pull gets a clean 504 within the deadline (not a hang);
        once the token endpoint recovers, the next pull of the same
        repository succeeds: the shared token request was dropped.
        """
        img = self.image((64 * 1024,))
        self.registry.add_fault("hang", "/token", count=-1, after=5)
        started = time.monotonic()
        self.assertTimedOut(self.manifest(img), started)
        self.assertGreaterEqual(len(self.registry.entries("/token")), 1)
        self.registry.clear_faults()
        self.assertManifest(self.manifest(img), img)
        self.assertExact(self.pull(img), img)

    def test_token_stall_once_is_retried(self) -> None:
        """A token response that stalls once costs one idle limit, then works."""
        img = self.image((4096,))
        self.registry.add_fault("hang", "/token", count=1, after=5)
        tokens_before = len(self.registry.entries("/token"))
        started = time.monotonic()
        self.assertManifest(self.manifest(img), img)
        self.assertLess(time.monotonic() - started, WITHIN)
        self.assertEqual(len(self.registry.entries("/token")) - tokens_before, 2)


class ManifestDeadlineTests(_DeadlineCase):
    """Manifest and error bodies that stall, with token auth in front."""

    def test_stalled_manifest_body(self) -> None:
        """A manifest whose body stalls: a clean 504, then a normal pull."""
        img = self.image((4096,))
        self.registry.add_fault("hang", f"{img.name}/manifests/", count=-1, after=10, method="GET")
        started = time.monotonic()
        self.assertTimedOut(self.manifest(img), started)
        self.registry.clear_faults()
        self.assertManifest(self.manifest(img), img)
        self.assertManifest(self.manifest(img, img.digest), img)

    def test_stalled_5xx_body_is_retried(self) -> None:
        """
        A 503 whose error body stalls is given up after the idle limit and
        retried, instead of holding the request (and the shared manifest
        fetch) for ever.
        """
        img = self.image((4096,))
        self.registry.add_fault(
            "status-hang", f"{img.name}/manifests/", count=1, code=503, after=5, method="GET"
        )
        started = time.monotonic()
        self.assertManifest(self.manifest(img), img)
        self.assertLess(time.monotonic() - started, WITHIN)
        gets = [e for e in self.registry.entries(f"{img.name}/manifests/") if e.method == "GET"]
        self.assertEqual([e.fault for e in gets if e.status != 401], ["status-hang", None])

    def test_stalled_5xx_body_on_a_blob_fill(self) -> None:
        """
        A blob fill whose upstream keeps answering 503 with a stalled body
        fails cleanly, and the next pull of that blob fetches it afresh.
        """
        img = self.image((256 * 1024,))
        self.registry.add_fault(
            "status-hang",
            f"/blobs/{img.layers[0].digest}",
            count=-1,
            code=503,
            after=5,
            method="GET",
        )
        started = time.monotonic()
        resp = self.pull(img, timeout=CLIENT_TIMEOUT)
        self.assertLess(time.monotonic() - started, WITHIN)
        self.assertCleanFailure(resp, img)
        self.registry.clear_faults()
        self.assertExact(self.pull(img, timeout=CLIENT_TIMEOUT), img)

    def test_large_5xx_page_without_mirror(self) -> None:
        """A 503 with a large HTML page: retried, then a clear 503 naming upstream."""
        img = self.image((4096,))
        self.registry.add_fault(
            "status-page",
            f"{img.name}/manifests/",
            count=-1,
            code=503,
            after=300 * 1024,
            method="GET",
        )
        resp = self.manifest(img)
        self.assertEqual(resp.status, 502, resp.describe())
        message = resp.json()["errors"][0]["message"]
        self.assertIn("HTTP 503", message)
        self.assertNotIn("exceeds", message)


class FailoverDeadlineTests(ResilienceCase):
    """
    A primary answering 5xx with a stalled or a large (HTML) body fails
    over to ``--mirror`` (each test with its own hammal: a failed primary
    rests for 30 s).
    """

    def setUp(self) -> None:
        super().setUp()
        self.primary = FaultyRegistry(token_auth=True)
        self.addCleanup(self.primary.stop)
        self.mirror = FaultyRegistry(token_auth=True)
        self.addCleanup(self.mirror.stop)
        options = _options()
        options["extra_args"] = list(options["extra_args"]) + ["--mirror", self.mirror.url]
        self.sandbox: Sandbox = start_sandboxed_hammal(self.primary.url, **options)  # type: ignore[arg-type]
        self.addCleanup(self.sandbox.stop)
        name = f"res/{self.id().rsplit('.', 1)[-1].replace('_', '-')}"
        self.image = self.primary.add_image(name, [128 * 1024], seed=7)
        self.mirror.add_image(name, [128 * 1024], seed=7)

    def tearDown(self) -> None:
        self.assertNoTraceback(self.sandbox)
        self.assertEqual(cache_problems(self.sandbox.cache_dir), [])
        super().tearDown()

    def _pull_through_mirror(self, kind: str, after: int) -> None:
        img = self.image
        for where in (f"{img.name}/manifests/", f"/blobs/{img.layers[0].digest}"):
            self.primary.add_fault(kind, where, count=-1, code=503, after=after, method="GET")
        started = time.monotonic()
        resp = http_request(
            "GET",
            f"{self.sandbox.hammal.url}/v2/{img.name}/manifests/latest",
            [("Accept", OCI_MANIFEST)],
            timeout=CLIENT_TIMEOUT,
        )
        self.assertEqual(resp.status, 200, resp.describe())
        self.assertEqual(sha256(resp.body), img.digest)
        self.assertLess(time.monotonic() - started, WITHIN)
        blob = http_request(
            "GET",
            f"{self.sandbox.hammal.url}/v2/{img.name}/blobs/{img.layers[0].digest}",
            timeout=CLIENT_TIMEOUT,
        )
        self.assertEqual(blob.status, 200, blob.describe())
        self.assertEqual(sha256(blob.body), img.layers[0].digest)
        tried = [e for e in self.primary.entries(f"{img.name}/manifests/") if e.fault == kind]
        self.assertTrue(tried, "the primary was never tried")
        served = [e for e in self.mirror.entries(f"{img.name}/manifests/") if e.status == 200]
        self.assertTrue(served, "the mirror never served the manifest")
        self.assertIn("trying the next mirror", self.sandbox.hammal.log_text())

    def test_stalled_5xx_body_fails_over(self) -> None:
        self._pull_through_mirror("status-hang", 5)
        self.assertTrue(
            self.settle(lambda: self.primary.hanging == 0, 3 * READ_TIMEOUT + 8),
            "hammal left the stalled primary connections open",
        )

    def test_large_5xx_page_fails_over(self) -> None:
        self._pull_through_mirror("status-page", 300 * 1024)
