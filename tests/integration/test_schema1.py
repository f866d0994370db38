"""Clients that send no ``Accept`` (curl, old clients) get the schema 1
manifest Distribution converts for them, with upstream's digest: hammal
verifies it the way Distribution computes it (over the JWS payload)."""

from __future__ import annotations

import hashlib
import subprocess
from typing import Dict, Tuple

from tests.integration.environment import HammalProcess
from tests.integration.support import IntegrationTestCase

SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"


def curl(url: str, *extra: str) -> Tuple[int, Dict[str, str], bytes]:
    """``curl URL`` (no ``Accept`` of its own beyond curl's): status, headers, body."""
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "30", "-D", "/dev/stderr", "-o", "-", *extra, url],
        capture_output=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"curl failed ({result.returncode}): {result.stderr[-2000:]!r}")
    lines = result.stderr.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        if sep:
            headers[key.strip().lower()] = value.strip()
    return status, headers, result.stdout


class Schema1Tests(IntegrationTestCase):
    """``curl`` pulls of a Docker schema 2 image, which upstream converts."""

    hammal: HammalProcess

    def setUp(self) -> None:
        super().setUp()
        self.hammal = self.start_hammal()

    def _pull_twice(self, *curl_args: str) -> None:
        image = self.env.image("library/alpine:3.20")
        upstream = self.env.upstream_request("GET", image.repo, "manifests", "3.20", accept=())
        self.assertEqual(upstream.status, 200, upstream.describe())
        self.assertEqual(
            upstream.header("Content-Type"), SCHEMA1, "the upstream no longer converts"
        )
        announced = upstream.header("Docker-Content-Digest")
        self.assertIsNotNone(announced)
        self.assertNotEqual(
            announced,
            "sha256:" + hashlib.sha256(upstream.body).hexdigest(),
            "a schema 1 digest covers the payload, not the body",
        )
        for attempt in (1, 2):
            status, headers, body = curl(
                f"{self.hammal.url}/v2/{image.repo}/manifests/3.20", *curl_args
            )
            context = f"attempt {attempt}: {status} {headers} {body[:300]!r}\n{self.diagnostics()}"
            self.assertEqual(status, 200, context)
            self.assertEqual(headers.get("content-type"), SCHEMA1, context)
            self.assertEqual(headers.get("docker-content-digest"), announced, context)
            self.assertIn(b'"schemaVersion": 1', body)
        # Each answer is signed afresh (different bytes), with the same digest.
        # (Distribution does not store the converted manifest: by its digest
        # it answers 404, so there is nothing more to pull.)

    def test_curl_default_accept(self) -> None:
        """curl as it is: ``Accept: */*``."""
        self._pull_twice()

    def test_curl_without_accept(self) -> None:
        """curl with its ``Accept`` header removed: no ``Accept`` at all."""
        self._pull_twice("-H", "Accept:")
