"""
Three hammal instances (twistd processes) as one mirror, against real
parts: redis-server for the fill leases, SeaweedFS as the S3 store, HAProxy
round-robin in front, and a throttled registry (L{tests.cluster.upstream})
that logs every blob request.

* 12 concurrent cold GETs of one large blob through HAProxy cause exactly
  one upstream fetch and every body is exact; then every node serves it
  warm, including a node restarted with an empty local directory (it reads
  through S3), still with that one upstream fetch; a manifest by digest
  too.
* kill -9 of the lease holder mid-fill: every client ends with exact bytes
  (its retry succeeds where its transfer broke), the fill is taken over
  with C{Range}, and the blob is in S3 once, verified.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from twisted.trial.unittest import SynchronousTestCase

from hammal.storage.objects import object_key
from tests.cluster.harness import (
    HAPROXY_BIN,
    S3_ACCESS_KEY,
    S3_REGION,
    S3_SECRET_KEY,
    HAProxy,
    free_ports,
    require_binaries,
    shared_seaweedfs,
)
from tests.integration.environment import (
    REDIS_BIN,
    REPO_ROOT,
    ManagedProcess,
    RedisServer,
    _hammal_env,
    http_get_digest,
    http_request,
    make_tempdir,
    twistd_path,
    wait_until,
)

MiB = 1024 * 1024
BUCKET = "hammal-cluster"
REPOSITORY = "team/app"
HERE = os.path.dirname(os.path.abspath(__file__))


def _s3(method: str, endpoint: str, path: str) -> tuple[int, bytes]:
    """One SigV4-signed request to the test's SeaweedFS (status, body)."""
    url = endpoint + path
    request = AWSRequest(method=method, url=url, headers={"x-amz-content-sha256": "UNSIGNED-PAYLOAD"})
    S3SigV4Auth(Credentials(S3_ACCESS_KEY, S3_SECRET_KEY), "s3", S3_REGION).add_auth(request)
    prepared = urllib.request.Request(url, method=method, headers=dict(request.headers.items()))
    try:
        with urllib.request.urlopen(prepared, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Node:
    """One hammal instance on a fixed port, restartable."""

    def __init__(self, test: "ClusterNodesTests", port: int) -> None:
        self.test = test
        self.port = port
        self.workdir = make_tempdir("hammal-node-")
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, empty_cache: bool = False) -> "Node":
        cache = os.path.join(self.workdir, "cache")
        if empty_cache:
            shutil.rmtree(cache, ignore_errors=True)
        test = self.test
        argv = [
            twistd_path(), "--pidfile=", "-n", "hammal",
            "--port", f"tcp:{self.port}:interface=127.0.0.1",
            "--upstream", test.upstream_url,
            "--no-library-prefix",
            "--cache-dir", cache,
            "--redis", test.redis.url,
            "--storage", f"s3://{BUCKET}/{test.prefix}",
            "--s3-endpoint", test.s3.endpoint,
            "--cluster-advertise", self.url,
            "--cluster-key-file", test.key_file,
            "--read-timeout", "5",
            "--retries", "3",
        ]
        env = _hammal_env()
        env.update(test.s3.environ())
        self.process = ManagedProcess(
            f"hammal-{self.port}", argv, os.path.join(self.workdir, "hammal.log"),
            env=env, cwd=REPO_ROOT,
        ).start()
        return self

    def wait_ready(self) -> None:
        assert self.process is not None
        wait_until(
            lambda: http_request("GET", self.url + "/v2/", timeout=2).status == 200,
            f"hammal on {self.port}", 60, self.process,
        )

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=10)

    def kill(self) -> None:
        assert self.process is not None and self.process.popen is not None
        os.kill(self.process.popen.pid, signal.SIGKILL)
        self.process.popen.wait(10)

    def log(self) -> str:
        return self.process.log_tail(4000) if self.process else ""


