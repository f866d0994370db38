"""
Tests for the operator's tool (L{hammal.ops.cli}, L{hammal.ops.prefetch},
L{hammal.ops.cachetool}) and for the deployment files' agreement with hammal's
real options.

Prefetch runs against a small registry served by the standard library's
C{ThreadingHTTPServer} on 127.0.0.1 in a thread; the tool's own threads and
the server's are all joined before each test ends.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hammal.cache.manifests import DiskTagStore, ManifestStore, StoredManifest
from hammal.cache.store import STALE_TEMPORARY_SECONDS, BlobStore
from hammal.config import FLAGS, PARAMETERS
from hammal.ops import cachetool
from hammal.ops.cli import human_size, main, short_digest
from hammal.ops.prefetch import (
    MANIFEST_ACCEPT,
    ImageRef,
    Platform,
    UsageError,
    parse_image,
    parse_mirror,
    parse_platforms,
)
from hammal.reference import Digest
from hammal.tap import Options

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: How every deployment starts the server (the Makefile's ``run`` too).
TWISTD_ARGV = ["twistd", "--pidfile=", "-n", "hammal"]

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
SHA_A = "sha256:" + "a" * 64


def run(*argv: str) -> tuple[int, str, str]:
    """The tool's exit status, stdout and stderr for C{argv}."""
    out, err = io.StringIO(), io.StringIO()
    status = main(list(argv), out, err)
    return status, out.getvalue(), err.getvalue()


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def read(relative: str) -> str:
    with open(os.path.join(REPO, relative), encoding="utf-8") as source:
        return source.read()


# A registry in a thread.


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins every request thread
    registry: FakeRegistry


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        registry = self.server.registry
        registry.record(self.path, self.headers.get("Accept"))
        manifest = re.fullmatch(r"/v2/(.+)/manifests/([^/]+)", self.path)
        blob = re.fullmatch(r"/v2/(.+)/blobs/([^/]+)", self.path)
        if self.path == "/v2/":
            self._send(200, "application/json", b"{}")
        elif manifest and (manifest.group(1), manifest.group(2)) in registry.manifests:
            media_type, body = registry.manifests[manifest.group(1), manifest.group(2)]
            self._send(200, media_type, body, {"Docker-Content-Digest": Digest.of(body)})
        elif blob and blob.group(2) in registry.blobs:
            self._send(200, "application/octet-stream", registry.blobs[blob.group(2)])
        else:
            error = {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]}
            self._send(404, "application/json", json.dumps(error).encode())

    def _send(
        self, status: int, media_type: str, body: bytes, extra: dict[str, object] = {}
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", media_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra.items():
            self.send_header(name, str(value))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class FakeRegistry:
    """
    Manifests by (name, tag or digest), blobs by digest, and a record of
    every request path with its C{Accept} header.
    """

    def __init__(self) -> None:
        self.manifests: dict[tuple[str, str], tuple[str, bytes]] = {}
        self.blobs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self._lock = threading.Lock()

    def record(self, path: str, accept: str | None) -> None:
        with self._lock:
            self.requests.append((path, accept))

    def start(self, test: SynchronousTestCase) -> str:
        """Serve on 127.0.0.1 until C{test} ends; the base URL."""
        threads_before = threading.active_count()
        server = _Server(("127.0.0.1", 0), _Handler)
        server.registry = self
        # A short poll interval only makes shutdown() prompt.
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="fake-registry")
        thread.start()

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join()
            test.assertEqual(threading.active_count(), threads_before, threading.enumerate())

        test.addCleanup(stop)
        return f"http://127.0.0.1:{server.server_address[1]}"

    def add_blob(self, data: bytes, media_type: str = OCI_LAYER) -> dict[str, Any]:
        digest = str(Digest.of(data))
        self.blobs[digest] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def add_manifest(
        self, name: str, document: dict[str, Any], media_type: str, tag: str | None = None
    ) -> dict[str, Any]:
        body = json.dumps(document, indent=2).encode()
        digest = str(Digest.of(body))
        self.manifests[name, digest] = (media_type, body)
        if tag is not None:
            self.manifests[name, tag] = (media_type, body)
        return {"mediaType": media_type, "digest": digest, "size": len(body)}

    def corrupt(self, digest: str) -> None:
        """Serve other bytes of the same length for C{digest}."""
        data = self.blobs[digest]
        self.blobs[digest] = bytes([data[0] ^ 0xFF]) + data[1:]

    def blob_requests(self) -> Counter[str]:
        return Counter(path.rsplit("/", 1)[1] for path, _ in self.requests if "/blobs/" in path)

    def manifest_requests(self) -> Counter[str]:
        return Counter(path.rsplit("/", 1)[1] for path, _ in self.requests if "/manifests/" in path)


