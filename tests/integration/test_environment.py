"""The integration upstream itself behaves like Docker Hub (no hammal here).

If these fail, the hammal tests' failures mean nothing: fix the harness first.
"""

from __future__ import annotations

import base64
import json
import urllib.parse
from typing import Any, Dict, Tuple

from tests.integration.environment import (
    PRIVATE_PASSWORD,
    PRIVATE_USER,
    REGISTRY_SERVICE,
    HTTPResponse,
    http_request,
    skopeo_pull,
)
from tests.integration.images import (
    BIG_LAYER_FILE_SIZE,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_LAYER_TAR,
    OCI_MANIFEST,
)
from tests.integration.support import IntegrationTestCase


class DirectPullTests(IntegrationTestCase):
    """skopeo pulls every seeded image straight from the token-auth registry."""

    def _direct(self, reference: str, creds: bool = False) -> None:
        image = self.env.image(reference)
        self.pull(
            self.env.registry_host,
            image.repo,
            image,
            creds=(PRIVATE_USER, PRIVATE_PASSWORD) if creds else None,
        )
        # Every blob went through the CDN redirect, without credentials.
        cdn = [e for e in self.env.cdn_log() if e["method"] == "GET"]
        fetched = {e["path"].rsplit("/", 2)[-2] for e in cdn}
        for digest in image.blob_digests:
            self.assertIn(digest.split(":")[1], fetched, f"{digest} not via CDN")
        self.assertFalse([e for e in cdn if e["authorization"]], cdn)
        # The token server saw the expected callers.
        tokens = self.env.token_log()
        self.assertTrue(tokens)
        for entry in tokens:
            self.assertEqual(entry["status"], 200, entry)
            self.assertEqual(entry["query"].get("service"), [REGISTRY_SERVICE])
            if creds:
                self.assertEqual(entry["user"], PRIVATE_USER)
            else:
                self.assertIsNone(entry["authorization"], entry)

    def test_docker_schema2(self) -> None:
        self.assertEqual(self.env.image("library/alpine:3.20").media_type, DOCKER_MANIFEST)
        self._direct("library/alpine:3.20")

    def test_oci_manifest(self) -> None:
        self.assertEqual(self.env.image("library/ociimg:1").media_type, OCI_MANIFEST)
        self._direct("library/ociimg:1")

    def test_oci_index_all_platforms(self) -> None:
        image = self.env.image("library/multi:1")
        self.assertEqual(image.media_type, OCI_INDEX)
        self.assertEqual(
            sorted(c.platform["architecture"] for c in image.children),
            ["amd64", "arm64"],
        )
        self._direct("library/multi:1")

    def test_non_library_repository(self) -> None:
        self._direct("bitnami/redis:7")

    def test_big_layer(self) -> None:
        image = self.env.image("library/big:1")
        manifest = json.loads(image.manifest_bytes)
        big = manifest["layers"][0]
        self.assertEqual(big["mediaType"], OCI_LAYER_TAR)
        self.assertGreater(big["size"], BIG_LAYER_FILE_SIZE)
        self._direct("library/big:1")

    def test_private_with_credentials(self) -> None:
        self._direct("private/secret:1", creds=True)

    def test_private_without_credentials_fails(self) -> None:
        dest = self.make_dir()
        result = skopeo_pull(f"{self.env.registry_host}/private/secret:1", dest)
        self.assertNotEqual(result.returncode, 0, result.stderr)
        response = self.env.upstream_request("GET", "private/secret", "manifests", "1")
        self.assertEqual(response.status, 401, response.describe())
        self.assertIn('error="insufficient_scope"', response.header("WWW-Authenticate") or "")


