"""
Real processes for the cluster tests, on free loopback ports: SeaweedFS as
an S3 store (L{SeaweedFS}) and HAProxy as a round-robin load balancer
(L{HAProxy}, with its config from L{haproxy_config}). Redis comes from
L{tests.integration.environment.RedisServer}.

Every process is a L{ManagedProcess} (stopped by the tests' cleanups, and at
exit in any case); every directory comes from L{make_tempdir}.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys

from twisted.trial.unittest import SkipTest

from tests.integration.environment import ManagedProcess, make_tempdir, wait_until


def require_binaries(*paths: str) -> None:
    """Skip the test when one of C{paths} is not an executable."""
    missing = [p for p in paths if not (os.path.isfile(p) and os.access(p, os.X_OK))]
    if missing:
        raise SkipTest(f"missing {', '.join(missing)} (make system-deps / make deps)")


def which(name: str, *fallbacks: str) -> str:
    """The path of C{name} on PATH, else the first existing fallback."""
    found = shutil.which(name)
    if found:
        return found
    for path in fallbacks:
        if os.path.exists(path):
            return path
    return fallbacks[0] if fallbacks else name


def free_ports(count: int) -> list[int]:
    """C{count} distinct loopback TCP ports that were free a moment ago."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _venv_bin(name: str) -> str:
    """C{name} beside this interpreter (the venv's C{bin/}), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    return beside if os.path.exists(beside) else which(name, beside)


WEED_BIN = _venv_bin("weed")

#: The S3 identity the SeaweedFS harness accepts (nothing else is).
S3_ACCESS_KEY = "hammal-test-access"
S3_SECRET_KEY = "hammal-test-secret-4d1e"
S3_REGION = "us-east-1"


class SeaweedFS:
    """
    A one-process SeaweedFS (master, volume, filer and S3 gateway) on free
    loopback ports, whose S3 API accepts only requests signed for
    L{S3_ACCESS_KEY}/L{S3_SECRET_KEY}.

    Every port is chosen here, gRPC ones included (SeaweedFS would take
    port + 10000), and the side services it starts by default on fixed
    ports (Iceberg, Lance) are turned off.
    """

    def __init__(self, workdir: str | None = None) -> None:
        self.workdir = workdir or make_tempdir("hammal-seaweedfs-")
        self.process: ManagedProcess | None = None
        self.s3_port = 0
        self._grpc_ports: list[int] = []

    @property
    def endpoint(self) -> str:
        """The S3 endpoint URL (path-style)."""
        return f"http://127.0.0.1:{self.s3_port}"

    def environ(self) -> dict[str, str]:
        """The C{AWS_*} variables for this store."""
        return {
            "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
            "AWS_REGION": S3_REGION,
        }

    def start(self) -> "SeaweedFS":
        """Start the server and return without waiting (see L{wait_ready})."""
        config = os.path.join(self.workdir, "s3.json")
        with open(config, "w") as f:
            json.dump(
                {
                    "identities": [
                        {
                            "name": "hammal",
                            "credentials": [
                                {"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}
                            ],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                },
                f,
            )
        data = os.path.join(self.workdir, "data")
        os.makedirs(data, exist_ok=True)
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = free_ports(8)
        self.s3_port = s3
        self._grpc_ports = [master_grpc, volume_grpc, filer_grpc, s3_grpc]
        argv = [
            WEED_BIN,
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={data}",
            f"-master.port={master}",
            f"-master.port.grpc={master_grpc}",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}",
            "-volume.max=20",
            "-filer",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_grpc}",
            "-s3",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3_grpc}",
            f"-s3.config={config}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-filer.localSocket={os.path.join(self.workdir, 'filer.sock')}",
            f"-s3.localSocket={os.path.join(self.workdir, 's3.sock')}",
        ]
        self.process = ManagedProcess(
            "seaweedfs", argv, os.path.join(self.workdir, "weed.log"), cwd=self.workdir
        ).start()
        return self

    def answers(self) -> bool:
        """True once the S3 gateway answers HTTP (any status)."""
        try:
            with socket.create_connection(("127.0.0.1", self.s3_port), timeout=1) as s:
                s.sendall(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                return s.recv(16).startswith(b"HTTP/")
        except OSError:
            return False

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the S3 gateway answers."""
        wait_until(self.answers, "SeaweedFS's S3 gateway", timeout, self.process, 0.2)

    def stop(self) -> None:
        """Stop the server (and remove the socket it leaves in /tmp)."""
        if self.process is not None:
            self.process.stop()
        # Not configurable: SeaweedFS puts a socket per gRPC port in /tmp.
        for role in ("master", "volume", "filer", "s3"):
            for port in self._grpc_ports:
                path = f"/tmp/seaweedfs-{role}-grpc-{port}.sock"
                if os.path.exists(path):
                    os.unlink(path)