class ClusterNodesTests(SynchronousTestCase):
    def setUp(self) -> None:
        require_binaries(REDIS_BIN, HAPROXY_BIN)
        self.s3 = shared_seaweedfs()
        self.prefix = f"{self._testMethodName}-{os.getpid()}-{int(time.time())}/"
        status, _ = _s3("PUT", self.s3.endpoint, f"/{BUCKET}")
        self.assertIn(status, (200, 409))
        work = make_tempdir("hammal-cluster-")
        self.key_file = os.path.join(work, "cluster.key")
        with open(self.key_file, "wb") as f:
            f.write(os.urandom(32).hex().encode())
        self.blobs = os.path.join(work, "blobs")
        os.makedirs(self.blobs)
        self.redis = RedisServer(os.path.join(work, "redis"))
        os.makedirs(self.redis.workdir)
        self.redis.start()
        self.addCleanup(self.redis.stop)
        upstream_port, *node_ports = free_ports(4)
        self.upstream_url = f"http://127.0.0.1:{upstream_port}"
        self.upstream = ManagedProcess(
            "upstream",
            [sys.executable, os.path.join(HERE, "upstream.py"), "--port", str(upstream_port),
             "--blobs", self.blobs, "--rate", str(12 * MiB)],
            os.path.join(work, "upstream.log"), cwd=REPO_ROOT,
        ).start()
        self.addCleanup(self.upstream.stop)
        self.nodes = [Node(self, port) for port in node_ports]
        for node in self.nodes:
            node.start()
            self.addCleanup(node.stop)
        self.haproxy = HAProxy([("127.0.0.1", p) for p in node_ports], timeout=300).start()
        self.addCleanup(self.haproxy.stop)
        self.redis.wait_ready()
        wait_until(lambda: self.upstream_log() is not None, "the upstream", 30, self.upstream)
        for node in self.nodes:
            node.wait_ready()
        self.haproxy.wait_ready()

    def upstream_log(self) -> list[dict[str, Any]] | None:
        try:
            with urllib.request.urlopen(self.upstream_url + "/_admin/log", timeout=5) as r:
                result: list[dict[str, Any]] = json.loads(r.read())
                return result
        except OSError:
            return None

    def upstream_gets(self, digest: str) -> list[str | None]:
        log = self.upstream_log() or []
        return [e["range"] for e in log if e["digest"] == digest and e["method"] == "GET"]

    def add_manifest(self, layer: str, size: int) -> tuple[str, bytes]:
        body = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": layer, "size": size},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                            "digest": layer, "size": size}],
            }
        ).encode()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        os.makedirs(os.path.join(self.blobs, "manifests"), exist_ok=True)
        with open(os.path.join(self.blobs, "manifests", digest[7:]), "wb") as f:
            f.write(body)
        return digest, body

    def manifest(self, base: str, digest: str) -> bytes:
        response = http_request(
            "GET", f"{base}/v2/{REPOSITORY}/manifests/{digest}",
            [("Accept", "application/vnd.oci.image.manifest.v1+json")], timeout=30,
        )
        self.assertEqual(response.status, 200, response.describe())
        return response.body

    def add_blob(self, size: int, seed: bytes) -> str:
        block = hashlib.sha512(seed).digest() * (MiB // 64)
        data = (block * (size // MiB + 1))[:size]
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        with open(os.path.join(self.blobs, digest[7:]), "wb") as f:
            f.write(data)
        return digest

    def get(self, base: str, digest: str, attempts: int = 1) -> tuple[str, int]:
        """GET the blob, retrying a broken transfer; the digest and size of the last try."""
        url = f"{base}/v2/{REPOSITORY}/blobs/{digest}"
        last: Any = None
        for _ in range(attempts):
            try:
                response, got, size = http_get_digest(url, timeout=60)
            except Exception as e:  # a transfer broken mid-body: retry
                last = e
                continue
            if response.status == 200 and got == digest:
                return got, size
            last = (response.status, got, size)
        return f"failed: {last!r}", 0

    def stored(self, digest: str, kind: str = "blobs") -> tuple[int, str]:
        key = "/" + BUCKET + "/" + self.prefix + object_key(kind, digest)
        status, body = _s3("GET", self.s3.endpoint, key)
        return status, "sha256:" + hashlib.sha256(body).hexdigest()

    def wait_stored(self, digest: str, kind: str = "blobs") -> None:
        wait_until(lambda: self.stored(digest, kind)[0] == 200, f"{digest} in S3", 30)

    def logs(self) -> str:
        return "\n".join(f"--- {n.port}\n{n.log()}" for n in self.nodes)

    def test_one_upstream_fetch_then_warm_everywhere(self) -> None:
        size = 24 * MiB
        digest = self.add_blob(size, b"cold")
        manifest, manifest_body = self.add_manifest(digest, size)
        self.assertEqual(self.manifest(self.nodes[0].url, manifest), manifest_body)
        self.wait_stored(manifest, "manifests")
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(lambda _: self.get(self.haproxy.url, digest), range(12)))
        self.assertEqual(results, [(digest, size)] * 12, self.logs())
        self.assertEqual(self.upstream_gets(digest), [None], self.logs())
        self.wait_stored(digest)
        self.assertEqual(self.stored(digest), (200, digest))
        for node in self.nodes:
            self.assertEqual(self.get(node.url, digest), (digest, size), self.logs())
        restarted = self.nodes[2]
        restarted.stop()
        restarted.start(empty_cache=True).wait_ready()
        self.assertEqual(self.get(restarted.url, digest), (digest, size), self.logs())
        self.assertEqual(self.upstream_gets(digest), [None], self.logs())
        # Manifests by digest are in S3 too: the empty node needs no upstream.
        self.assertEqual(self.manifest(restarted.url, manifest), manifest_body)
        self.assertEqual(self.upstream_gets(manifest), [None], self.logs())

    def test_lease_holder_killed_mid_fill(self) -> None:
        size = 48 * MiB  # four seconds at the upstream's rate
        digest = self.add_blob(size, b"killed")
        key = "hammal:v1:lease:" + digest
        with ThreadPoolExecutor(9) as pool:
            pending = [
                pool.submit(self.get, base, digest, 3)
                for base in [n.url for n in self.nodes] * 2 + [self.haproxy.url] * 3
            ]
            holder = None

            def held() -> bool:
                nonlocal holder
                reply = self.redis.command("GET", key)
                if reply.startswith(b"$") and not reply.startswith(b"$-1"):
                    holder = reply.split(b"\r\n")[1].decode()
                return holder is not None

            wait_until(held, "a fill lease", 30)
            time.sleep(1.0)  # mid-fill: some of the blob is across the cluster
            victim = next(n for n in self.nodes if n.url == holder)
            victim.kill()
            survivors = [n for n in self.nodes if n is not victim]
            results = [p.result(timeout=120) for p in pending]
        # Clients of the killed node retried there in vain (it is gone); all
        # others, and every client behind HAProxy, got exact bytes.
        for base, result in zip([n.url for n in self.nodes] * 2 + [self.haproxy.url] * 3, results):
            if base != victim.url:
                self.assertEqual(result, (digest, size), self.logs())
        gets = self.upstream_gets(digest)
        # One fetch, and the takeover's resume from where the cluster was.
        self.assertEqual(gets[0], None, gets)
        self.assertGreaterEqual(len(gets), 2, gets)
        self.assertTrue(all(r is not None and r.startswith("bytes=") for r in gets[1:]), gets)
        self.wait_stored(digest)
        self.assertEqual(self.stored(digest), (200, digest))
        for node in survivors:
            self.assertEqual(self.get(node.url, digest), (digest, size), self.logs())