class UpstreamBehaviourTests(IntegrationTestCase):
    """The quirks hammal must cope with are really there."""

    def test_anonymous_challenge(self) -> None:
        response = http_request("GET", self.env.registry_url + "/v2/library/alpine/manifests/3.20")
        self.assertEqual(response.status, 401)
        challenge = response.header("WWW-Authenticate") or ""
        self.assertIn(f'realm="{self.env.realm}"', challenge)
        self.assertIn(f'service="{REGISTRY_SERVICE}"', challenge)
        self.assertIn('scope="repository:library/alpine:pull"', challenge)

    def test_manifest_headers(self) -> None:
        image = self.env.image("library/ociimg:1")
        for method in ("GET", "HEAD"):
            response = self.env.upstream_request(method, image.repo, "manifests", image.tag)
            self.assertEqual(response.status, 200, response.describe())
            self.assertEqual(response.header("Content-Type"), OCI_MANIFEST)
            self.assertEqual(response.header("Docker-Content-Digest"), image.manifest_digest)
            self.assertEqual(
                int(response.header("Content-Length") or -1), len(image.manifest_bytes)
            )

    def test_schema2_without_accept_is_converted(self) -> None:
        image = self.env.image("library/alpine:3.20")
        response = self.env.upstream_request("GET", image.repo, "manifests", image.tag, accept=())
        self.assertEqual(response.status, 200, response.describe())
        self.assertNotEqual(response.header("Docker-Content-Digest"), image.manifest_digest)

    def test_oci_without_accept_is_404(self) -> None:
        response = self.env.upstream_request(
            "GET", "library/ociimg", "manifests", "1", accept=(DOCKER_MANIFEST,)
        )
        self.assertEqual(response.status, 404, response.describe())
        self.assertEqual(response.json()["errors"][0]["code"], "MANIFEST_UNKNOWN")

    def test_blob_redirects_to_cdn(self) -> None:
        image = self.env.image("library/alpine:3.20")
        digest = image.blob_digests[-1]
        for method in ("GET", "HEAD"):
            response = self.env.upstream_request(method, image.repo, "blobs", digest)
            self.assertEqual(response.status, 307, response.describe())
            location = response.header("Location") or ""
            hexd = digest.split(":")[1]
            self.assertEqual(
                location,
                f"{self.env.cdn_url}/docker/registry/v2/blobs/sha256/{hexd[:2]}/{hexd}/data",
            )
        followed = self.env.upstream_request(
            "GET", image.repo, "blobs", digest, follow_redirects=True
        )
        self.assertEqual(followed.status, 200)
        self.assertEqual(len(followed.body), image.blob_sizes[digest])

    def test_cdn_range(self) -> None:
        image = self.env.image("library/big:1")
        digest = image.blob_digests[1]
        hexd = digest.split(":")[1]
        url = f"{self.env.cdn_url}/docker/registry/v2/blobs/sha256/{hexd[:2]}/{hexd}/data"
        full = http_request("GET", url)
        part = http_request("GET", url, [("Range", "bytes=100-199"), ("Authorization", "Bearer x")])
        self.assertEqual(part.status, 206)
        self.assertEqual(part.body, full.body[100:200])
        log = self.env.cdn_log()
        self.assertEqual([e["range"] for e in log], [None, "bytes=100-199"])
        self.assertEqual([e["authorization"] for e in log], [False, True])
        listing = http_request("GET", f"{self.env.cdn_url}/docker/registry/v2/blobs/")
        self.assertEqual(listing.status, 403)

    def test_unknown_tag(self) -> None:
        response = self.env.upstream_request("GET", "library/alpine", "manifests", "nope")
        self.assertEqual(response.status, 404)
        self.assertEqual(response.json()["errors"][0]["code"], "MANIFEST_UNKNOWN")


class TokenServerTests(IntegrationTestCase):
    """The auth.docker.io look-alike."""

    def _token(self, scope: str, creds: Tuple[str, ...] = ()) -> HTTPResponse:
        query = urllib.parse.urlencode({"service": REGISTRY_SERVICE, "scope": scope})
        headers = []
        if creds:
            raw = base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
            headers.append(("Authorization", "Basic " + raw))
        return http_request("GET", f"{self.env.realm}?{query}", headers)

    @staticmethod
    def _claims(token: str) -> Dict[str, Any]:
        payload = token.split(".")[1]
        return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))

    def test_token_shape(self) -> None:
        response = self._token("repository:library/alpine:pull")
        self.assertEqual(response.status, 200)
        body = response.json()
        self.assertEqual(set(body), {"token", "access_token", "expires_in", "issued_at"})
        self.assertEqual(body["expires_in"], 300)
        self.assertEqual(body["token"], body["access_token"])
        head = json.loads(base64.urlsafe_b64decode(body["token"].split(".")[0] + "=="))
        self.assertEqual(head["alg"], "RS256")
        self.assertEqual(len(head["x5c"]), 1)
        claims = self._claims(body["token"])
        self.assertEqual(claims["aud"], REGISTRY_SERVICE)
        self.assertEqual(
            claims["access"],
            [{"type": "repository", "name": "library/alpine", "actions": ["pull"]}],
        )

    def test_private_grants(self) -> None:
        anon = self._claims(self._token("repository:private/secret:pull").json()["token"])
        self.assertEqual(anon["access"][0]["actions"], [])
        user = self._claims(
            self._token(
                "repository:private/secret:pull,push", (PRIVATE_USER, PRIVATE_PASSWORD)
            ).json()["token"]
        )
        self.assertEqual(user["access"][0]["actions"], ["pull"])
        self.assertEqual(user["sub"], PRIVATE_USER)
        bad = self._token("repository:private/secret:pull", (PRIVATE_USER, "wrong"))
        self.assertEqual(bad.status, 401)
        log = self.env.token_log()
        self.assertEqual([e["authorization"] for e in log], [None, "basic", "basic"])
        self.assertEqual([e["status"] for e in log], [200, 200, 401])

    def test_rate_limit(self) -> None:
        self.env.set_ratelimit(True)
        try:
            limited = self._token("repository:library/alpine:pull")
        finally:
            self.env.set_ratelimit(False)
        self.assertEqual(limited.status, 429)
        self.assertEqual(limited.header("Retry-After"), "60")
        self.assertEqual(limited.json()["errors"][0]["code"], "TOOMANYREQUESTS")
        self.assertEqual(self._token("repository:library/alpine:pull").status, 200)


class RedisControlTests(IntegrationTestCase):
    """The redis server can be killed and restarted on the same port."""

    def test_kill_and_restart(self) -> None:
        redis = self.env.redis
        self.assertTrue(redis.ping())
        port = redis.port
        redis.kill()
        self.assertFalse(redis.ping())
        redis.restart()
        self.assertEqual(redis.port, port)
        self.assertTrue(redis.ping())