_seaweedfs: SeaweedFS | None = None


def shared_seaweedfs() -> SeaweedFS:
    """
    One SeaweedFS per trial process, started on first use (it takes a few
    seconds) and stopped at exit; tests keep apart by key prefix.
    """
    global _seaweedfs
    require_binaries(WEED_BIN)
    if _seaweedfs is None or _seaweedfs.process is None or not _seaweedfs.process.running():
        server = SeaweedFS().start()
        try:
            server.wait_ready()
        except Exception:
            server.stop()
            raise
        _seaweedfs = server
        atexit.register(server.stop)
    return _seaweedfs


HAPROXY_BIN = which("haproxy", "/usr/sbin/haproxy")


def haproxy_config(
    port: int,
    backends: list[tuple[str, int]],
    timeout: float = 300.0,
    health_path: str | None = None,
) -> str:
    """
    An HAProxy configuration: HTTP on C{127.0.0.1:port}, round-robin over
    C{backends} (host, port). C{timeout} (seconds) bounds client and server
    inactivity and must exceed the slowest large-blob transfer; with
    C{health_path}, a backend that fails C{GET health_path} is taken out.
    """
    seconds = max(1, int(timeout))
    lines = [
        "global",
        "    maxconn 4096",
        "",
        "defaults",
        "    mode http",
        "    option http-keep-alive",
        "    timeout connect 5s",
        f"    timeout client {seconds}s",
        f"    timeout server {seconds}s",
        "    timeout http-request 30s",
        # A node that refuses connections (killed) costs no request: the
        # connection is retried on another server.
        "    retries 2",
        "    option redispatch 1",
        "",
        "frontend hammal",
        f"    bind 127.0.0.1:{port}",
        "    default_backend nodes",
        "",
        "backend nodes",
        "    balance roundrobin",
    ]
    if health_path:
        lines.append(f"    option httpchk GET {health_path}")
    check = " check inter 1s fall 2 rise 1" if health_path else ""
    for index, (host, backend_port) in enumerate(backends, 1):
        lines.append(f"    server node{index} {host}:{backend_port}{check}")
    return "\n".join(lines) + "\n"


class HAProxy:
    """C{haproxy -db} in the foreground with a config from L{haproxy_config}."""

    def __init__(
        self,
        backends: list[tuple[str, int]],
        workdir: str | None = None,
        **options: object,
    ) -> None:
        self.workdir = workdir or make_tempdir("hammal-haproxy-")
        self.backends = backends
        self.options = options
        self.port = free_ports(1)[0]
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        """The balancer's base URL."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "HAProxy":
        """Write the config, check it (C{haproxy -c}) and start."""
        config = os.path.join(self.workdir, "haproxy.cfg")
        with open(config, "w") as f:
            f.write(haproxy_config(self.port, self.backends, **self.options))  # type: ignore[arg-type]
        check = subprocess.run(
            [HAPROXY_BIN, "-c", "-q", "-f", config],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if check.returncode != 0:
            raise RuntimeError(f"haproxy refused its config: {check.stdout}{check.stderr}")
        self.process = ManagedProcess(
            "haproxy",
            [HAPROXY_BIN, "-db", "-f", config],
            os.path.join(self.workdir, "haproxy.log"),
            cwd=self.workdir,
        ).start()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the frontend accepts connections."""
        wait_until(lambda: _port_open(self.port), "haproxy's frontend", timeout, self.process)

    def stop(self) -> None:
        """Stop HAProxy."""
        if self.process is not None:
            self.process.stop()


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False