def image_manifest(
    registry: FakeRegistry, name: str, architecture: str, shared: bytes
) -> tuple[dict[str, Any], set[str]]:
    """An OCI image for C{architecture}: its descriptor and its blob digests."""
    config = registry.add_blob(
        json.dumps({"architecture": architecture, "os": "linux"}).encode(), OCI_CONFIG
    )
    # Over one read chunk, so that blobs arrive in several pieces.
    own = registry.add_blob(hashlib.sha256(architecture.encode()).digest() * 20000)
    common = registry.add_blob(shared)
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config,
        "layers": [own, common],
    }
    descriptor = registry.add_manifest(name, document, OCI_MANIFEST)
    return descriptor, {config["digest"], own["digest"], common["digest"]}


def multi_platform_image(
    registry: FakeRegistry, name: str = "alpine", tag: str = "3.20"
) -> dict[str, Any]:
    """
    An index of linux/amd64 and linux/arm64/v8 sharing one layer. Returns
    the index digest and, per architecture, the child digest and its blobs.
    """
    shared = b"a layer both platforms use\n" * 1000
    amd64, amd64_blobs = image_manifest(registry, name, "amd64", shared)
    arm64, arm64_blobs = image_manifest(registry, name, "arm64", shared)
    amd64["platform"] = {"os": "linux", "architecture": "amd64"}
    arm64["platform"] = {"os": "linux", "architecture": "arm64", "variant": "v8"}
    index = registry.add_manifest(
        name,
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [amd64, arm64]},
        OCI_INDEX,
        tag,
    )
    return {
        "index": index["digest"],
        "amd64": (amd64["digest"], amd64_blobs),
        "arm64": (arm64["digest"], arm64_blobs),
    }


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


# Arguments.


class ImageReferenceTests(SynchronousTestCase):
    def test_short_name(self) -> None:
        """A one-part name stays as given (the mirror adds library/), tag latest."""
        image = parse_image("alpine")
        self.assertEqual(image, ImageRef("alpine", None, None))
        self.assertEqual(image.reference, "latest")
        self.assertEqual(str(image), "alpine:latest")

    def test_tag_and_digest(self) -> None:
        self.assertEqual(parse_image("library/alpine:3.20").reference, "3.20")
        by_digest = parse_image(f"alpine@{SHA_A}")
        self.assertEqual(by_digest.reference, SHA_A)
        self.assertEqual(str(by_digest), f"alpine@{SHA_A}")
        both = parse_image(f"bitnami/redis:7@{SHA_A}")
        self.assertEqual((both.name, both.tag, both.reference), ("bitnami/redis", "7", SHA_A))

    def test_invalid(self) -> None:
        """Bad names, tags, digests and registry hosts are usage errors."""
        for text in [
            "Alpine",
            "alpine:",
            "alpine:bad/tag",
            "alpine@sha256:zz",
            "alpine@",
            "docker.io/library/alpine",
            "localhost:5000/alpine:1",
            "",
        ]:
            with self.subTest(text=text):
                self.assertRaises(UsageError, parse_image, text)

    def test_platforms(self) -> None:
        self.assertEqual(
            parse_platforms(["linux/amd64,linux/arm64/v8", "linux/arm/v7"]),
            (
                Platform("linux", "amd64"),
                Platform("linux", "arm64", "v8"),
                Platform("linux", "arm", "v7"),
            ),
        )
        self.assertRaises(UsageError, parse_platforms, ["linux"])
        self.assertRaises(UsageError, parse_platforms, ["linux/amd64/v1/x"])

    def test_platform_matching(self) -> None:
        """arm64 without a variant is v8, as containerd normalises it."""
        arm64 = {"os": "linux", "architecture": "arm64"}
        self.assertTrue(Platform("linux", "arm64").matches(arm64))
        self.assertTrue(Platform("linux", "arm64", "v8").matches(arm64))
        self.assertFalse(Platform("linux", "arm", "v7").matches(arm64))
        self.assertFalse(Platform("linux", "amd64").matches(None))

    def test_mirror(self) -> None:
        self.assertEqual(parse_mirror("http://127.0.0.1:5000/"), "http://127.0.0.1:5000")
        for text in ["127.0.0.1:5000", "ftp://x", "http://x/v2", "http://u:p@x"]:
            with self.subTest(text=text):
                self.assertRaises(UsageError, parse_mirror, text)

    def test_formatting(self) -> None:
        self.assertEqual(short_digest(SHA_A), "sha256:aaaaaaaaaaaa…")
        self.assertEqual(human_size(999), "999 B")
        self.assertEqual(human_size(3_200_000), "3.2 MB")


