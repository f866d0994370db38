"""hammal's response headers match what the upstream registry sends."""

from __future__ import annotations

from typing import List, Sequence, Tuple

from tests.integration.environment import HammalProcess, HTTPResponse
from tests.integration.images import (
    ALL_MANIFEST_TYPES,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    TestImage,
    sha256_digest,
)
from tests.integration.support import IntegrationTestCase

MANIFEST_HEADERS = ("Content-Type", "Content-Length", "Docker-Content-Digest")


def _accept(types: Sequence[str]) -> List[Tuple[str, str]]:
    return [("Accept", t) for t in types]


class ManifestHeaderTests(IntegrationTestCase):
    """HEAD and GET of manifests, by tag and by digest, cold and warm."""

    hammal: HammalProcess

    def setUp(self) -> None:
        super().setUp()
        self.hammal = self.start_hammal()

    def _compare(self, image: TestImage, reference: str) -> None:
        upstream = self.env.upstream_request("HEAD", image.repo, "manifests", reference)
        self.assertEqual(upstream.status, 200, upstream.describe())
        path = f"/v2/{image.repo}/manifests/{reference}"
        # HEAD cold, GET, HEAD warm: all must agree with upstream.
        for method in ("HEAD", "GET", "HEAD"):
            mine = self.hammal.request(method, path, _accept(ALL_MANIFEST_TYPES))
            context = f"\nhammal: {mine.describe()}\nupstream: {upstream.describe()}"
            self.assertEqual(mine.status, 200, f"{method} {path}{context}\n{self.diagnostics()}")
            for name in MANIFEST_HEADERS:
                self.assertEqual(
                    mine.header(name),
                    upstream.header(name),
                    f"{method} {path}: {name} differs{context}",
                )
            self.assertEqual(mine.header("Docker-Content-Digest"), image.manifest_digest)
            if method == "GET":
                self.assertEqual(mine.body, image.manifest_bytes, context)
            else:
                self.assertEqual(mine.body, b"", f"HEAD with a body{context}")

    def test_docker_schema2_by_tag(self) -> None:
        self._compare(self.env.image("library/alpine:3.20"), "3.20")

    def test_docker_schema2_by_digest(self) -> None:
        image = self.env.image("library/alpine:3.20")
        self._compare(image, image.manifest_digest)

    def test_oci_manifest_by_tag(self) -> None:
        self._compare(self.env.image("library/ociimg:1"), "1")

    def test_oci_manifest_by_digest(self) -> None:
        image = self.env.image("library/ociimg:1")
        self._compare(image, image.manifest_digest)

    def test_oci_index_by_tag(self) -> None:
        self._compare(self.env.image("library/multi:1"), "1")

    def test_oci_index_child_by_digest(self) -> None:
        image = self.env.image("library/multi:1")
        child = image.children[1]
        upstream = self.env.upstream_request("GET", image.repo, "manifests", child.digest)
        mine = self.hammal.request(
            "GET", f"/v2/{image.repo}/manifests/{child.digest}", _accept(ALL_MANIFEST_TYPES)
        )
        self.assertEqual(mine.status, 200, mine.describe())
        self.assertEqual(mine.body, upstream.body)
        self.assertEqual(sha256_digest(mine.body), child.digest)
        for name in MANIFEST_HEADERS:
            self.assertEqual(mine.header(name), upstream.header(name), name)

    def test_short_name_head(self) -> None:
        """``HEAD /v2/alpine/manifests/3.20`` answers for ``library/alpine``."""
        image = self.env.image("library/alpine:3.20")
        mine = self.hammal.request("HEAD", "/v2/alpine/manifests/3.20", _accept(ALL_MANIFEST_TYPES))
        self.assertEqual(mine.status, 200, mine.describe())
        self.assertEqual(mine.header("Docker-Content-Digest"), image.manifest_digest)
        self.assertEqual(mine.header("Content-Type"), DOCKER_MANIFEST)

    def test_containerd_style_head(self) -> None:
        """containerd: HEAD by tag with ``?ns=<registry>`` and ``*/*`` in Accept.

        (``ns`` names the upstream registry: here ``127.0.0.1:PORT``, since
        hammal only takes ``docker.io`` for an upstream that is Docker Hub.)
        """
        image = self.env.image("library/ociimg:1")
        accept = ", ".join([DOCKER_MANIFEST, DOCKER_LIST, OCI_MANIFEST, OCI_INDEX, "*/*"])
        mine = self.hammal.request(
            "HEAD",
            f"/v2/library/ociimg/manifests/1?ns={self.env.registry_host}",
            [("Accept", accept)],
        )
        self.assertEqual(mine.status, 200, mine.describe())
        self.assertEqual(mine.header("Docker-Content-Digest"), image.manifest_digest)
        self.assertEqual(int(mine.header("Content-Length") or -1), len(image.manifest_bytes))

    def test_podman_style_separate_accept_headers(self) -> None:
        """Six separate Accept headers: every one must reach upstream, or a
        schema2 image comes back converted to schema1 with another digest."""
        image = self.env.image("library/alpine:3.20")
        headers = [
            ("Accept", t)
            for t in (
                "application/vnd.oci.image.index.v1+json",
                "application/vnd.oci.image.manifest.v1+json",
                DOCKER_LIST,
                DOCKER_MANIFEST,
                "application/vnd.docker.distribution.manifest.v1+prettyjws",
                "application/vnd.docker.distribution.manifest.v1+json",
            )
        ]
        mine = self.hammal.request("GET", "/v2/library/alpine/manifests/3.20", headers)
        self.assertEqual(mine.status, 200, mine.describe())
        self.assertEqual(
            mine.header("Docker-Content-Digest"), image.manifest_digest, mine.describe()
        )
        self.assertEqual(mine.body, image.manifest_bytes)

    def test_negotiated_404_is_not_cached(self) -> None:
        """An OCI manifest asked for with Docker types only is a 404 upstream;
        that must not make the tag unknown for a client that accepts OCI."""
        image = self.env.image("library/ociimg:1")
        path = "/v2/library/ociimg/manifests/1"
        self.hammal.request("GET", path, _accept([DOCKER_MANIFEST]))
        mine = self.hammal.request("GET", path, _accept([OCI_MANIFEST, DOCKER_MANIFEST]))
        self.assertEqual(mine.status, 200, mine.describe())
        self.assertEqual(mine.header("Docker-Content-Digest"), image.manifest_digest)

    def test_tags_list(self) -> None:
        for path in ("/v2/library/alpine/tags/list", "/v2/alpine/tags/list"):
            mine = self.hammal.request("GET", path)
            self.assertEqual(mine.status, 200, mine.describe())
            body = mine.json()
            self.assertEqual(body.get("tags"), ["3.20"], mine.describe())
            self.assertEqual(body.get("name"), "library/alpine", mine.describe())


