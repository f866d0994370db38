"""The processes of a benchmark run, all on 127.0.0.1.

* :class:`BenchUpstream`: the token server of the integration tests, an
  nginx "CDN" serving Distribution's storage root (``sendfile``, access log
  of every request), and CNCF Distribution with token auth and the
  ``redirect`` storage middleware pointing blob GETs at that CDN, as Docker
  Hub does. It is seeded through a second, auth-less registry process on the
  same storage (see ``tests/integration/environment.py``).
* :class:`NginxReference`: nginx ``proxy_pass`` straight to that upstream,
  no cache. nginx resolves the upstream's ``307`` itself:
  ``proxy_intercept_errors on; error_page 301 302 303 307 308 = @cdn;`` and
  ``location @cdn { proxy_pass $upstream_http_location; }`` (saved in a
  variable first), dropping ``Authorization`` towards the CDN. Clients
  authenticate end to end (the upstream's ``401`` and its challenge pass
  through), so curl and wrk send a bearer token fetched beforehand, and
  skopeo does the token dance itself.
* :class:`DistributionPeer`: Distribution as a pull-through cache
  (``proxy: {remoteurl, username, password}``) against the token-auth
  upstream; :meth:`DistributionPeer.restart_fresh` gives it empty storage.
* :class:`HammalBench`: ``twistd -n hammal`` with ``--upstream``, a fresh
  ``--cache-dir``, ``--buffer-size`` and the glibc malloc settings.

Every process is a :class:`tests.integration.environment.ManagedProcess`:
stopped by the harness, at exit, or by the kernel when the harness dies.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

from tests.integration import images as it_images
from tests.integration.environment import (
    ADMIN_PASSWORD,
    ADMIN_USER,
    PRIVATE_PASSWORD,
    PRIVATE_USER,
    REGISTRY_BIN,
    REGISTRY_SERVICE,
    REPO_ROOT,
    TOKEN_ISSUER,
    HarnessError,
    ManagedProcess,
    _registry_config,
    clean_env,
    free_port,
    http_request,
    make_tempdir,
    skopeo,
    twistd_path,
    wait_until,
)
from tests.integration.environment import (
    HERE as IT_HERE,
)
from tests.integration.pki import PKIFiles, generate_pki

NGINX_BIN = shutil.which("nginx") or "/usr/sbin/nginx"

#: Every manifest media type, comma-separated (one ``Accept`` header).
ACCEPT_ALL = ", ".join(it_images.ALL_MANIFEST_TYPES)

MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "4194304",
    "MALLOC_TRIM_THRESHOLD_": "67108864",
}


# -- images ---------------------------------------------------------------------


class BenchImage:
    """An OCI image written to disk for seeding, and what it holds."""

    def __init__(
        self,
        repo: str,
        tag: str,
        path: str,
        manifest_digest: str,
        blobs: Dict[str, int],
        layers: List[str],
    ) -> None:
        self.repo = repo
        self.tag = tag
        self.path = path
        self.manifest_digest = manifest_digest
        self.blobs = blobs  # digest -> size (config and layers)
        self.layers = layers  # layer digests, in order

    @property
    def reference(self) -> str:
        return f"{self.repo}:{self.tag}"

    @property
    def skopeo_source(self) -> str:
        return f"oci:{self.path}:{self.tag}"

    @property
    def largest_layer(self) -> Tuple[str, int]:
        digest = max(self.layers, key=lambda d: self.blobs[d])
        return digest, self.blobs[digest]


def build_image(
    root: str, repo: str, tag: str, layer_sizes: Sequence[int], seed: int
) -> BenchImage:
    """An OCI image of uncompressed tar layers of random bytes.

    Each layer is a tar holding one random file of (about) the given size;
    layers are uncompressed so nothing is spent on gzip.
    """
    import random

    rng = random.Random(seed)
    path = os.path.join(root, repo.replace("/", "_") + "_" + tag)
    layout = it_images._Layout(path, "oci")
    files = []
    for i, size in enumerate(layer_sizes):
        # tar adds a 512-byte header and pads to 10 KiB records
        payload = max(1, size - 10240)
        files.append([(f"bench/layer{i}.bin", rng.randbytes(payload))])
    manifest, mtype, digests = it_images._image(
        layout, rng, False, files, uncompressed=[True] * len(files), label=repo
    )
    digest = it_images._write_index_json(layout, manifest, mtype, tag)
    return BenchImage(repo, tag, path, digest, dict(layout.sizes), digests[1:])


# -- nginx ------------------------------------------------------------------------


class Nginx:
    """An nginx master (``daemon off``) with its own prefix, config and logs."""

    def __init__(self, name: str, workdir: str, http_block: str, workers: str = "1") -> None:
        self.name = name
        self.prefix = os.path.join(workdir, name)
        os.makedirs(os.path.join(self.prefix, "logs"), exist_ok=True)
        os.makedirs(os.path.join(self.prefix, "tmp"), exist_ok=True)
        self.conf = os.path.join(self.prefix, "nginx.conf")
        user = "user root root;\n" if os.geteuid() == 0 else ""
        tmp = os.path.join(self.prefix, "tmp")
        with open(self.conf, "w") as f:
            f.write(
                f"{user}worker_processes {workers};\n"
                f"pid {self.prefix}/nginx.pid;\n"
                f"error_log {self.prefix}/logs/error.log warn;\n"
                "events { worker_connections 8192; multi_accept on; }\n"
                "http {\n"
                f"  client_body_temp_path {tmp}/body;\n"
                f"  proxy_temp_path {tmp}/proxy;\n"
                f"  fastcgi_temp_path {tmp}/fcgi;\n"
                f"  uwsgi_temp_path {tmp}/uwsgi;\n"
                f"  scgi_temp_path {tmp}/scgi;\n"
                "  log_format bench '$request_method $uri $status $body_bytes_sent"
                " $request_time';\n"
                f"  access_log {self.access_log} bench;\n"
                "  keepalive_requests 1000000;\n"
                f"{http_block}\n"
                "}\n"
            )
        self.process: Optional[ManagedProcess] = None

    @property
    def access_log(self) -> str:
        return os.path.join(self.prefix, "logs", "access.log")

    def start(self, port: int) -> "Nginx":
        self.process = ManagedProcess(
            self.name,
            [
                NGINX_BIN,
                "-p",
                self.prefix,
                "-e",
                os.path.join(self.prefix, "logs", "error.log"),
                "-c",
                self.conf,
                "-g",
                "daemon off;",
            ],
            os.path.join(self.prefix, "logs", "stdout.log"),
            cwd=self.prefix,
        ).start()
        wait_until(
            lambda: http_request("GET", f"http://127.0.0.1:{port}/", timeout=2).status > 0,
            f"{self.name} on port {port}",
            process=self.process,
        )
        return self

    def pids(self) -> List[int]:
        """The master and its workers."""
        if self.process is None or self.process.pid is None:
            return []
        return [self.process.pid] + children(self.process.pid)

    def log_offset(self) -> int:
        try:
            return os.path.getsize(self.access_log)
        except FileNotFoundError:
            return 0

    def log_lines(self, since: int = 0) -> List[str]:
        try:
            with open(self.access_log, "rb") as f:
                f.seek(since)
                return f.read().decode("latin-1").splitlines()
        except FileNotFoundError:
            return []

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=10, sig=15)


def children(pid: int) -> List[int]:
    """Direct children of *pid* (from /proc)."""
    out = []
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            out = [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


# -- the upstream ---------------------------------------------------------------


class BenchUpstream:
    """Token server, nginx CDN, token-auth Distribution; seeded with images."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.storage_root = os.path.join(workdir, "storage")
        self.logdir = os.path.join(workdir, "logs")
        os.makedirs(self.storage_root, exist_ok=True)
        os.makedirs(self.logdir, exist_ok=True)
        self.token_port = free_port()
        self.cdn_port = free_port()
        self.registry_port = free_port()
        self.pki: Optional[PKIFiles] = None
        self.token_server: Optional[ManagedProcess] = None
        self.registry: Optional[ManagedProcess] = None
        self.cdn = Nginx(
            "cdn",
            workdir,
            "  sendfile on; tcp_nopush on;\n"
            "  server {\n"
            f"    listen 127.0.0.1:{self.cdn_port} backlog=4096;\n"
            f"    root {self.storage_root};\n"
            "    types { } default_type application/octet-stream;\n"
            "    autoindex off;\n"
            "    location / { }\n"
            "  }",
            workers="2",
        )

    @property
    def registry_url(self) -> str:
        return f"http://127.0.0.1:{self.registry_port}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self.cdn_port}"

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.token_port}/token"

    def start(self, images: Sequence[BenchImage]) -> "BenchUpstream":
        pki_dir = os.path.join(self.workdir, "pki")
        os.makedirs(pki_dir)
        self.pki = generate_pki(pki_dir)
        users = {PRIVATE_USER: PRIVATE_PASSWORD, ADMIN_USER: ADMIN_PASSWORD}
        self.token_server = ManagedProcess(
            "tokenserver",
            [
                sys.executable,
                os.path.join(IT_HERE, "tokenserver.py"),
                "--port",
                str(self.token_port),
                "--key",
                self.pki.signing_key,
                "--cert",
                self.pki.signing_cert,
                "--issuer",
                TOKEN_ISSUER,
                "--service",
                REGISTRY_SERVICE,
                "--users",
                json.dumps(users),
            ],
            os.path.join(self.logdir, "tokenserver.log"),
            env=clean_env(PYTHONUNBUFFERED="1"),
        ).start()
        self.cdn.start(self.cdn_port)
        self._seed(images)
        self.registry = start_registry(
            "registry",
            self.workdir,
            self.registry_port,
            self.storage_root,
            auth={
                "realm": self.realm,
                "service": REGISTRY_SERVICE,
                "issuer": TOKEN_ISSUER,
                "rootcertbundle": self.pki.ca_cert,
            },
            redirect_baseurl=self.cdn_url + "/",
        )
        wait_until(
            lambda: (
                http_request("GET", self.realm.replace("/token", "/_admin/log"), timeout=2).status
                == 200
            ),
            "token server",
            process=self.token_server,
        )
        wait_until(
            lambda: http_request("GET", self.registry_url + "/v2/", timeout=2).status == 401,
            "registry /v2/ -> 401",
            process=self.registry,
        )
        return self

    def _seed(self, images: Sequence[BenchImage]) -> None:
        port = free_port()
        seeder = start_registry("seed-registry", self.workdir, port, self.storage_root)
        try:
            wait_until(
                lambda: (
                    http_request("GET", f"http://127.0.0.1:{port}/v2/", timeout=2).status == 200
                ),
                "seeding registry",
                process=seeder,
            )
            for img in images:
                result = skopeo(
                    [
                        "copy",
                        "--quiet",
                        "--preserve-digests",
                        "--dest-tls-verify=false",
                        img.skopeo_source,
                        f"docker://127.0.0.1:{port}/{img.reference}",
                    ],
                    timeout=600,
                )
                if result.returncode != 0:
                    raise HarnessError(f"seeding {img.reference} failed:\n{result.stderr}")
        finally:
            seeder.stop()

    def token(self, repo: str) -> str:
        """An anonymous pull token for *repo* (for clients of the nginx reference)."""
        resp = http_request(
            "GET",
            f"{self.realm}?service={REGISTRY_SERVICE}&scope=repository:{repo}:pull",
            timeout=10,
        )
        if resp.status != 200:
            raise HarnessError(f"token request failed: {resp.describe()}")
        return str(resp.json()["token"])

    def stop(self) -> None:
        for proc in (self.registry, self.token_server):
            if proc is not None:
                proc.stop()
        self.cdn.stop()


