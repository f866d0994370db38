"""
Tests for the ``/v2/`` resource end to end in memory: a client talks to
hammal's site, hammal talks to a fake Docker-Hub-like upstream.
"""

from __future__ import annotations

import json
from typing import Any

from treq.testing import RequestTraversalAgent
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from hammal.app import build_app
from hammal.cache.fetch import run_here
from hammal.config import Settings
from hammal.stream import read_body
from tests.fakes import CDN, MANIFEST_V2, REGISTRY, FakeUpstream, stub_for

INDEX = "application/vnd.oci.image.index.v1+json"


class Mirror:
    """hammal as L{build_app} wires it, over a fake upstream with an in-memory client."""

    def __init__(
        self,
        blob_redirect: str = "follow",
        retries: int = 1,
        cache_dir: str | None = None,
        gate: Any = None,
        world: FakeUpstream | None = None,
    ) -> None:
        self.world = world or FakeUpstream()
        self.upstream_http = stub_for(self.world)
        self.clock = Clock()
        settings = Settings(
            upstream=f"https://{REGISTRY}",
            force_library_prefix=True,
            cache_dir=cache_dir,
            retries=retries,
            retry_backoff=0.1,
            read_timeout=10,
            buffer_size=1000,
            blob_redirect=blob_redirect,
            manifest_ttl=300,
            stale_if_error=3600,
            negative_ttl=30,
        )
        self.app = build_app(
            settings,
            self.clock,
            http_client=self.upstream_http,
            redirect_client=self.upstream_http,
            offload=run_here,
            gate=gate,
            retry_random=lambda: 1.0,
        )
        assert self.app.default is not None
        self.proxy = self.app.default
        self.blobs = self.app.blobs
        self.readiness = self.app.readiness
        self.agent = RequestTraversalAgent(self.app.root)
        self.agent._serverFactory = self.app.site  # type: ignore[attr-defined]

    def flush(self) -> None:
        for _ in range(50):
            self.agent.flush()
            self.upstream_http.flush()
            self.clock.advance(0)

    def request(
        self, method: bytes, path: str, headers: dict[bytes, list[bytes]] | None = None
    ) -> Any:
        d = self.agent.request(method, f"http://mirror.test{path}".encode(), Headers(headers or {}))
        self.flush()
        responses: list[Any] = []
        d.addBoth(responses.append)
        assert responses, f"no response to {method!r} {path}"
        return responses[0]

    def body(self, response: Any) -> Any:
        d = read_body(response, 1 << 24)
        self.flush()
        results: list[Any] = []
        d.addBoth(results.append)
        assert results
        return results[0]


def header(response: Any, name: bytes) -> str | None:
    values = response.headers.getRawHeaders(name)
    return values[0].decode() if values else None


class BaseTests(SynchronousTestCase):
    def test_base(self) -> None:
        """GET /v2/ answers 200 {} with the API version header."""
        mirror = Mirror()
        response = mirror.request(b"GET", "/v2/")
        self.assertEqual(response.code, 200)
        self.assertEqual(header(response, b"docker-distribution-api-version"), "registry/2.0")
        self.assertEqual(json.loads(mirror.body(response)), {})
        self.assertEqual(mirror.world.seen, [])

    def test_unknown_path(self) -> None:
        """An unknown API path is a JSON 404."""
        mirror = Mirror()
        response = mirror.request(b"GET", "/v2/_something")
        self.assertEqual(response.code, 404)
        self.assertIn("errors", json.loads(mirror.body(response)))


