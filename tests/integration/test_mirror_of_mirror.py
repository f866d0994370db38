"""A mirror of a mirror (issue 13): ``--upstream docker.io=URL``.

The environment's token-auth Distribution stands in for a Docker Hub cache
such as mirror.gcr.io. Real containerd and podman, configured as operators
configure them for a ``docker.io`` mirror, pull through hammal; containerd
sends ``?ns=docker.io``, podman asks for ``library/...`` by tag.
"""

from __future__ import annotations

import html
import os
import re

from twisted.trial import unittest

from tests.integration.clients import Containerd, missing_clients, podman, registries_conf
from tests.integration.environment import HammalProcess
from tests.integration.support import IntegrationTestCase
from tests.integration.test_access import ACCEPT, fetch, launch_hammal


class MirrorOfAMirrorTests(IntegrationTestCase):
    """hammal in front of an upstream that stands for Docker Hub."""

    def setUp(self) -> None:
        super().setUp()
        missing = missing_clients()
        if missing:
            if os.environ.get("CI"):
                self.fail(f"system binaries not installed: {missing}")
            raise unittest.SkipTest(f"system binaries not installed: {missing}")
        self.image = self.env.image("library/alpine:3.20")

    def hammal(self, stands_for: bool = True) -> HammalProcess:
        upstream = self.env.registry_url
        # No --library-prefix: the docker.io rule must come from REGISTRY=.
        return launch_hammal(
            self, upstream=f"docker.io={upstream}" if stands_for else upstream, library_prefix=False
        )

    def test_containerd_pulls_with_ns_docker_io(self) -> None:
        hammal = self.hammal()
        containerd = Containerd()
        self.addCleanup(containerd.stop)
        result = containerd.pull_through(hammal.url, "library/alpine:3.20")
        self.assertEqual(
            result.returncode, 0, f"{result.stdout}\n{result.stderr}\n{self.diagnostics()}"
        )
        self.assertEqual(
            containerd.image_digest("docker.io/library/alpine:3.20"), self.image.manifest_digest
        )
        log = hammal.log_text()
        self.assertIn("ns=docker.io", log, "containerd did not go through hammal")
        for digest in self.image.blob_digests:
            self.assertIn(digest, log)

    def test_containerd_refused_without_registry(self) -> None:
        """Without ``docker.io=``, nothing says the upstream stands for the Hub: 403."""
        hammal = self.hammal(stands_for=False)
        response = fetch(f"{hammal.url}/v2/library/alpine/manifests/3.20?ns=docker.io", ACCEPT)
        self.assertOCIError(response, 403, "DENIED", ["ns="])

    def test_library_prefix_and_path_prefix(self) -> None:
        """One-part names gain ``library/``; ``docker.io/`` path prefixes are stripped."""
        hammal = self.hammal()
        for path in (
            "/v2/alpine/manifests/3.20?ns=docker.io",
            "/v2/alpine/manifests/3.20",
            "/v2/docker.io/library/alpine/manifests/3.20",
            "/v2/docker.io/alpine/manifests/3.20",
        ):
            response = fetch(hammal.url + path, ACCEPT)
            self.assertEqual(response.status, 200, f"{path}\n{response.describe()}")
            self.assertEqual(response.header("Docker-Content-Digest"), self.image.manifest_digest)

    def test_podman_pulls_through_docker_io_mirror(self) -> None:
        hammal = self.hammal()
        workdir = self.make_dir()
        registries = registries_conf(f"127.0.0.1:{hammal.port}")
        result = podman(workdir, registries, "pull", "docker.io/library/alpine:3.20")
        self.assertEqual(
            result.returncode, 0, f"{result.stdout}\n{result.stderr}\n{self.diagnostics()}"
        )
        listed = podman(
            workdir, registries, "images", "--digests", "--format", "{{.Repository}} {{.Digest}}"
        )
        self.assertIn(f"docker.io/library/alpine {self.image.manifest_digest}", listed.stdout)
        self.assertIn("/v2/library/alpine/manifests/3.20", hammal.log_text())

    def test_front_page_snippets_work_as_given(self) -> None:
        """containerd and podman configured by copy-paste from hammal's front page."""
        hammal = self.hammal()
        page = fetch(hammal.url + "/")
        self.assertEqual(page.status, 200, page.describe())
        blocks = {
            path: html.unescape(body)
            for path, body in re.findall(
                r"<code>([^<]+)</code>[^<]*</p>\s*<pre>(.*?)</pre>", page.body.decode(), re.S
            )
        }
        hosts = blocks["/etc/containerd/certs.d/docker.io/hosts.toml"]
        self.assertIn("skip_verify = true", hosts)  # plain HTTP mirror
        containerd = Containerd()
        self.addCleanup(containerd.stop)
        result = containerd.pull_through(hammal.url, "library/alpine:3.20", hosts=hosts)
        self.assertEqual(result.returncode, 0, f"{hosts}\n{result.stderr}\n{self.diagnostics()}")
        self.assertEqual(
            containerd.image_digest("docker.io/library/alpine:3.20"), self.image.manifest_digest
        )

        workdir = self.make_dir()
        registries = blocks["/etc/containers/registries.conf"]
        result = podman(workdir, registries, "pull", "docker.io/library/alpine:3.20")
        self.assertEqual(
            result.returncode, 0, f"{registries}\n{result.stderr}\n{self.diagnostics()}"
        )
