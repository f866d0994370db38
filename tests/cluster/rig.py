"""
A hammal cluster of real processes on loopback, for the cluster tests and
the bench's cluster row: N hammal instances (``twistd -n hammal``) behind
HAProxy, sharing a redis-server (fill leases) and SeaweedFS (the S3 store),
in front of L{tests.cluster.upstream} (a throttled registry that logs every
blob and manifest request). Blocking calls only: use it from a
L{SynchronousTestCase} or a script.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

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
    http_request,
    make_tempdir,
    twistd_path,
    wait_until,
)

MiB = 1024 * 1024
BUCKET = "hammal-cluster"
HERE = os.path.dirname(os.path.abspath(__file__))


def s3_request(method: str, endpoint: str, path: str) -> tuple[int, bytes]:
    """One SigV4-signed request to the rig's SeaweedFS: (status, body)."""
    url = endpoint + path
    request = AWSRequest(
        method=method, url=url, headers={"x-amz-content-sha256": "UNSIGNED-PAYLOAD"}
    )
    S3SigV4Auth(Credentials(S3_ACCESS_KEY, S3_SECRET_KEY), "s3", S3_REGION).add_auth(request)
    prepared = urllib.request.Request(url, method=method, headers=dict(request.headers.items()))
    try:
        with urllib.request.urlopen(prepared, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Node:
    """One hammal instance on a fixed port, restartable."""

    def __init__(self, rig: "ClusterRig", port: int) -> None:
        self.rig = rig
        self.port = port
        self.workdir = make_tempdir("hammal-node-")
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        rig = self.rig
        argv = [
            twistd_path(),
            "--pidfile=",
            "-n",
            "hammal",
            "--port",
            f"tcp:{self.port}:interface=127.0.0.1",
            "--upstream",
            rig.upstream_url,
            "--no-library-prefix",
            "--cache-dir",
            os.path.join(self.workdir, "cache"),
            "--read-timeout",
            "5",
            "--retries",
            "3",
        ]
        if rig.cluster or rig.storage_only:
            argv += ["--storage", f"s3://{BUCKET}/{rig.prefix}", "--s3-endpoint", rig.s3.endpoint]
        if rig.cluster:
            argv += [
                "--redis",
                rig.redis.url,
                "--cluster-advertise",
                self.url,
                "--cluster-key-file",
                rig.key_file,
            ]
        return argv

    def start(self, empty_cache: bool = False) -> "Node":
        if empty_cache:
            shutil.rmtree(os.path.join(self.workdir, "cache"), ignore_errors=True)
        env = _hammal_env()
        if self.rig.cluster or self.rig.storage_only:
            env.update(self.rig.s3.environ())
        self.process = ManagedProcess(
            f"hammal-{self.port}",
            self.argv(),
            os.path.join(self.workdir, "hammal.log"),
            env=env,
            cwd=REPO_ROOT,
        ).start()
        return self

    def wait_ready(self) -> None:
        assert self.process is not None
        wait_until(
            lambda: http_request("GET", self.url + "/v2/", timeout=2).status == 200,
            f"hammal on {self.port}",
            60,
            self.process,
        )

    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.process.running() else None

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=10)

    def kill(self) -> None:
        """kill -9, and reap it."""
        assert self.process is not None and self.process.popen is not None
        os.kill(self.process.popen.pid, signal.SIGKILL)
        self.process.popen.wait(10)

    def log(self) -> str:
        return self.process.log_tail(4000) if self.process else ""


