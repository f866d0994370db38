"""Upstream faults against a running hammal: every pull ends with the exact
bytes or a clear error, nothing wrong is cached, nothing leaks.

The upstream is :class:`tests.resilience.upstream.FaultyRegistry` (real TCP
on 127.0.0.1). hammal runs with ``--retries 2 --read-timeout 1``.
"""

from __future__ import annotations

import json
import os
import time
from typing import List, Sequence

from tests.integration.environment import free_port, http_request
from tests.resilience.support import (
    FixtureCase,
    RawResponse,
    ResilienceCase,
    Sandbox,
    cache_problems,
    established_sockets,
    get_blob,
    open_fds,
    sha256,
    start_sandboxed_hammal,
)
from tests.resilience.upstream import OCI_MANIFEST, FaultyRegistry, Image, LogEntry

MiB = 1024 * 1024
READ_TIMEOUT = 1.0


class _FaultCase(FixtureCase):
    redirect = False
    registry: FaultyRegistry
    sandbox: Sandbox
    _seed = 0

    @classmethod
    def start_fixture(cls) -> None:
        cls.registry = FaultyRegistry(redirect=cls.redirect)
        cls.sandbox = start_sandboxed_hammal(
            cls.registry.url, read_timeout=READ_TIMEOUT, retries=2, retry_backoff=0.05
        )

    @classmethod
    def stop_fixture(cls) -> None:
        cls._stop_shared("sandbox", "registry")

    def setUp(self) -> None:
        super().setUp()
        self.registry.clear_faults()
        self.assertAlive(self.sandbox)
        self.log_offset = len(self.sandbox.hammal.log_text())
        # a warm pooled connection, so the baseline counts it
        http_request("GET", self.sandbox.hammal.url + "/v2/", timeout=5)
        self.fds_before = len(open_fds(self.sandbox.pid))
        self.est_before = len(established_sockets(self.sandbox.pid))

    def tearDown(self) -> None:
        self.registry.clear_faults()
        self.assertAlive(self.sandbox)
        # hammal closes the connections an upstream left hanging
        self.assertTrue(
            self.settle(lambda: self.registry.hanging == 0, 3 * READ_TIMEOUT + 8),
            f"{self.registry.hanging} hanging upstream connections still open",
        )
        self.assertNoTraceback(self.sandbox, self.log_offset)
        self.assertNoLeaks(
            self.sandbox, self.fds_before, self.est_before, upstream_ports=[self.registry.port]
        )
        self.assertEqual(cache_problems(self.sandbox.cache_dir), [])
        tmp = os.path.join(self.sandbox.cache_dir, "tmp")
        self.assertTrue(
            self.settle(lambda: not os.path.isdir(tmp) or not os.listdir(tmp), 10),
            f"temporary files left behind: {os.listdir(tmp) if os.path.isdir(tmp) else []}",
        )

    # -- helpers ---------------------------------------------------------------

    def image(self, sizes: Sequence[int] = (3 * MiB,)) -> Image:
        type(self)._seed += 1
        name = f"res/{self.id().rsplit('.', 1)[-1].replace('_', '-')}"
        return self.registry.add_image(name, list(sizes), seed=self._seed + 100)

    def pull(self, image: Image, index: int = 0, timeout: float = 30.0) -> RawResponse:
        blob = image.layers[index]
        return get_blob(self.sandbox.hammal.port, image.name, blob.digest, timeout=timeout)

    def assertExact(self, resp: RawResponse, image: Image, index: int = 0) -> None:
        blob = image.layers[index]
        self.assertEqual(resp.status, 200, f"{resp.status} {resp.error} {resp.body[:300]!r}")
        self.assertTrue(resp.complete, resp.error)
        self.assertEqual(len(resp.body), len(blob.data))
        self.assertEqual(sha256(resp.body), blob.digest)

    def assertCleanFailure(self, resp: RawResponse, image: Image, index: int = 0) -> None:
        """A clear error: an OCI error status and body, or a body cut short.
        Never a complete body with the wrong bytes, never a 500."""
        blob = image.layers[index]
        if resp.status == 200:
            self.assertFalse(
                resp.complete and sha256(resp.body) != blob.digest,
                "a complete 200 with the wrong bytes",
            )
            self.assertFalse(resp.complete, "expected the transfer to be cut short")
            return
        self.assertIn(resp.status, (502, 503, 504), f"{resp.status} {resp.body[:300]!r}")
        errors = json.loads(resp.body)["errors"]
        self.assertTrue(errors and errors[0]["code"] and errors[0]["message"], errors)

    def blob_requests(self, image: Image, index: int = 0, where: str = "/blobs/") -> List[LogEntry]:
        blob = image.layers[index]
        key = f"/blobs/{blob.digest}" if where == "/blobs/" else f"/cdn/{blob.hex}"
        return [e for e in self.registry.entries(key) if e.method == "GET"]