def start_registry(
    name: str,
    workdir: str,
    port: int,
    storage_root: str,
    auth: Optional[Dict[str, str]] = None,
    redirect_baseurl: Optional[str] = None,
    proxy: Optional[Dict[str, str]] = None,
) -> ManagedProcess:
    """``docker-registry serve`` with the integration tests' configuration,
    plus optionally ``proxy:`` (pull-through cache mode)."""
    config = json.loads(_registry_config(port, storage_root, auth, redirect_baseurl))
    # An access log line per request costs Distribution as much as it costs
    # hammal and nginx (all three log every request).
    if proxy:
        config["proxy"] = proxy
    config_path = os.path.join(workdir, f"{name}-{port}.yml")
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
    logdir = os.path.join(workdir, "logs")
    os.makedirs(logdir, exist_ok=True)
    return ManagedProcess(
        name,
        [REGISTRY_BIN, "serve", config_path],
        os.path.join(logdir, f"{name}.log"),
        env=clean_env(HOME=workdir),
        cwd=workdir,
    ).start()


# -- what is measured -----------------------------------------------------------


class NginxReference:
    """nginx ``proxy_pass`` to the upstream, resolving its CDN redirects itself."""

    name = "nginx"

    def __init__(self, workdir: str, upstream: BenchUpstream) -> None:
        self.port = free_port()
        self.upstream = upstream
        self.nginx = Nginx(
            "nginx-reference",
            workdir,
            "  proxy_http_version 1.1;\n"
            "  proxy_buffering on;\n"
            "  proxy_buffer_size 64k;\n"
            "  proxy_buffers 8 1m;\n"
            "  proxy_busy_buffers_size 2m;\n"
            "  proxy_max_temp_file_size 0;\n"
            "  proxy_read_timeout 60s;\n"
            "  client_max_body_size 0;\n"
            "  upstream registry {\n"
            f"    server 127.0.0.1:{upstream.registry_port};\n"
            "    keepalive 64;\n"
            "  }\n"
            "  server {\n"
            f"    listen 127.0.0.1:{self.port} backlog=4096;\n"
            "    location / {\n"
            "      proxy_pass http://registry;\n"
            '      proxy_set_header Connection "";\n'
            "      proxy_intercept_errors on;\n"
            "      error_page 301 302 303 307 308 = @cdn;\n"
            "    }\n"
            "    location @cdn {\n"
            "      set $cdn_location $upstream_http_location;\n"
            '      proxy_set_header Authorization "";\n'
            '      proxy_set_header Connection "";\n'
            "      proxy_pass $cdn_location;\n"
            "    }\n"
            "  }",
            workers="1",
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "NginxReference":
        self.nginx.start(self.port)
        return self

    def stop(self) -> None:
        self.nginx.stop()

    def pids(self) -> List[int]:
        return self.nginx.pids()

    def client_headers(self, repo: str) -> List[Tuple[str, str]]:
        """A bearer token, fetched beforehand: the client authenticates itself."""
        return [("Authorization", f"Bearer {self.upstream.token(repo)}")]


class DistributionPeer:
    """CNCF Distribution as a pull-through cache of the token-auth upstream."""

    name = "distribution"

    def __init__(self, workdir: str, upstream: BenchUpstream) -> None:
        self.workdir = workdir
        self.upstream = upstream
        self.port = free_port()
        self.process: Optional[ManagedProcess] = None
        self.generation = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restart_fresh(self) -> "DistributionPeer":
        """(Re)start on an empty storage directory."""
        self.stop()
        self.generation += 1
        storage = os.path.join(self.workdir, f"peer-storage-{self.generation}")
        old = os.path.join(self.workdir, f"peer-storage-{self.generation - 1}")
        shutil.rmtree(old, ignore_errors=True)
        os.makedirs(storage)
        self.process = start_registry(
            "distribution-peer",
            self.workdir,
            self.port,
            storage,
            proxy={
                "remoteurl": self.upstream.registry_url,
                "username": ADMIN_USER,
                "password": ADMIN_PASSWORD,
            },
        )
        wait_until(
            lambda: http_request("GET", self.url + "/v2/", timeout=2).status == 200,
            "distribution peer /v2/",
            process=self.process,
        )
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def pids(self) -> List[int]:
        return [self.process.pid] if self.process and self.process.pid else []

    def client_headers(self, repo: str) -> List[Tuple[str, str]]:
        return []


class HammalBench:
    """hammal under test: ``twistd -n hammal`` with a fresh cache directory."""

    name = "hammal"

    def __init__(
        self,
        workdir: str,
        upstream: BenchUpstream,
        buffer_size: str = "1M",
        extra_args: Sequence[str] = (),
    ) -> None:
        self.workdir = workdir
        self.upstream = upstream
        self.buffer_size = buffer_size
        self.extra_args = list(extra_args)
        self.port = free_port()
        self.process: Optional[ManagedProcess] = None
        self.generation = 0
        self.cache_dir = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> List[str]:
        return [
            twistd_path(),
            "--pidfile=",
            "-n",
            "hammal",
            "--port",
            f"tcp:{self.port}:interface=127.0.0.1",
            "--upstream",
            self.upstream.registry_url,
            "--upstream-username",
            ADMIN_USER,
            "--upstream-password",
            ADMIN_PASSWORD,
            "--cache-dir",
            self.cache_dir,
            "--buffer-size",
            self.buffer_size,
            *self.extra_args,
        ]

    def restart_fresh(self) -> "HammalBench":
        """(Re)start with an empty cache directory."""
        self.stop()
        self.generation += 1
        old = self.cache_dir
        if old:
            shutil.rmtree(old, ignore_errors=True)
        # a directory of its own: two HammalBench share the workdir (and
        # count generations alike), and a shared name made a "cold" GET a hit
        self.cache_dir = tempfile.mkdtemp(
            prefix=f"hammal-cache-{self.generation}-", dir=self.workdir
        )
        env = {
            k: v
            for k, v in clean_env().items()
            if not k.startswith("HAMMAL_") and k not in ("DOCKER_USERNAME", "DOCKER_PASSWORD")
        }
        env.update(MALLOC_ENV)
        env["PYTHONPATH"] = REPO_ROOT
        env["PYTHONUNBUFFERED"] = "1"
        self.process = ManagedProcess(
            "hammal",
            self.argv(),
            os.path.join(self.workdir, "logs", "hammal.log"),
            env=env,
            cwd=self.workdir,
        ).start()
        wait_until(
            lambda: http_request("GET", self.url + "/v2/", timeout=2).status == 200,
            "hammal /v2/",
            process=self.process,
        )
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def pids(self) -> List[int]:
        return [self.process.pid] if self.process and self.process.pid else []

    def client_headers(self, repo: str) -> List[Tuple[str, str]]:
        return []


def bench_workdir() -> str:
    """A temp dir for the run (removed at exit unless HAMMAL_IT_KEEP=1)."""
    path = make_tempdir("hammal-bench-")
    os.makedirs(os.path.join(path, "logs"), exist_ok=True)
    return path
