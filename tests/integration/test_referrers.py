"""What clients expect of a registry today (issue 13): OCI 1.1 referrers and
cosign-style signature tags, through hammal from the real upstream.

Distribution 2.8 has no referrers API (its ``/referrers/`` answers ``404``),
so, as oras and cosign do against such registries, the test pushes an
artifact whose ``subject`` is an image, and the referrers tag schema's
``sha256-<hex>`` index listing it; plus a signature under cosign's
``sha256-<hex>.sig`` tag. Pushes go through an auth-less registry process on
the upstream's storage, into a repository of their own (``library/signed``)
so that no other test sees them.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import urllib.parse
from typing import Any, Dict, Optional, Tuple

from tests.integration.environment import http_request, skopeo_pull
from tests.integration.support import file_sha256
from tests.integration.test_access import fetch, launch_hammal
from tests.integration.test_routing import _RoutingTestCase

REPO = "library/signed"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
EMPTY = "application/vnd.oci.empty.v1+json"
SBOM = "application/vnd.example.sbom.v1+json"
SIGNATURE_LAYER = "application/vnd.dev.cosign.simplesigning.v1+json"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _layer() -> bytes:
    """A deterministic gzip'd tar holding one file."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        content = b"signed by the hammal tests\n"
        info = tarfile.TarInfo("hello.txt")
        info.size, info.mtime = len(content), 0
        tar.addfile(info, io.BytesIO(content))
    return gzip.compress(raw.getvalue(), mtime=0)


def _json(document: Dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


class Pusher:
    """Pushes blobs and manifests to an auth-less registry."""

    def __init__(self, url: str) -> None:
        self.url = url

    def blob(self, data: bytes) -> Dict[str, Any]:
        digest = _digest(data)
        started = http_request("POST", f"{self.url}/v2/{REPO}/blobs/uploads/")
        assert started.status == 202, started.describe()
        location = urllib.parse.urljoin(self.url, started.header("Location") or "")
        separator = "&" if "?" in location else "?"
        done = http_request(
            "PUT",
            f"{location}{separator}digest={digest}",
            [("Content-Type", "application/octet-stream")],
            data,
        )
        assert done.status == 201, done.describe()
        return {"digest": digest, "size": len(data)}

    def manifest(self, reference: Optional[str], document: Dict[str, Any]) -> Tuple[str, bytes]:
        """PUT a manifest under tag *reference*, or by its digest (``None``)."""
        body = _json(document)
        reference = reference or _digest(body)
        put = http_request(
            "PUT",
            f"{self.url}/v2/{REPO}/manifests/{reference}",
            [("Content-Type", document["mediaType"])],
            body,
        )
        assert put.status == 201, put.describe()
        return _digest(body), body


class ReferrersTests(_RoutingTestCase):
    def setUp(self) -> None:
        super().setUp()
        plain, url = self.start_plain_registry()
        push = Pusher(url)
        layer = push.blob(_layer())
        config = push.blob(
            _json(
                {
                    "architecture": "amd64",
                    "os": "linux",
                    "rootfs": {"type": "layers", "diff_ids": [_digest(gzip.decompress(_layer()))]},
                }
            )
        )
        self.subject, subject_body = push.manifest(
            "1",
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, **config},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **layer}],
            },
        )
        subject = {"mediaType": OCI_MANIFEST, "digest": self.subject, "size": len(subject_body)}
        empty = push.blob(b"{}")
        sbom = push.blob(b'{"packages":["hello"]}')
        self.sbom, sbom_body = push.manifest(
            None,
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "artifactType": SBOM,
                "config": {"mediaType": EMPTY, **empty},
                "layers": [{"mediaType": "application/json", **sbom}],
                "subject": subject,
            },
        )
        self.sbom_descriptor = {
            "mediaType": OCI_MANIFEST,
            "digest": self.sbom,
            "size": len(sbom_body),
            "artifactType": SBOM,
        }
        hex_ = self.subject.split(":", 1)[1]
        push.manifest(
            f"sha256-{hex_}",
            {
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [self.sbom_descriptor],
            },
        )
        payload = push.blob(
            _json({"critical": {"image": {"docker-manifest-digest": self.subject}}})
        )
        self.signature_tag = f"sha256-{hex_}.sig"
        self.signature, _ = push.manifest(
            self.signature_tag,
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, **config},
                "layers": [
                    {
                        "mediaType": SIGNATURE_LAYER,
                        **payload,
                        "annotations": {"dev.cosignproject.cosign/signature": "MEUCIQ=="},
                    }
                ],
            },
        )
        plain.stop()
        self.hammal = launch_hammal(self)

    def referrers(self, artifact_type: Optional[str] = None) -> Any:
        query = (
            "?" + urllib.parse.urlencode({"artifactType": artifact_type}) if artifact_type else ""
        )
        return fetch(f"{self.hammal.url}/v2/{REPO}/referrers/{self.subject}{query}")

    def test_upstream_without_api_answers_from_tag_schema(self) -> None:
        registry = self.env_registry_log()
        response = self.referrers()
        self.assertEqual(response.status, 200, f"{response.describe()}\n{self.diagnostics()}")
        self.assertEqual(response.header("Content-Type"), OCI_INDEX)
        self.assertEqual(response.json()["manifests"], [self.sbom_descriptor])
        # Upstream's own answer to the API was a 404: hammal then read the tag.
        paths = registry.paths()
        self.assertTrue(any("/referrers/" in p for p in paths), paths)
        self.assertTrue(any("/manifests/sha256-" in p for p in paths), paths)

        filtered = self.referrers(SBOM)
        self.assertEqual(filtered.json()["manifests"], [self.sbom_descriptor])
        self.assertEqual(filtered.header("OCI-Filters-Applied"), "artifactType")
        other = self.referrers("application/vnd.example.other")
        self.assertEqual(other.json()["manifests"], [])

    def test_cached_like_a_tag(self) -> None:
        self.assertEqual(self.referrers().status, 200)
        registry = self.env_registry_log()
        again = self.referrers()
        self.assertEqual(again.status, 200)
        self.assertEqual(again.header("Cache-Status"), "hammal; hit")
        self.assertEqual(registry.paths(), [])

    def test_signature_tag_pulls_like_any_tag(self) -> None:
        dest = self.make_dir()
        result = skopeo_pull(f"{self.hammal.host}/{REPO}:{self.signature_tag}", dest)
        self.assertEqual(result.returncode, 0, f"{result.stderr}\n{self.diagnostics()}")
        self.assertEqual(file_sha256(os.path.join(dest, "manifest.json")), self.signature)