class UpstreamFaultTests(_FaultCase):
    """Faults of a registry that serves blobs itself."""

    def test_reset_mid_blob_is_resumed(self) -> None:
        img = self.image()
        self.registry.add_fault("reset", f"/blobs/{img.layers[0].digest}", after=MiB)
        self.assertExact(self.pull(img), img)
        gets = self.blob_requests(img)
        self.assertEqual([g.fault for g in gets], ["reset", None])
        self.assertTrue((gets[1].range or "").startswith("bytes="), gets[1].range)
        # and from the cache afterwards, without upstream
        self.assertExact(self.pull(img), img)
        self.assertEqual(len(self.blob_requests(img)), 2)

    def test_reset_every_time_fails_cleanly_and_caches_nothing(self) -> None:
        img = self.image()
        path = f"/blobs/{img.layers[0].digest}"
        self.registry.add_fault("reset", path, count=-1, after=MiB // 2)
        self.assertCleanFailure(self.pull(img), img)
        self.registry.clear_faults()
        self.assertExact(self.pull(img), img)

    def test_5xx_burst_within_retries(self) -> None:
        for code in (502, 503):
            img = self.image()
            self.registry.add_fault("status", f"/blobs/{img.layers[0].digest}", count=2, code=code)
            self.assertExact(self.pull(img), img)
            self.assertEqual(len(self.blob_requests(img)), 3)

    def test_5xx_burst_longer_than_retries(self) -> None:
        for code in (500, 502, 503):
            img = self.image()
            self.registry.add_fault("status", f"/blobs/{img.layers[0].digest}", count=-1, code=code)
            started = time.monotonic()
            resp = self.pull(img)
            self.assertCleanFailure(resp, img)
            self.assertNotEqual(resp.status, 500)
            self.assertLess(time.monotonic() - started, 15)
            self.registry.clear_faults()
            self.assertExact(self.pull(img), img)

    def test_manifest_5xx_burst(self) -> None:
        img = self.image((4096,))
        self.registry.add_fault("status", f"{img.name}/manifests/", count=2, code=503)
        resp = http_request(
            "GET",
            f"{self.sandbox.hammal.url}/v2/{img.name}/manifests/latest",
            [("Accept", OCI_MANIFEST)],
            timeout=30,
        )
        self.assertEqual(resp.status, 200, resp.describe())
        self.assertEqual(sha256(resp.body), img.digest)
        self.registry.add_fault("status", f"{img.name}/manifests/", count=-1, code=503)
        resp = http_request(
            "GET",
            f"{self.sandbox.hammal.url}/v2/{img.name}/manifests/{img.digest}",
            [("Accept", OCI_MANIFEST)],
            timeout=30,
        )
        # cached by digest already, or a clear error: never wrong bytes
        if resp.status == 200:
            self.assertEqual(sha256(resp.body), img.digest)
        else:
            self.assertIn(resp.status, (502, 503, 504), resp.describe())

    def test_hanging_upstream_times_out(self) -> None:
        img = self.image()
        self.registry.add_fault("hang", f"/blobs/{img.layers[0].digest}", count=-1, after=-1)
        started = time.monotonic()
        resp = self.pull(img, timeout=40)
        took = time.monotonic() - started
        self.assertEqual(resp.status, 504, f"{resp.status} {resp.error} {resp.body[:300]!r}")
        self.assertCleanFailure(resp, img)
        self.assertLess(took, 3 * READ_TIMEOUT + 8)
        self.registry.clear_faults()
        self.assertExact(self.pull(img), img)

    def test_hanging_manifest_times_out(self) -> None:
        img = self.image((4096,))
        self.registry.add_fault("hang", f"{img.name}/manifests/", count=-1, after=-1)
        resp = http_request(
            "GET",
            f"{self.sandbox.hammal.url}/v2/{img.name}/manifests/latest",
            [("Accept", OCI_MANIFEST)],
            timeout=40,
        )
        self.assertEqual(resp.status, 504, resp.describe())
        self.assertTrue(resp.json()["errors"][0]["message"])

    def test_hang_mid_blob_is_resumed(self) -> None:
        img = self.image()
        self.registry.add_fault("hang", f"/blobs/{img.layers[0].digest}", after=MiB)
        self.assertExact(self.pull(img, timeout=40), img)
        gets = self.blob_requests(img)
        self.assertEqual(gets[0].fault, "hang")
        self.assertTrue(gets[-1].range and gets[-1].range.startswith("bytes="), gets[-1].range)

    def test_slow_upstream(self) -> None:
        img = self.image((int(1.5 * MiB),))
        self.registry.add_fault("slow", f"/blobs/{img.layers[0].digest}", rate=MiB)
        started = time.monotonic()
        self.assertExact(self.pull(img, timeout=40), img)
        self.assertGreater(time.monotonic() - started, 1.0)
        self.assertEqual(len(self.blob_requests(img)), 1)

    def test_trickling_upstream_is_given_up(self) -> None:
        """
        An upstream trickling 200 B/s, never silent for the 1 s read timeout
        but under the default --upstream-min-rate (1024 B/s), is given up
        each window: resumed with Range like silence, then a clean failure
        once the resumes are spent; on the event loop (a small blob) and on
        a pump thread (a large one). Without the faults, exact bytes.
        """
        img = self.image((64 * 1024, 3 * MiB))
        for index in (0, 1):
            self.registry.add_fault(
                "slow", f"/blobs/{img.layers[index].digest}", count=-1, rate=200
            )
            started = time.monotonic()
            resp = self.pull(img, index, timeout=40)
            took = time.monotonic() - started
            self.assertCleanFailure(resp, img, index)
            self.assertLess(took, 3 * READ_TIMEOUT + 8)
            gets = self.blob_requests(img, index)
            self.assertEqual([g.fault for g in gets], ["slow"] * 3)  # --retries 2: two resumes
            self.assertTrue(all(g.range and g.range.startswith("bytes=") for g in gets[1:]), gets)
            self.registry.clear_faults()
            self.assertExact(self.pull(img, index), img, index)
        log = self.sandbox.hammal.log_text()[self.log_offset :]
        self.assertIn("below --upstream-min-rate 1024 B/s", log)

    def test_client_leaves_during_a_hang(self) -> None:
        """A client giving up while upstream hangs leaks nothing (tearDown)."""
        img = self.image()
        self.registry.add_fault("hang", f"/blobs/{img.layers[0].digest}", count=-1, after=MiB)
        resp = self.pull(img, timeout=0.5)
        self.assertFalse(resp.complete)
        self.assertGreaterEqual(self.registry.hanging, 1)


class CDNFaultTests(_FaultCase):
    """Faults of the CDN a registry redirects blob GETs to."""

    redirect = True

    def test_cdn_that_refuses_range(self) -> None:
        img = self.image()
        self.registry.add_fault("reset", f"/cdn/{img.layers[0].hex}", after=MiB)
        self.registry.add_fault("ignore-range", f"/cdn/{img.layers[0].hex}", count=-1)
        self.assertExact(self.pull(img), img)
        cdn = self.blob_requests(img, where="/cdn/")
        self.assertGreaterEqual(len(cdn), 2, cdn)
        self.assertEqual(cdn[0].fault, "reset")
        self.assertEqual(cdn[1].fault, "ignore-range")
        self.assertEqual(cdn[1].status, 200)
        for entry in self.registry.entries(f"/cdn/{img.layers[0].hex}"):
            self.assertNotIn("authorization", entry.headers)

    def test_cdn_resets_every_time(self) -> None:
        img = self.image()
        self.registry.add_fault("reset", f"/cdn/{img.layers[0].hex}", count=-1, after=MiB // 4)
        self.assertCleanFailure(self.pull(img), img)
        self.registry.clear_faults()
        self.assertExact(self.pull(img), img)

    def test_cdn_503_burst(self) -> None:
        img = self.image()
        self.registry.add_fault("status", f"/cdn/{img.layers[0].hex}", count=2, code=503)
        self.assertExact(self.pull(img), img)


class ConnectionRefusedTests(ResilienceCase):
    """An upstream nobody listens on: quick, clear 502s; nothing leaks."""

    def test_connection_refused(self) -> None:
        port = free_port()  # nothing listens there
        sandbox = start_sandboxed_hammal(
            f"http://127.0.0.1:{port}", retries=2, retry_backoff=0.05, connect_timeout=1
        )
        self.addCleanup(sandbox.stop)
        http_request("GET", sandbox.hammal.url + "/v2/", timeout=5)
        fds, est = len(open_fds(sandbox.pid)), len(established_sockets(sandbox.pid))
        digest = "sha256:" + "ab" * 32
        for i in range(4):
            started = time.monotonic()
            if i % 2:
                resp = get_blob(sandbox.hammal.port, "res/refused", digest, timeout=20)
                status, body = resp.status, resp.body
            else:
                r = http_request(
                    "GET",
                    f"{sandbox.hammal.url}/v2/res/refused/manifests/latest",
                    [("Accept", OCI_MANIFEST)],
                    timeout=20,
                )
                status, body = r.status, r.body
            self.assertLess(time.monotonic() - started, 10)
            self.assertEqual(status, 502, body[:300])
            error = json.loads(body)["errors"][0]
            self.assertIn(f"127.0.0.1:{port}", error["message"])
        self.assertNoLeaks(sandbox, fds, est, slack=0, pool_limit=0)
        self.assertNoTraceback(sandbox)
        self.assertEqual(cache_problems(sandbox.cache_dir), [])


class NoCacheFaultTests(_FaultCase):
    """Faults of a registry hammal relays uncached (``--no-cache``)."""

    @classmethod
    def start_fixture(cls) -> None:
        cls.registry = FaultyRegistry(redirect=cls.redirect)
        cls.sandbox = start_sandboxed_hammal(
            cls.registry.url,
            read_timeout=READ_TIMEOUT,
            retries=2,
            retry_backoff=0.05,
            extra_args=["--no-cache"],
        )

    def test_trickling_upstream_is_given_up(self) -> None:
        """
        Uncached, an upstream trickling 200 B/s (never silent for the 1 s
        read timeout, under the default --upstream-min-rate of 1024 B/s) is
        given up each window like silence: resumed twice with Range, then
        the client's body is cut short. A slow upstream above the rate
        (4 KiB/s) is relayed whole, and without the fault the exact bytes.
        """
        img = self.image((64 * 1024, 16 * 1024))
        self.registry.add_fault("slow", f"/blobs/{img.layers[0].digest}", count=-1, rate=200)
        started = time.monotonic()
        resp = self.pull(img, timeout=40)
        took = time.monotonic() - started
        self.assertCleanFailure(resp, img)
        self.assertLess(took, 3 * READ_TIMEOUT + 8)
        gets = self.blob_requests(img)
        self.assertEqual([g.fault for g in gets], ["slow"] * 3)  # --retries 2: two resumes
        self.assertTrue(all(g.range and g.range.startswith("bytes=") for g in gets[1:]), gets)
        log = self.sandbox.hammal.log_text()[self.log_offset :]
        self.assertIn("below --upstream-min-rate 1024 B/s", log)
        self.registry.clear_faults()
        self.assertExact(self.pull(img), img)

        self.registry.add_fault("slow", f"/blobs/{img.layers[1].digest}", count=-1, rate=4096)
        self.assertExact(self.pull(img, 1, timeout=40), img, 1)
        self.assertEqual([g.fault for g in self.blob_requests(img, 1)], ["slow"])
