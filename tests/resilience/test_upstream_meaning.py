"""Every response is what upstream meant: answers hammal cannot vouch for
are passed on but never cached.

The upstream is :class:`tests.resilience.upstream.FaultyRegistry` over real
TCP on 127.0.0.1.
"""

from __future__ import annotations

from tests.integration.environment import HTTPResponse, http_request
from tests.resilience.support import get_blob, sha256
from tests.resilience.test_upstream_faults import _FaultCase
from tests.resilience.upstream import OCI_MANIFEST, Image


class UnverifiableManifestTests(_FaultCase):
    """A manifest by tag with neither a digest nor a length."""

    def manifest(self, image: Image) -> HTTPResponse:
        return http_request(
            "GET",
            f"{self.sandbox.hammal.url}/v2/{image.name}/manifests/latest",
            [("Accept", OCI_MANIFEST)],
            timeout=20,
        )

    def manifest_gets(self, image: Image) -> int:
        return len(
            [e for e in self.registry.entries(f"{image.name}/manifests/") if e.method == "GET"]
        )

    def test_truncated_by_close_is_not_cached(self) -> None:
        """
        A body cut short by a connection close, with nothing to tell: the
        client gets what came (hammal cannot know better), but it is not
        cached; the next pull asks upstream again and gets it whole.
        """
        img = self.image((4096,))
        self.registry.add_fault(
            "no-length",
            f"{img.name}/manifests/",
            count=1,
            after=len(img.manifest) // 2,
            method="GET",
        )
        first = self.manifest(img)
        self.assertEqual(first.status, 200, first.describe())
        self.assertEqual(first.body, img.manifest[: len(img.manifest) // 2])
        second = self.manifest(img)
        self.assertEqual(second.status, 200, second.describe())
        self.assertEqual(sha256(second.body), img.digest)
        self.assertEqual(second.header("Docker-Content-Digest"), img.digest)
        self.assertEqual(self.manifest_gets(img), 2, "the unverifiable answer was cached")
        # the verified answer is cached, as usual
        self.assertEqual(sha256(self.manifest(img).body), img.digest)
        self.assertEqual(self.manifest_gets(img), 2)

    def test_whole_but_unverifiable_is_not_cached(self) -> None:
        img = self.image((4096,))
        self.registry.add_fault(
            "no-length", f"{img.name}/manifests/", count=1, after=-1, method="GET"
        )
        first = self.manifest(img)
        self.assertEqual(first.status, 200, first.describe())
        self.assertEqual(sha256(first.body), img.digest)
        self.assertEqual(sha256(self.manifest(img).body), img.digest)
        self.assertEqual(self.manifest_gets(img), 2)


class ConditionalTests(_FaultCase):
    """
    ``If-None-Match`` is answered by hammal from the digest; it never goes
    out on shared upstream work (this upstream answers it with ``304``, as
    Distribution does).
    """

    def test_manifest_if_none_match(self) -> None:
        img = self.image((4096,))
        url = f"{self.sandbox.hammal.url}/v2/{img.name}/manifests/latest"
        tag = f'"{img.digest}"'
        for _ in range(2):  # cold, then cached
            resp = http_request(
                "GET", url, [("Accept", OCI_MANIFEST), ("If-None-Match", tag)], timeout=20
            )
            self.assertEqual(resp.status, 304, resp.describe())
            self.assertEqual(resp.header("ETag"), tag)
            self.assertEqual(resp.body, b"")
        resp = http_request("GET", url, [("Accept", OCI_MANIFEST)], timeout=20)
        self.assertEqual(resp.status, 200, resp.describe())
        self.assertEqual(sha256(resp.body), img.digest)
        self.assertEqual(resp.header("ETag"), tag)
        for entry in self.registry.entries(img.name):
            self.assertNotIn("if-none-match", entry.headers)

    def test_blob_if_none_match_does_not_fail_the_fill(self) -> None:
        """
        The client naming the blob's tag gets a 304; the fill it started
        goes on without the condition, and the next client gets every byte
        from one upstream fetch.
        """
        img = self.image((512 * 1024,))
        digest = img.layers[0].digest
        resp = get_blob(
            self.sandbox.hammal.port,
            img.name,
            digest,
            headers=[("If-None-Match", f'"{digest}"')],
            timeout=20,
        )
        self.assertEqual(resp.status, 304, f"{resp.status} {resp.body[:300]!r}")
        self.assertExact(self.pull(img), img)
        gets = self.blob_requests(img)
        self.assertEqual(len(gets), 1, gets)
        self.assertNotIn("if-none-match", gets[0].headers)
