"""Pull every kind of image through hammal with skopeo and check every digest."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Dict, List, Tuple

from tests.integration.environment import (
    PRIVATE_PASSWORD,
    PRIVATE_USER,
    HammalProcess,
    http_get_digest,
    skopeo_pull,
)
from tests.integration.images import TestImage
from tests.integration.support import IntegrationTestCase

HAMMAL_UA = "hammal"


def _hex(digest: str) -> str:
    return digest.split(":", 1)[1]


if TYPE_CHECKING:
    _Base = IntegrationTestCase
else:
    _Base = object


class _PullTestsMixin(_Base):
    """The pull tests, run in one ``--blob-redirect`` mode by each subclass
    (a plain mixin, so trial does not collect it on its own)."""

    blob_redirect = "follow"
    hammal: HammalProcess

    def setUp(self) -> None:
        super().setUp()
        self.hammal = self.start_hammal(blob_redirect=self.blob_redirect)

    # -- checks shared by every pull -------------------------------------

    def _cdn_blob_gets(self) -> List[Dict[str, Any]]:
        return [e for e in self.env.cdn_log() if e["method"] == "GET"]

    def check_upstream_traffic(self, image: TestImage, repo: str) -> None:
        """What the token server and CDN saw for one anonymous pull."""
        diag = self.diagnostics()
        tokens = self.env.token_log()
        self.assertTrue(tokens, "hammal never asked the token server for a token")
        for entry in tokens:
            self.assertIsNone(
                entry["authorization"],
                f"hammal sent credentials to the token server though it has "
                f"none configured: {entry}",
            )
            for scope in entry["scopes"]:
                self.assertEqual(scope, f"repository:{repo}:pull", f"{entry}\n{diag}")
        cdn = self._cdn_blob_gets()
        with_auth = [e for e in self.env.cdn_log() if e["authorization"]]
        self.assertEqual(with_auth, [], f"the CDN received an Authorization header\n{diag}")
        fetched = {e["path"].rsplit("/", 2)[-2] for e in cdn}
        for digest in image.blob_digests:
            self.assertIn(
                _hex(digest), fetched, f"blob {digest} never fetched from the CDN\n{diag}"
            )
        agents = {HAMMAL_UA in (e["user_agent"] or "") for e in cdn}
        if self.blob_redirect == "follow":
            self.assertEqual(
                agents, {True}, f"follow mode: the client went to the CDN itself\n{cdn}"
            )
        else:
            self.assertEqual(agents, {False}, f"pass mode: hammal fetched blobs itself\n{cdn}")

    def pull_and_check(self, name: str, reference: str) -> TestImage:
        """Pull *name* (as the client spells it) and check content and traffic."""
        image = self.env.image(reference)
        self.pull(self.hammal.host, name, image)
        self.check_upstream_traffic(image, image.repo)
        return image

    # -- the tests ---------------------------------------------------------

    def test_short_library_name(self) -> None:
        """``alpine:3.20`` is ``library/alpine:3.20`` (Docker schema2)."""
        self.pull_and_check("alpine", "library/alpine:3.20")

    def test_full_library_name(self) -> None:
        self.pull_and_check("library/alpine", "library/alpine:3.20")

    def test_oci_manifest(self) -> None:
        self.pull_and_check("ociimg", "library/ociimg:1")

    def test_non_library_repository(self) -> None:
        self.pull_and_check("bitnami/redis", "bitnami/redis:7")

    def test_multi_arch_index_all(self) -> None:
        """``--all`` on an OCI index: the index, both children, all their blobs."""
        self.pull_and_check("library/multi", "library/multi:1")

    def test_big_layer(self) -> None:
        """A 64 MiB uncompressed layer arrives whole and verified."""
        self.pull_and_check("big", "library/big:1")

    def test_pull_by_digest(self) -> None:
        image = self.env.image("library/ociimg:1")
        self.pull(self.hammal.host, "library/ociimg", image, reference="@" + image.manifest_digest)
        self.check_upstream_traffic(image, image.repo)

    def test_second_pull_same_content(self) -> None:
        """A second pull of the same image (warm hammal) is still correct."""
        image = self.pull_and_check("alpine", "library/alpine:3.20")
        self.pull(self.hammal.host, "library/alpine", image)


class PullFollowTests(_PullTestsMixin, IntegrationTestCase):
    """``--blob-redirect follow``: hammal fetches blobs from the CDN itself."""

    blob_redirect = "follow"

    def test_blob_get_is_served_not_redirected(self) -> None:
        image = self.env.image("library/alpine:3.20")
        digest = image.blob_digests[-1]
        response = self.hammal.request("GET", f"/v2/library/alpine/blobs/{digest}")
        self.assertEqual(response.status, 200, response.describe())
        self.assertEqual(len(response.body), image.blob_sizes[digest])

    def test_concurrent_big_blob(self) -> None:
        """Four clients at once get the 64 MiB blob whole; the CDN serves it once."""
        image = self.env.image("library/big:1")
        digest = max(image.blob_digests, key=image.blob_sizes.__getitem__)
        self.assertGreater(image.blob_sizes[digest], 64 * 1024 * 1024)
        url = f"{self.hammal.url}/v2/library/big/blobs/{digest}"
        results: List[Tuple[int, str, int]] = []
        errors: List[BaseException] = []

        def fetch() -> None:
            try:
                response, got, size = http_get_digest(url, timeout=120)
                results.append((response.status, got, size))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=fetch) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        self.assertEqual(errors, [], self.diagnostics())
        self.assertEqual(results, [(200, digest, image.blob_sizes[digest])] * 4, self.diagnostics())
        gets = [e for e in self._cdn_blob_gets() if _hex(digest) in e["path"]]
        self.assertEqual(len(gets), 1, f"CDN fetches of the blob: {gets}")


class PullPassTests(_PullTestsMixin, IntegrationTestCase):
    """``--blob-redirect pass``: hammal hands the CDN redirect to the client."""

    blob_redirect = "pass"

    def test_blob_get_is_redirected_to_cdn(self) -> None:
        image = self.env.image("library/alpine:3.20")
        digest = image.blob_digests[-1]
        response = self.hammal.request("GET", f"/v2/library/alpine/blobs/{digest}")
        self.assertIn(response.status, (302, 303, 307), response.describe())
        location = response.header("Location") or ""
        self.assertTrue(
            location.startswith(self.env.cdn_url + "/docker/registry/v2/blobs/")
            and _hex(digest) in location,
            response.describe(),
        )
        followed = self.hammal.request(
            "GET", f"/v2/library/alpine/blobs/{digest}", follow_redirects=True
        )
        self.assertEqual(followed.status, 200)
        self.assertEqual(len(followed.body), image.blob_sizes[digest])


class PrivateRepositoryTests(IntegrationTestCase):
    """``private/`` repositories need hammal's upstream credentials."""

    def test_denied_without_credentials(self) -> None:
        hammal = self.start_hammal()
        image = self.env.image("private/secret:1")
        response = hammal.request(
            "GET",
            "/v2/private/secret/manifests/1",
            [("Accept", image.media_type)],
        )
        self.assertOCIError(response, 403, "DENIED")
        response = hammal.request("GET", f"/v2/private/secret/blobs/{image.blob_digests[0]}")
        self.assertOCIError(response, 403, "DENIED")
        dest = self.make_dir()
        result = skopeo_pull(f"{hammal.host}/private/secret:1", dest)
        self.assertNotEqual(result.returncode, 0, result.stdout)
        for entry in self.env.token_log():
            self.assertIsNone(entry["authorization"], entry)
        # Nothing of the image leaked through the CDN either.
        self.assertEqual(self.env.cdn_log(), [])

    def _with_credentials(self, blob_redirect: str) -> None:
        hammal = self.start_hammal(
            blob_redirect=blob_redirect,
            upstream_username=PRIVATE_USER,
            upstream_password=PRIVATE_PASSWORD,
        )
        image = self.env.image("private/secret:1")
        self.pull(hammal.host, "private/secret", image)
        # Public images still work with credentials configured.
        self.pull(hammal.host, "alpine", self.env.image("library/alpine:3.20"))
        tokens = self.env.token_log()
        self.assertTrue(tokens)
        for entry in tokens:
            self.assertEqual(
                (entry["authorization"], entry["user"], entry["status"]),
                ("basic", PRIVATE_USER, 200),
                f"token request without hammal's credentials: {entry}",
            )
        cdn = self.env.cdn_log()
        self.assertTrue(cdn)
        self.assertEqual(
            [e for e in cdn if e["authorization"]], [], "the CDN received an Authorization header"
        )
        self.assertNotIn(PRIVATE_PASSWORD, hammal.log_text(), "hammal logged the upstream password")

    def test_pull_with_credentials_follow(self) -> None:
        self._with_credentials("follow")

    def test_pull_with_credentials_pass(self) -> None:
        self._with_credentials("pass")

    def test_wrong_credentials(self) -> None:
        """A wrong upstream password is not reported as success or as 404."""
        hammal = self.start_hammal(
            upstream_username=PRIVATE_USER,
            upstream_password="not-the-password",
        )
        response = hammal.request(
            "GET",
            "/v2/private/secret/manifests/1",
            [("Accept", self.env.image("private/secret:1").media_type)],
        )
        self.assertIn(response.status, (401, 403, 502), response.describe())
        self.assertIn("errors", response.json())