class ErrorTests(SynchronousTestCase):
    """Bad input answers with OCI error JSON and never reaches upstream."""

    def assertError(self, method: bytes, path: str, status: int, code: str) -> None:
        mirror = Mirror()
        response = mirror.request(method, path)
        self.assertEqual(response.code, status, path)
        self.assertEqual(header(response, b"content-type"), "application/json; charset=utf-8")
        if method != b"HEAD":
            document = json.loads(mirror.body(response))
            self.assertEqual(document["errors"][0]["code"], code)
            self.assertTrue(document["errors"][0]["message"])
        self.assertEqual(mirror.world.seen, [], f"{path} reached upstream")

    def test_names(self) -> None:
        for path in (
            "/v2/Alpine/manifests/latest",
            "/v2/a/../etc/manifests/latest",
            "/v2/a//b/manifests/latest",
            "/v2/a%2F..%2Fb/manifests/latest",
            "/v2/" + "a" * 256 + "/manifests/latest",
            "/v2/-a/blobs/sha256:" + "0" * 64,
            "/v2/a/tags/list/../x/manifests/1",
        ):
            self.assertError(b"GET", path, 400, "NAME_INVALID")

    def test_tags(self) -> None:
        self.assertError(b"GET", "/v2/alpine/manifests/.bad", 400, "TAG_INVALID")
        self.assertError(b"GET", "/v2/alpine/manifests/" + "t" * 129, 400, "TAG_INVALID")
        self.assertError(b"GET", "/v2/alpine/manifests/", 400, "TAG_INVALID")

    def test_digests(self) -> None:
        self.assertError(b"GET", "/v2/alpine/blobs/sha256:1234", 400, "DIGEST_INVALID")
        self.assertError(b"GET", "/v2/alpine/blobs/md5:" + "0" * 32, 400, "DIGEST_INVALID")
        self.assertError(b"HEAD", "/v2/alpine/manifests/sha256:" + "G" * 64, 400, "DIGEST_INVALID")

    def test_push_refused(self) -> None:
        self.assertError(b"POST", "/v2/alpine/blobs/uploads/", 405, "UNSUPPORTED")
        self.assertError(b"PUT", "/v2/alpine/manifests/latest", 405, "UNSUPPORTED")
        self.assertError(b"DELETE", "/v2/alpine/blobs/sha256:" + "0" * 64, 405, "UNSUPPORTED")


class ManifestTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.mirror = Mirror()
        self.body = b'{"schemaVersion":2,"mediaType":"' + MANIFEST_V2.encode() + b'"}'
        self.digest = self.mirror.world.add_image("library/alpine", "3.20", self.body)

    def test_get_by_tag_short_name(self) -> None:
        """A one-part name is fetched from library/ in one hop, headers intact."""
        response = self.mirror.request(b"GET", "/v2/alpine/manifests/3.20")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.mirror.body(response), self.body)
        self.assertEqual(header(response, b"content-type"), MANIFEST_V2)
        self.assertEqual(header(response, b"docker-content-digest"), self.digest)
        self.assertEqual(response.length, len(self.body))
        paths = [s.path for s in self.mirror.world.hits(REGISTRY)]
        self.assertTrue(all(p.startswith("/v2/library/alpine/") for p in paths), paths)

    def test_get_by_digest(self) -> None:
        response = self.mirror.request(b"GET", f"/v2/library/alpine/manifests/{self.digest}")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.mirror.body(response), self.body)

    def test_head(self) -> None:
        """HEAD relays length and digest without a body."""
        response = self.mirror.request(b"HEAD", "/v2/alpine/manifests/3.20")
        self.assertEqual(response.code, 200)
        self.assertEqual(header(response, b"docker-content-digest"), self.digest)
        self.assertEqual(header(response, b"content-length"), str(len(self.body)))
        self.assertEqual(self.mirror.world.hits(REGISTRY)[-1].method, "HEAD")

    def test_accept_values_all_forwarded(self) -> None:
        """Every Accept header a client sends reaches upstream (podman sends six)."""
        accept = [
            MANIFEST_V2.encode(),
            INDEX.encode(),
            b"application/vnd.oci.image.manifest.v1+json",
        ]
        self.mirror.request(
            b"GET",
            "/v2/alpine/manifests/3.20",
            {
                b"accept": accept,
                b"authorization": [b"Basic Y2xpZW50OnNlY3JldA=="],
                b"connection": [b"x-private"],
                b"x-private": [b"1"],
            },
        )
        last = self.mirror.world.hits(REGISTRY)[-1]
        self.assertEqual(last.headers["accept"], [a.decode() for a in accept])
        self.assertTrue(last.header("authorization").startswith("Bearer tok-"))
        self.assertNotIn("x-private", last.headers)

    def test_unknown_tag(self) -> None:
        """An unknown tag is upstream's 404 with its error code."""
        response = self.mirror.request(b"GET", "/v2/alpine/manifests/nope")
        self.assertEqual(response.code, 404)
        document = json.loads(self.mirror.body(response))
        self.assertEqual(document["errors"][0]["code"], "MANIFEST_UNKNOWN")

    def test_digest_mismatch(self) -> None:
        """A manifest whose bytes do not match the asked digest is a 502."""
        other = "sha256:" + "1" * 64
        self.mirror.world.manifests[("library/alpine", other)] = (MANIFEST_V2, self.body)
        response = self.mirror.request(b"GET", f"/v2/alpine/manifests/{other}")
        self.assertEqual(response.code, 502)

    def test_rate_limited(self) -> None:
        """Upstream 429 becomes 429 TOOMANYREQUESTS with a hint."""
        self.mirror.world.faults = [429, 429]
        self.mirror.world.retry_after = "600"
        response = self.mirror.request(b"GET", "/v2/alpine/manifests/3.20")
        self.assertEqual(response.code, 429)
        document = json.loads(self.mirror.body(response))
        self.assertEqual(document["errors"][0]["code"], "TOOMANYREQUESTS")
        self.assertIn("--upstream-username", document["errors"][0]["message"])
        self.assertEqual(header(response, b"retry-after"), "600")

    def test_tags_list(self) -> None:
        """Pagination parameters and Link pass through."""
        response = self.mirror.request(b"GET", "/v2/alpine/tags/list?n=1&last=a&evil=1")
        self.assertEqual(response.code, 200)
        self.assertIn("rel=", header(response, b"link"))
        last = self.mirror.world.hits(REGISTRY)[-1]
        self.assertEqual(last.path, "/v2/library/alpine/tags/list?n=1&last=a")


class BlobTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.mirror = Mirror()
        self.blob = bytes(range(256)) * 512
        self.digest = self.mirror.world.add_blob(self.blob)

    def test_get_follows_cdn(self) -> None:
        response = self.mirror.request(b"GET", f"/v2/alpine/blobs/{self.digest}")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.length, len(self.blob))
        self.assertEqual(header(response, b"docker-content-digest"), self.digest)
        self.assertEqual(self.mirror.body(response), self.blob)
        self.assertIsNone(self.mirror.world.hits(CDN)[0].header("authorization"))

    def test_head(self) -> None:
        response = self.mirror.request(b"HEAD", f"/v2/alpine/blobs/{self.digest}")
        self.assertEqual(response.code, 200)
        self.assertEqual(header(response, b"content-length"), str(len(self.blob)))
        self.assertEqual(header(response, b"docker-content-digest"), self.digest)

    def test_pass_mode_returns_redirect(self) -> None:
        mirror = Mirror(blob_redirect="pass")
        digest = mirror.world.add_blob(self.blob)
        response = mirror.request(b"GET", f"/v2/alpine/blobs/{digest}")
        self.assertEqual(response.code, 307)
        self.assertTrue(header(response, b"location").startswith(f"https://{CDN}/data/"))
        self.assertEqual(mirror.world.hits(CDN), [])

    def test_corrupt_blob_aborts_client(self) -> None:
        """Corrupt upstream bytes never arrive as a complete response."""
        self.mirror.world.corrupt_blobs = True
        response = self.mirror.request(b"GET", f"/v2/alpine/blobs/{self.digest}")
        self.assertEqual(response.code, 200)
        result = self.mirror.body(response)
        self.assertIsInstance(result, Failure, "a corrupt blob arrived complete")
        self.assertIn("_DataLoss", str(result.value))

    def test_unknown_blob(self) -> None:
        response = self.mirror.request(b"GET", "/v2/alpine/blobs/sha256:" + "e" * 64)
        self.assertEqual(response.code, 404)
        self.assertEqual(
            json.loads(self.mirror.body(response))["errors"][0]["code"], "BLOB_UNKNOWN"
        )


class RootTests(SynchronousTestCase):
    """Outside /v2/ too, errors are JSON, not twisted.web's HTML pages."""

    def test_unknown_page(self) -> None:
        mirror = Mirror()
        response = mirror.request(b"GET", "/nope")
        self.assertEqual(response.code, 404)
        self.assertEqual(json.loads(mirror.body(response))["errors"][0]["code"], "UNSUPPORTED")

    def test_wrong_method(self) -> None:
        mirror = Mirror()
        for path in ("/", "/healthz", "/readyz", "/metrics"):
            response = mirror.request(b"PUT", path)
            self.assertEqual(response.code, 405, path)
            self.assertEqual(header(response, b"allow"), "GET, HEAD")
            self.assertIn("errors", json.loads(mirror.body(response)))

    def test_healthz(self) -> None:
        mirror = Mirror()
        response = mirror.request(b"GET", "/healthz")
        self.assertEqual((response.code, mirror.body(response)), (200, b"ok\n"))
