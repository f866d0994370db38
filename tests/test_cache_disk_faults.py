"""
A cache disk that fails (full, read-only, broken) only means "not cached":
clients are served from upstream, every failure is counted and the log gets
at most one warning a minute. In memory, with faults made by breaking the
cache directory itself.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from hammal import metrics
from hammal.cache.writes import WriteErrors
from tests.fakes import MANIFEST_V2
from tests.test_v2 import Mirror, header

ACCEPT = {b"accept": [MANIFEST_V2.encode()]}


def write_errors(kind: str) -> float:
    """The current value of C{hammal_cache_write_errors_total{kind=...}}."""
    value = metrics.REGISTRY.get_sample_value("hammal_cache_write_errors_total", {"kind": kind})
    return value or 0.0


def replace_with_file(path: str) -> None:
    """Make C{path} a regular file: every write below it fails (ENOTDIR)."""
    shutil.rmtree(path)
    with open(path, "w") as blocker:
        blocker.write("not a directory")


class ManifestWriteFailureTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.cache_dir = self.mktemp()
        self.mirror = Mirror(cache_dir=self.cache_dir, retries=0)
        self.body = b'{"schemaVersion":2,"mediaType":"' + MANIFEST_V2.encode() + b'","v":1}'
        self.digest = self.mirror.world.add_image("library/alpine", "3.20", self.body)

    def test_tag_store_failure_serves_the_manifest(self) -> None:
        """
        The tag store refusing writes costs the cache, not the pull: the
        manifest fetched by tag is answered 200, the failure counted.
        """
        replace_with_file(os.path.join(self.cache_dir, "tags"))
        before = write_errors("tag")
        response = self.mirror.request(b"GET", "/v2/alpine/manifests/3.20", ACCEPT)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.mirror.body(response), self.body)
        self.assertEqual(header(response, b"docker-content-digest"), self.digest)
        self.assertEqual(write_errors("tag"), before + 1)
        self.assertEqual(os.listdir(os.path.join(self.cache_dir, "tmp")), [])

    def test_manifest_store_failure_serves_the_manifest(self) -> None:
        """Manifests that cannot be stored are served, and leave no temporaries."""
        replace_with_file(os.path.join(self.cache_dir, "manifests"))
        before = write_errors("manifest")
        response = self.mirror.request(b"GET", f"/v2/alpine/manifests/{self.digest}", ACCEPT)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.mirror.body(response), self.body)
        self.assertEqual(write_errors("manifest"), before + 1)
        self.assertEqual(os.listdir(os.path.join(self.cache_dir, "tmp")), [])

    def test_full_tmp_serves_the_manifest(self) -> None:
        """No room for temporaries at all: still 200 by tag and by digest."""
        replace_with_file(os.path.join(self.cache_dir, "tmp"))
        for reference in ("3.20", self.digest):
            response = self.mirror.request(b"GET", f"/v2/alpine/manifests/{reference}", ACCEPT)
            self.assertEqual(response.code, 200)
            self.assertEqual(self.mirror.body(response), self.body)


class WriteErrorsTests(SynchronousTestCase):
    def test_one_warning_per_minute(self) -> None:
        """A full disk fails every write; the log hears of it once a minute."""
        clock = Clock()
        events: list[dict[str, Any]] = []
        errors = WriteErrors(clock)
        errors.log = Logger(observer=events.append)
        before = write_errors("blob")
        for _ in range(5):
            errors.record("blob", "sha256:ab", "No space left on device")
            clock.advance(10)
        self.assertEqual(len(events), 1)
        self.assertEqual(write_errors("blob"), before + 5)
        clock.advance(20)
        errors.record("blob", "sha256:ab", "No space left on device")
        self.assertEqual(len(events), 2)
        self.assertEqual(events[1]["unsaid"], 4)