class ClusterRig:
    """
    @param nodes: how many hammal instances.
    @param cluster: run them as a cluster (Redis leases, S3, peers); else
        as independent instances (what hammal did before the cluster).
    @param storage_only: (not a cluster) independent instances sharing the
        S3 store alone (C{--storage s3://...}, no Redis, no peers).
    @param rate: the upstream's bytes per second for each blob transfer.
    """

    def __init__(
        self,
        nodes: int = 3,
        cluster: bool = True,
        rate: int = 12 * MiB,
        storage_only: bool = False,
    ) -> None:
        self.count = nodes
        self.cluster = cluster and not storage_only
        self.storage_only = storage_only
        self.rate = rate
        self.prefix = f"run-{os.getpid()}-{time.time_ns()}/"
        self.work = make_tempdir("hammal-cluster-")
        self.blobs = os.path.join(self.work, "blobs")
        os.makedirs(self.blobs)
        self.key_file = os.path.join(self.work, "cluster.key")
        self.stops: list[Any] = []

    def start(self) -> "ClusterRig":
        """Start everything and wait until it answers (blocking)."""
        require_binaries(REDIS_BIN, HAPROXY_BIN)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.s3 = shared_seaweedfs()
        status, body = s3_request("PUT", self.s3.endpoint, f"/{BUCKET}")
        if status not in (200, 409):
            raise RuntimeError(f"cannot create the bucket: {status} {body[:200]!r}")
        with open(self.key_file, "wb") as f:
            f.write(os.urandom(32).hex().encode())
        self.redis = RedisServer(os.path.join(self.work, "redis"))
        os.makedirs(self.redis.workdir)
        self.redis.start()
        self.stops.append(self.redis.stop)
        upstream_port, *node_ports = free_ports(1 + self.count)
        self.upstream_url = f"http://127.0.0.1:{upstream_port}"
        self.upstream = ManagedProcess(
            "upstream",
            [
                sys.executable,
                os.path.join(HERE, "upstream.py"),
                "--port",
                str(upstream_port),
                "--blobs",
                self.blobs,
                "--rate",
                str(self.rate),
            ],
            os.path.join(self.work, "upstream.log"),
            cwd=REPO_ROOT,
        ).start()
        self.stops.append(self.upstream.stop)
        self.nodes = [Node(self, port) for port in node_ports]
        for node in self.nodes:
            node.start()
            self.stops.append(node.stop)
        self.haproxy = HAProxy([("127.0.0.1", p) for p in node_ports], timeout=300).start()
        self.stops.append(self.haproxy.stop)
        self.redis.wait_ready()
        wait_until(lambda: self.upstream_log() is not None, "the upstream", 30, self.upstream)
        for node in self.nodes:
            node.wait_ready()
        self.haproxy.wait_ready()

    def stop(self) -> None:
        """Stop every process started (idempotent)."""
        stops, self.stops = self.stops, []
        for stop in reversed(stops):
            stop()

    # The upstream -----------------------------------------------------------

    def upstream_log(self) -> list[dict[str, Any]] | None:
        try:
            with urllib.request.urlopen(self.upstream_url + "/_admin/log", timeout=5) as r:
                result: list[dict[str, Any]] = json.loads(r.read())
                return result
        except OSError:
            return None

    def upstream_gets(self, digest: str) -> list[str | None]:
        """The C{Range} of each upstream GET of C{digest} (None: whole)."""
        log = self.upstream_log() or []
        return [e["range"] for e in log if e["digest"] == digest and e["method"] == "GET"]

    def add_blob(self, size: int, seed: bytes) -> str:
        """A blob of C{size} bytes upstream serves; its digest."""
        block = hashlib.sha512(seed).digest() * (MiB // 64)
        data = (block * (size // MiB + 1))[:size]
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        with open(os.path.join(self.blobs, digest[7:]), "wb") as f:
            f.write(data)
        return digest

    def add_manifest(self, layer: str, size: int) -> tuple[str, bytes]:
        """An OCI image manifest of C{layer} (and a config), served by digest: (digest, body)."""
        config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": [layer]},
            }
        ).encode()
        config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        with open(os.path.join(self.blobs, config_digest[7:]), "wb") as f:
            f.write(config)
        body = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": config_digest,
                    "size": len(config),
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": layer,
                        "size": size,
                    }
                ],
            }
        ).encode()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        os.makedirs(os.path.join(self.blobs, "manifests"), exist_ok=True)
        with open(os.path.join(self.blobs, "manifests", digest[7:]), "wb") as f:
            f.write(body)
        return digest, body

    # The store -------------------------------------------------------------

    def stored(self, digest: str, kind: str = "blobs") -> tuple[int, str]:
        """The S3 object's status and the digest of its bytes."""
        key = "/" + BUCKET + "/" + self.prefix + object_key(kind, digest)
        status, body = s3_request("GET", self.s3.endpoint, key)
        return status, "sha256:" + hashlib.sha256(body).hexdigest()

    def wait_stored(self, digest: str, kind: str = "blobs") -> None:
        wait_until(lambda: self.stored(digest, kind)[0] == 200, f"{digest} in S3", 30)

    def logs(self) -> str:
        return "\n".join(f"--- {n.port}\n{n.log()}" for n in self.nodes)