class CommandLineTests(SynchronousTestCase):
    """Exit statuses and one-line errors."""

    def assertOneLine(self, text: str) -> None:
        self.assertEqual(len(text.splitlines()), 1, text)
        self.assertTrue(text.startswith("hammal"), text)

    def test_help(self) -> None:
        status, out, err = run("--help")
        self.assertEqual(status, 0)
        self.assertIn("prefetch", out)
        self.assertIn("cache", out)
        self.assertEqual(err, "")

    def test_module_help(self) -> None:
        """``python -m hammal --help`` works as a program."""
        result = subprocess.run(
            [sys.executable, "-m", "hammal", "--help"],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": REPO},
            cwd=REPO,
            timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("usage: hammal", result.stdout)

    def test_usage_errors(self) -> None:
        """Missing or invalid arguments: status 2, one line on stderr, nothing else."""
        mirror = "http://127.0.0.1:1"
        for argv in [
            [],
            ["frobnicate"],
            ["cache"],
            ["prefetch", "alpine"],
            ["prefetch", "--mirror", mirror],
            ["prefetch", "Alpine", "--mirror", mirror],
            ["prefetch", "alpine@sha256:1234", "--mirror", mirror],
            ["prefetch", "alpine", "--mirror", "127.0.0.1:5000"],
            ["prefetch", "alpine", "--mirror", mirror, "--parallel", "0"],
            ["prefetch", "alpine", "--mirror", mirror, "--parallel", "four"],
            ["prefetch", "alpine", "--mirror", mirror, "--platform", "amd64"],
        ]:
            with self.subTest(argv=argv):
                status, out, err = run(*argv)
                self.assertEqual(status, 2)
                self.assertEqual(out, "")
                self.assertOneLine(err)

    def test_unreachable_mirror(self) -> None:
        """A mirror that does not answer: status 1, one line naming it."""
        mirror = f"http://127.0.0.1:{free_port()}"
        status, out, err = run("prefetch", "alpine", "--mirror", mirror)
        self.assertEqual(status, 1)
        self.assertEqual(out, "")
        self.assertOneLine(err)
        self.assertIn(f"mirror {mirror} is unreachable", err)


# Prefetch.


class PrefetchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.registry = FakeRegistry()
        self.mirror = self.registry.start(self)
        self.image = multi_platform_image(self.registry)

    def prefetch(self, *argv: str) -> tuple[int, str, str]:
        return run("prefetch", *argv, "--mirror", self.mirror)

    def test_all_platforms(self) -> None:
        """
        Index, both children and every blob, each requested exactly once
        (the shared layer too), with the four manifest types accepted.
        """
        status, out, err = self.prefetch("alpine:3.20", "--parallel", "3")
        self.assertEqual((status, err), (0, ""))
        amd64, amd64_blobs = self.image["amd64"]
        arm64, arm64_blobs = self.image["arm64"]
        self.assertEqual(self.registry.blob_requests(), Counter(amd64_blobs | arm64_blobs))
        self.assertEqual(self.registry.manifest_requests(), Counter(["3.20", amd64, arm64]))
        accepts = {accept for path, accept in self.registry.requests if "/manifests/" in path}
        self.assertEqual(accepts, {MANIFEST_ACCEPT})
        self.assertEqual(
            {item.strip() for item in MANIFEST_ACCEPT.split(",")},
            {
                OCI_INDEX,
                OCI_MANIFEST,
                DOCKER_MANIFEST,
                "application/vnd.docker.distribution.manifest.list.v2+json",
            },
        )
        lines = out.splitlines()
        self.assertEqual(len(lines), 3 + 5 + 1)  # manifests, blobs, summary
        self.assertIn(f"alpine:3.20 {short_digest(self.image['index'])} ", lines[0])
        self.assertTrue(all(line.endswith(" ok") for line in lines[:-1]), lines)
        self.assertTrue(lines[-1].startswith("alpine:3.20 done: 3 manifests, 5 blobs,"), lines[-1])

    def test_one_platform(self) -> None:
        """--platform linux/arm64 fetches the arm64 child and its blobs only."""
        status, _, err = self.prefetch("alpine:3.20", "--platform", "linux/arm64")
        self.assertEqual((status, err), (0, ""))
        arm64, arm64_blobs = self.image["arm64"]
        self.assertEqual(self.registry.blob_requests(), Counter(arm64_blobs))
        self.assertEqual(self.registry.manifest_requests(), Counter(["3.20", arm64]))

    def test_no_such_platform(self) -> None:
        status, _, err = self.prefetch("alpine:3.20", "--platform", "linux/s390x")
        self.assertEqual(status, 1)
        self.assertIn("no manifest for linux/s390x", err)
        self.assertEqual(self.registry.blob_requests(), Counter())

    def test_corrupted_blob(self) -> None:
        """A blob whose bytes do not match its digest fails the run; the rest still arrive."""
        _, amd64_blobs = self.image["amd64"]
        _, arm64_blobs = self.image["arm64"]
        bad = sorted(amd64_blobs - arm64_blobs)[0]
        self.registry.corrupt(bad)
        status, out, err = self.prefetch("alpine:3.20")
        self.assertEqual(status, 1)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertIn(f"alpine:3.20 {short_digest(bad)}: digest mismatch", err)
        self.assertEqual(self.registry.blob_requests(), Counter(amd64_blobs | arm64_blobs))
        self.assertIn("alpine:3.20 FAILED (1 errors)", out)

    def test_corrupted_manifest(self) -> None:
        """A child manifest that does not match the digest the index gives fails."""
        amd64, _ = self.image["amd64"]
        media_type, body = self.registry.manifests["alpine", amd64]
        self.registry.manifests["alpine", amd64] = (media_type, body + b" ")
        status, _, err = self.prefetch("alpine:3.20", "--platform", "linux/amd64")
        self.assertEqual(status, 1)
        self.assertIn("manifest digest mismatch", err)
        self.assertEqual(self.registry.blob_requests(), Counter())

    def test_by_digest_and_dedup(self) -> None:
        """The same image by tag and by digest: its blobs are still fetched once."""
        _, amd64_blobs = self.image["amd64"]
        _, arm64_blobs = self.image["arm64"]
        status, _, err = self.prefetch("alpine:3.20", f"alpine@{self.image['index']}")
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(self.registry.blob_requests(), Counter(amd64_blobs | arm64_blobs))
        self.assertEqual(self.registry.manifest_requests()[self.image["index"]], 1)

    def test_single_manifest(self) -> None:
        """A Docker schema 2 image without an index: config and layers."""
        config = self.registry.add_blob(
            b'{"os":"linux"}', "application/vnd.docker.container.image.v1+json"
        )
        layer = self.registry.add_blob(b"layer" * 100)
        document = {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": config,
            "layers": [layer],
        }
        self.registry.add_manifest("library/busybox", document, DOCKER_MANIFEST, "latest")
        status, out, err = self.prefetch("library/busybox", "--platform", "linux/amd64")
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(
            self.registry.blob_requests(), Counter([config["digest"], layer["digest"]])
        )
        self.assertIn("library/busybox:latest done: 1 manifests, 2 blobs, 514 B", out)

    def test_unknown_tag(self) -> None:
        """A 404 is one line with the registry's error code; other images go on."""
        status, out, err = self.prefetch("alpine:nope", "alpine:3.20", "--platform", "linux/amd64")
        self.assertEqual(status, 1)
        self.assertEqual(
            err, "hammal: alpine:nope manifest: HTTP 404 MANIFEST_UNKNOWN: manifest unknown\n"
        )
        self.assertIn("alpine:3.20 done: 2 manifests, 3 blobs", out)

    def test_progress_bar(self) -> None:
        """On a terminal, a bar per image instead of a line per blob."""
        terminal, err = FakeTerminal(), io.StringIO()
        status = main(["prefetch", "alpine:3.20", "--mirror", self.mirror], terminal, err)
        self.assertEqual((status, err.getvalue()), (0, ""))
        output = terminal.getvalue()
        self.assertIn("alpine:3.20: 100%", output)
        self.assertIn("alpine:3.20 done: 3 manifests, 5 blobs", output)
        self.assertNotIn(" ok\n", output)


# The cache directory.


def populate(root: str) -> list[str]:
    """
    Four 1000-byte blobs used at increasing times (oldest first), two
    manifests, a tag entry, an abandoned temporary and a fresh one.
    Returns the blob digests, least recently used first.
    """
    store = BlobStore(root)
    store.open()
    now = time.time()
    digests = []
    for number in range(4):
        data = bytes([number]) * 1000
        digest = Digest.of(data)
        temporary = store.temporary_path(digest)
        with open(temporary, "wb") as out:
            out.write(data)
        store.commit(temporary, digest)
        used = now - 1000 + number * 100
        os.utime(store.path(digest), (used, used))
        digests.append(str(digest))
    manifests = ManifestStore(root)
    manifests.open()
    for body in (b'{"schemaVersion": 2}', b'{"schemaVersion": 2, "layers": []}'):
        manifests.put(StoredManifest(Digest.of(body), OCI_MANIFEST, body))
    tags = DiskTagStore(root, Clock())
    tags.open()
    tags.set("ab" * 32, "{}", 60)
    for name, age in (("abandoned.1.x", STALE_TEMPORARY_SECONDS + 60), ("running.2.y", 0)):
        path = os.path.join(root, "tmp", name)
        with open(path, "wb") as out:
            out.write(b"x" * 10)
        os.utime(path, (now - age, now - age))
    return digests


def snapshot(root: str) -> dict[str, tuple[int, float]]:
    """Every file under C{root} with its size and mtime."""
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            stat = os.stat(os.path.join(folder, name))
            found[os.path.relpath(os.path.join(folder, name), root)] = (stat.st_size, stat.st_mtime)
    return found


def blob_path(root: str, digest: str) -> str:
    return BlobStore(root).path(Digest.parse(digest))


class CacheToolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = self.mktemp()
        os.makedirs(self.root)
        self.digests = populate(self.root)

    def test_stats(self) -> None:
        """Counts and sizes, and nothing changed on disk."""
        before = snapshot(self.root)
        status, out, err = run("cache", "stats", "--cache-dir", self.root)
        self.assertEqual((status, err), (0, ""))
        self.assertIn("blobs: 4\n", out)
        self.assertIn("blob bytes: 4000 (4.0 kB)\n", out)
        self.assertIn("manifests: 2\n", out)
        self.assertIn("tag entries: 1\n", out)
        self.assertIn("temporaries: 2 (20 B), 1 abandoned\n", out)
        self.assertEqual(snapshot(self.root), before)

    def test_gc(self) -> None:
        """The least recently used blobs go until the rest fit; so do abandoned temporaries."""
        status, out, err = run("cache", "gc", "--cache-dir", self.root, "--max-size", "2500")
        self.assertEqual((status, err), (0, ""))
        for digest in self.digests[:2]:
            self.assertFalse(os.path.exists(blob_path(self.root, digest)))
            self.assertIn(f"evicted {short_digest(digest)} 1.0 kB\n", out)
        for digest in self.digests[2:]:
            self.assertTrue(os.path.exists(blob_path(self.root, digest)))
        self.assertEqual(os.listdir(os.path.join(self.root, "tmp")), ["running.2.y"])
        self.assertIn(
            "evicted 2 blobs (2.0 kB), removed 1 temporaries; 2 blobs (2.0 kB) remain", out
        )
        self.assertEqual(cachetool.stats(self.root).blob_bytes, 2000)

    def test_gc_size_units(self) -> None:
        """
        --max-size takes hammal's sizes and bounds the whole directory: 2K
        (2048 bytes) keeps one 1000-byte blob beside the manifests and tag
        entries (about 160 bytes), not two.
        """
        status, _, _ = run("cache", "gc", "--cache-dir", self.root, "--max-size", "2K")
        self.assertEqual(status, 0)
        self.assertEqual(
            [os.path.exists(blob_path(self.root, digest)) for digest in self.digests],
            [False, False, False, True],
        )

    def test_gc_bounds_manifests_and_tags(self) -> None:
        """Manifests and tag entries count against --max-size, evicted oldest first."""
        manifests = os.path.join(self.root, "manifests")
        old = [
            os.path.join(folder, name)
            for folder, _, names in os.walk(manifests)
            for name in names
            if not name.endswith(".type")
        ]
        os.utime(old[0], (1, 1))  # the least recently used of all
        status, _, _ = run("cache", "gc", "--cache-dir", self.root, "--max-size", "2K")
        self.assertEqual(status, 0)
        self.assertFalse(os.path.exists(old[0]))
        self.assertFalse(os.path.exists(old[0] + ".type"))
        self.assertTrue(os.path.exists(old[1]))
        self.assertEqual(cachetool.stats(self.root).tags, 1)

    def test_dry_run_plans_metadata_pressure(self) -> None:
        """The dry run counts manifests and tags as gc does: the same blobs go."""
        planned = cachetool.gc(self.root, 2048, dry_run=True)
        done = cachetool.gc(self.root, 2048)
        self.assertEqual(planned.evicted, done.evicted)
        self.assertEqual(len(done.evicted), 3)

    def test_dry_run(self) -> None:
        """--dry-run removes nothing, and names exactly what gc then removes."""
        before = snapshot(self.root)
        status, out, err = run(
            "cache", "gc", "--cache-dir", self.root, "--max-size", "2500", "--dry-run"
        )
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(snapshot(self.root), before)
        self.assertIn("would remove abandoned temporary abandoned.1.x\n", out)
        self.assertIn("dry run: would evict 2 blobs", out)
        planned = cachetool.gc(self.root, 2500, dry_run=True)
        done = cachetool.gc(self.root, 2500)
        self.assertEqual(planned.evicted, done.evicted)
        self.assertEqual(planned.removed_temporaries, done.removed_temporaries)
        self.assertEqual(
            (planned.remaining_blobs, planned.remaining_bytes),
            (done.remaining_blobs, done.remaining_bytes),
        )
        self.assertEqual([blob.digest for blob in done.evicted], self.digests[:2])

    def test_gc_without_limit(self) -> None:
        """No --max-size (nor HAMMAL_CACHE_MAX_SIZE): only temporaries go."""
        self.patch(
            os,
            "environ",
            {key: value for key, value in os.environ.items() if key != "HAMMAL_CACHE_MAX_SIZE"},
        )
        status, out, _ = run("cache", "gc", "--cache-dir", self.root)
        self.assertEqual(status, 0)
        self.assertIn("evicted 0 blobs", out)
        self.assertEqual(cachetool.stats(self.root).blobs, 4)
        self.assertEqual(cachetool.stats(self.root).temporaries, 1)

    def test_refused_directories(self) -> None:
        """
        A missing directory, one that is no cache, or a bad size: status 2, one
        line, nothing touched.
        """
        other = self.mktemp()
        os.makedirs(other)
        for argv in [
            ["cache", "gc", "--cache-dir", other + "/missing", "--max-size", "1G"],
            ["cache", "gc", "--cache-dir", other, "--max-size", "1G"],
            ["cache", "stats", "--cache-dir", other],
            ["cache", "gc", "--cache-dir", self.root, "--max-size", "lots"],
        ]:
            with self.subTest(argv=argv):
                status, out, err = run(*argv)
                self.assertEqual((status, out), (2, ""))
                self.assertEqual(len(err.splitlines()), 1, err)
        self.assertEqual(os.listdir(other), [])
        self.assertEqual(cachetool.stats(self.root).blobs, 4)


# Deployment files.


def option_variables() -> set[str]:
    """Every environment variable hammal reads for its options."""
    names = {variable for spec in PARAMETERS for variable in (spec.env, *spec.extra_env)}
    return names | {"HAMMAL_" + name.upper().replace("-", "_") for name, _ in FLAGS}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """The Dockerfile's (instruction, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", read("Dockerfile"))
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def assignments(text: str) -> dict[str, str]:
    """C{A=1 B="two words"} as a mapping, as ENV and Environment= write them."""
    found: dict[str, str] = {}
    for item in shlex.split(text):
        key, _, value = item.partition("=")
        found[key] = value
    return found


def dockerfile_env() -> dict[str, str]:
    found: dict[str, str] = {}
    for keyword, rest in dockerfile_instructions():
        if keyword == "ENV":
            found.update(assignments(rest))
    return found


def compose_environment(service: str) -> dict[str, str]:
    """C{services.<service>.environment} of compose.yaml (a mapping), without a YAML library."""
    found: dict[str, str] = {}
    lines = read("compose.yaml").splitlines()
    start = lines.index(f"  {service}:")
    inside = False
    for line in lines[start + 1 :]:
        if line.startswith("  ") and not line.startswith("   "):
            break  # next service
        if line.strip() == "environment:":
            inside = True
            continue
        match = re.fullmatch(r"\s{6}([A-Z0-9_]+):\s*(.*)", line)
        if inside and match:
            found[match.group(1)] = match.group(2).strip().strip("\"'")
        elif inside and line.strip() and not line.strip().startswith("#") and not match:
            inside = False
    return found


def unit_settings() -> list[tuple[str, str]]:
    """The systemd unit's (key, value) lines."""
    settings = []
    for line in read("deploy/hammal.service").splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.append((key.strip(), value.strip()))
    return settings


def unit_environment() -> dict[str, str]:
    found: dict[str, str] = {}
    for key, value in unit_settings():
        if key == "Environment":
            found.update(assignments(value))
    return found


class DeploymentFileTests(SynchronousTestCase):
    def test_variables_are_options(self) -> None:
        """Every HAMMAL_* name in the deployment files is an option hammal reads."""
        known = option_variables()
        for relative in [
            "Dockerfile",
            "compose.yaml",
            "deploy/hammal.service",
            "deploy/README.rst",
        ]:
            for name in re.findall(r"\bHAMMAL_[A-Z0-9_]+", read(relative)):
                with self.subTest(file=relative, name=name):
                    self.assertIn(name, known)

    def test_environments_are_valid(self) -> None:
        """
        hammal starts with the image's environment, with compose's on top, and
        with the unit's.
        """
        image = dockerfile_env()
        self.assertEqual(image["HAMMAL_PORT"], "tcp:5000")
        self.assertEqual(image["HAMMAL_CACHE_DIR"], "/var/cache/hammal")
        compose = {**image, **compose_environment("hammal")}
        self.assertEqual(compose["HAMMAL_REDIS"], "redis://redis:6379/0")
        for environ in (image, compose, unit_environment()):
            options = Options(environ=environ)
            options.parseOptions([])
            self.assertIsNotNone(options.settings)

    def test_malloc_tuning(self) -> None:
        """The image and the unit tune glibc as the Makefile does."""
        makefile = dict(re.findall(r"export (MALLOC_\w+) \?= (\d+)", read("Makefile")))
        self.assertEqual(set(makefile), {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"})
        for environment in (dockerfile_env(), unit_environment()):
            self.assertEqual({key: environment[key] for key in makefile}, makefile)

    def test_same_command_everywhere(self) -> None:
        """The image, the unit and ``make run`` start ``twistd --pidfile= -n hammal``."""
        commands = {
            keyword: rest for keyword, rest in dockerfile_instructions() if keyword == "CMD"
        }
        self.assertEqual(json.loads(commands["CMD"]), TWISTD_ARGV)
        make_run = re.search(r"\$\(BIN\)/(twistd [^$\n]*)\$\(HAMMAL_ARGS\)", read("Makefile"))
        assert make_run is not None
        self.assertEqual(make_run.group(1).split(), TWISTD_ARGV)
        exec_start = dict(unit_settings())["ExecStart"].split()
        self.assertEqual([os.path.basename(exec_start[0]), *exec_start[1:]], TWISTD_ARGV)

    def test_image_basics(self) -> None:
        instructions = dockerfile_instructions()
        keywords = dict(instructions)
        self.assertEqual(keywords["FROM"], "python:3.11-slim")
        self.assertEqual(keywords["USER"], "hammal")
        self.assertEqual(keywords["VOLUME"], "/var/cache/hammal")
        self.assertEqual(keywords["EXPOSE"], "5000")
        check = json.loads(keywords["HEALTHCHECK"][keywords["HEALTHCHECK"].index("CMD") + 3 :])
        self.assertEqual(check[:2], ["python", "-c"])
        self.assertIn("http://127.0.0.1:5000/healthz", check[2])
        compile(check[2], "HEALTHCHECK", "exec")

    def test_stop_outlasts_drain(self) -> None:
        """compose and systemd wait longer than hammal drains before killing it."""
        unit = dict(unit_settings())
        self.assertEqual(unit["KillSignal"], "SIGTERM")
        self.assertGreater(
            _seconds(unit["TimeoutStopSec"]), float(unit_environment()["HAMMAL_DRAIN_TIMEOUT"])
        )
        grace = re.search(r"stop_grace_period:\s*(\S+)", read("compose.yaml"))
        assert grace is not None
        self.assertGreater(
            _seconds(grace.group(1)), float(compose_environment("hammal")["HAMMAL_DRAIN_TIMEOUT"])
        )

    def test_unit_hardening(self) -> None:
        unit = dict(unit_settings())
        for key, value in [
            ("EnvironmentFile", "/etc/default/hammal"),
            ("Restart", "on-failure"),
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("ReadWritePaths", "/var/cache/hammal"),
            ("DynamicUser", "yes"),
        ]:
            self.assertEqual(unit.get(key), value, key)


def _seconds(text: str) -> float:
    return float(text.rstrip("s"))


class PackagingTests(SynchronousTestCase):
    def setUp(self) -> None:
        with open(os.path.join(REPO, "pyproject.toml"), "rb") as source:
            self.project = tomllib.load(source)

    def test_metadata(self) -> None:
        project = self.project["project"]
        self.assertEqual(project["name"], "hammal")
        self.assertEqual(project["requires-python"], ">=3.11")
        self.assertEqual(project["scripts"], {"hammal": "hammal.ops.cli:main"})
        dynamic = self.project["tool"]["setuptools"]["dynamic"]
        self.assertEqual(dynamic["version"], {"attr": "hammal.__version__"})
        self.assertEqual(dynamic["dependencies"], {"file": ["requirements.txt"]})
        self.assertIn("tqdm", read("requirements.txt"))

    def test_packages(self) -> None:
        """
        The wheel holds every hammal package and the twistd plugin, and no
        twisted/__init__.py that would shadow Twisted's own.
        """
        from setuptools import find_namespace_packages

        find = self.project["tool"]["setuptools"]["packages"]["find"]
        self.assertTrue(find["namespaces"])
        packages = set(
            find_namespace_packages(REPO, include=find["include"], exclude=find["exclude"])
        )
        on_disk = {
            os.path.relpath(folder, REPO).replace(os.sep, ".")
            for folder, _, names in os.walk(os.path.join(REPO, "hammal"))
            if any(name.endswith(".py") for name in names)
        }
        self.assertEqual(packages, on_disk | {"twisted.plugins"})
        self.assertTrue(
            os.path.exists(os.path.join(REPO, "twisted", "plugins", "hammal_plugin.py"))
        )
        self.assertFalse(os.path.exists(os.path.join(REPO, "twisted", "__init__.py")))
        self.assertFalse(os.path.exists(os.path.join(REPO, "twisted", "plugins", "__init__.py")))