class BlobHeaderTests(IntegrationTestCase):
    """HEAD and ranged GET of blobs through hammal (follow mode)."""

    hammal: HammalProcess

    def setUp(self) -> None:
        super().setUp()
        self.hammal = self.start_hammal(blob_redirect="follow")

    def _upstream(self, image: TestImage, digest: str, method: str) -> HTTPResponse:
        """What a client gets from upstream directly (redirect followed)."""
        response = self.env.upstream_request(
            method, image.repo, "blobs", digest, follow_redirects=True
        )
        self.assertEqual(response.status, 200, response.describe())
        return response

    def test_head_blob(self) -> None:
        image = self.env.image("library/alpine:3.20")
        digest = image.blob_digests[0]
        upstream = self._upstream(image, digest, "HEAD")
        path = f"/v2/library/alpine/blobs/{digest}"
        # cold HEAD, GET (fills any cache), warm HEAD
        for method in ("HEAD", "GET", "HEAD"):
            mine = self.hammal.request(method, path)
            context = f"\nhammal: {mine.describe()}\nupstream: {upstream.describe()}"
            self.assertEqual(mine.status, 200, f"{method}{context}\n{self.diagnostics()}")
            self.assertEqual(
                mine.header("Content-Length"), upstream.header("Content-Length"), context
            )
            self.assertEqual(int(mine.header("Content-Length") or -1), image.blob_sizes[digest])
            self.assertEqual(mine.header("Content-Type"), upstream.header("Content-Type"), context)
            self.assertEqual(mine.header("Docker-Content-Digest"), digest, context)
            if method == "HEAD":
                self.assertEqual(mine.body, b"", context)
            else:
                self.assertEqual(sha256_digest(mine.body), digest)

    def test_unknown_blob(self) -> None:
        digest = "sha256:" + "0" * 64
        for method in ("GET", "HEAD"):
            mine = self.hammal.request(method, f"/v2/library/alpine/blobs/{digest}")
            self.assertEqual(mine.status, 404, mine.describe())
        mine = self.hammal.request("GET", f"/v2/library/alpine/blobs/{digest}")
        self.assertOCIError(mine, 404, "BLOB_UNKNOWN")

    def test_range_resume(self) -> None:
        """containerd resumes with ``Range: bytes=N-`` and wants 206."""
        image = self.env.image("library/ociimg:1")
        digest = max(image.blob_digests, key=image.blob_sizes.__getitem__)
        size = image.blob_sizes[digest]
        path = f"/v2/library/ociimg/blobs/{digest}"
        full = self.hammal.request("GET", path)
        self.assertEqual(full.status, 200, full.describe())
        for _ in range(2):  # cold or warm, the same answer
            part = self.hammal.request("GET", path, [("Range", "bytes=1000-")])
            self.assertEqual(part.status, 206, part.describe())
            self.assertEqual(part.header("Content-Range"), f"bytes 1000-{size - 1}/{size}")
            self.assertEqual(part.body, full.body[1000:])
