"""
Tests for OCI 1.1 referrers (L{hammal.pull.referrers}) through the ``/v2/``
resource, against a fake upstream with and without the referrers API; and
cosign-style signature tags.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Request

from hammal.errors import DigestInvalid
from hammal.pull.referrers import fallback_tag
from hammal.reference import Digest
from hammal.web.routes import Route, RouteKind, parse_route
from tests.fakes import REGISTRY, FakeUpstream, sha256
from tests.test_v2 import Mirror, header

INDEX = "application/vnd.oci.image.index.v1+json"
SBOM = "application/vnd.example.sbom+json"
SIGNATURE = "application/vnd.dev.cosign.artifact.sig.v1+json"


def descriptor(artifact_type: str, n: int) -> dict[str, Any]:
    return {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": sha256(b"artifact-%d" % n),
        "size": 100 + n,
        "artifactType": artifact_type,
    }


class ReferrersUpstream(FakeUpstream):
    """L{FakeUpstream} that may offer the referrers API (C{api} set)."""

    def __init__(self) -> None:
        super().__init__()
        self.api: dict[str, list[dict[str, Any]]] | None = None

    def _registry(self, request: Request) -> Any:
        path = request.path.decode()
        if self.faults:
            return super()._registry(request)
        if self.api is not None and "/referrers/" in path and self._authorised(request):
            digest = path.rpartition("/referrers/")[2]
            manifests = self.api.get(digest, [])
            wanted = (request.args or {}).get(b"artifactType")
            if wanted:
                manifests = [m for m in manifests if m["artifactType"] == wanted[0].decode()]
                request.setHeader(b"oci-filters-applied", b"artifactType")
            return self._json(
                request, 200, {"schemaVersion": 2, "mediaType": INDEX, "manifests": manifests}
            )
        return super()._registry(request)


class RouteTests(SynchronousTestCase):
    def test_referrers_route(self) -> None:
        digest = sha256(b"subject")
        route = parse_route(f"/v2/library/alpine/referrers/{digest}".encode())
        self.assertEqual(route, Route(RouteKind.REFERRERS, "library/alpine", Digest.parse(digest)))
        self.assertRaises(DigestInvalid, parse_route, b"/v2/alpine/referrers/latest")

    def test_fallback_tag(self) -> None:
        digest = sha256(b"subject")
        self.assertEqual(fallback_tag(Digest.parse(digest)), "sha256-" + digest.split(":")[1])


class ReferrersTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.world = ReferrersUpstream()
        self.subject = self.world.add_image("library/alpine", "3.20", b'{"schemaVersion":2}')
        self.mirror = Mirror(cache_dir=self.mktemp(), world=self.world)

    def get(self, query: str = "", name: str = "alpine") -> tuple[Any, Any]:
        response = self.mirror.request(b"GET", f"/v2/{name}/referrers/{self.subject}{query}")
        body = self.mirror.body(response)
        return response, json.loads(body) if body else None

    def push_fallback_index(self, *descriptors: dict[str, Any]) -> None:
        body = json.dumps(
            {"schemaVersion": 2, "mediaType": INDEX, "manifests": list(descriptors)}
        ).encode()
        self.world.add_image("library/alpine", "sha256-" + self.subject.split(":")[1], body, INDEX)

    def test_tag_schema_fallback(self) -> None:
        """Upstream without the API: the ``sha256-<hex>`` tag's index is the answer."""
        sbom, sig = descriptor(SBOM, 1), descriptor(SIGNATURE, 2)
        self.push_fallback_index(sbom, sig)
        response, index = self.get()
        self.assertEqual(response.code, 200)
        self.assertEqual(header(response, b"content-type"), INDEX)
        self.assertEqual(index["mediaType"], INDEX)
        self.assertEqual(index["manifests"], [sbom, sig])
        self.assertIsNone(header(response, b"oci-filters-applied"))
        tag_requests = self.world.hits(REGISTRY, "/manifests/sha256-")
        self.assertTrue(tag_requests)
        self.assertIn(INDEX, tag_requests[-1].header("accept") or "")

    def test_artifact_type_filter(self) -> None:
        sbom, sig = descriptor(SBOM, 1), descriptor(SIGNATURE, 2)
        self.push_fallback_index(sbom, sig)
        response, index = self.get("?" + urlencode({"artifactType": SBOM}))
        self.assertEqual(index["manifests"], [sbom])
        self.assertEqual(header(response, b"oci-filters-applied"), "artifactType")

    def test_nothing_refers_is_an_empty_index(self) -> None:
        """The API never answers 404 for a well-formed request."""
        response, index = self.get()
        self.assertEqual(response.code, 200)
        self.assertEqual(index, {"schemaVersion": 2, "mediaType": INDEX, "manifests": []})

    def test_upstream_api_used_when_offered(self) -> None:
        sbom, sig = descriptor(SBOM, 1), descriptor(SIGNATURE, 2)
        self.world.api = {self.subject: [sbom, sig]}
        response, index = self.get("?" + urlencode({"artifactType": SIGNATURE}))
        self.assertEqual(index["manifests"], [sig])
        self.assertEqual(header(response, b"oci-filters-applied"), "artifactType")
        asked = self.world.hits(REGISTRY, "/referrers/")[-1]
        self.assertIn("/v2/library/alpine/referrers/", asked.path)
        self.assertIn("artifactType=application%2Fvnd.dev.cosign", asked.path)
        self.assertEqual(self.world.hits(REGISTRY, "/manifests/sha256-"), [])

    def test_cached_then_stale_if_error(self) -> None:
        self.world.api = {self.subject: [descriptor(SBOM, 1)]}
        first, _ = self.get()
        self.assertEqual(header(first, b"cache-status"), "hammal; fwd=miss")
        asked = len(self.world.hits(REGISTRY, "/referrers/"))
        second, index = self.get()
        self.assertEqual(header(second, b"cache-status"), "hammal; hit")
        self.assertEqual(len(self.world.hits(REGISTRY, "/referrers/")), asked)
        self.mirror.clock.advance(301)
        # Rate-limited upstream (Retry-After too long to wait): the kept answer serves.
        self.world.faults = [429, 429]
        self.world.retry_after = "600"
        stale, stale_index = self.get()
        self.assertEqual(stale.code, 200)
        self.assertEqual(stale_index, index)
        self.assertIn("stale-if-error", header(stale, b"cache-status") or "")
        self.assertIsNotNone(header(stale, b"warning"))
        self.mirror.clock.advance(3600)
        self.world.faults = [429, 429]
        gone, _ = self.get()
        self.assertEqual(gone.code, 429)

    def test_bad_digest_is_400(self) -> None:
        response = self.mirror.request(b"GET", "/v2/alpine/referrers/sha256:abc")
        self.assertEqual(response.code, 400)
        errors = json.loads(self.mirror.body(response))["errors"]
        self.assertEqual(errors[0]["code"], "DIGEST_INVALID")


class SignatureTagTests(SynchronousTestCase):
    def test_cosign_signature_tag_pulls_like_any_tag(self) -> None:
        mirror = Mirror()
        subject = mirror.world.add_image("library/alpine", "3.20", b'{"schemaVersion":2}')
        tag = "sha256-" + subject.split(":")[1] + ".sig"
        signature = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}'
        digest = mirror.world.add_image(
            "library/alpine", tag, signature, "application/vnd.oci.image.manifest.v1+json"
        )
        response = mirror.request(
            b"GET",
            f"/v2/alpine/manifests/{tag}",
            {b"accept": [b"application/vnd.oci.image.manifest.v1+json"]},
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(mirror.body(response), signature)
        self.assertEqual(header(response, b"docker-content-digest"), digest)
