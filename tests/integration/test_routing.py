"""Many registries behind one hammal (issue 4): ``--route`` by ``Host``,
containerd's ``?ns=``, registry-host path prefixes and ``--mirror`` failover,
against two real upstreams: the environment's token-auth Distribution (blobs
redirected to the CDN) and a second, plain Distribution without auth or
redirect over the same storage root (read-only use).

Path-prefix routing (``/v2/REGISTRY/name/...``) only recognises registry
hosts as hammal derives them from the upstream URLs (``urlsplit(url).netloc``),
and a repository name cannot contain ``:``; so a registry reached at
``127.0.0.1:PORT`` can never be named in the path (400 NAME_INVALID). The
dotted-host case is tested with a plain registry on ``127.0.0.1:80`` (upstream
URL ``http://127.0.0.1``, registry name ``127.0.0.1``) when port 80 can be bound.
"""

from __future__ import annotations

import re
import socket
from typing import Any, List, Tuple

from tests.integration.environment import (
    HammalProcess,
    ManagedProcess,
    free_port,
    http_request,
    wait_until,
)
from tests.integration.support import IntegrationTestCase
from tests.integration.test_access import (
    ACCEPT,
    fetch,
    hammal_output,
    launch_hammal,
    scrape,
    skopeo_copy,
)

_ACCESS_LINE = re.compile(r'"(GET|HEAD|POST|PUT|PATCH|DELETE) (/v2/[^ "]*) HTTP/1\.[01]" (\d{3})')


class RegistryLog:
    """The requests a Distribution process logged since this object was made."""

    def __init__(self, process: ManagedProcess) -> None:
        self.process = process
        self.start = len(process.log_text())

    def requests(self) -> List[Tuple[str, str, int]]:
        text = self.process.log_text()[self.start :]
        return [(m, p, int(s)) for m, p, s in _ACCESS_LINE.findall(text)]

    def paths(self) -> List[str]:
        return [p for _, p, _ in self.requests()]


def can_bind(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class _RoutingTestCase(IntegrationTestCase):
    """Starts a plain (auth-less, redirect-less) registry over the environment's storage."""

    def start_plain_registry(self, port: int = 0) -> Tuple[ManagedProcess, str]:
        port = port or free_port()
        plain = self.env._start_registry(f"plain-registry-{port}", port, None, None)
        self.addCleanup(plain.stop)
        url = f"http://127.0.0.1:{port}"
        wait_until(
            lambda: http_request("GET", url + "/v2/", timeout=2).status == 200,
            "the plain registry",
            30,
            plain,
        )
        return plain, url

    def env_registry_log(self) -> RegistryLog:
        assert self.env.registry is not None
        return RegistryLog(self.env.registry)

    def launch_settled(
        self, args: List[str], registries: List[ManagedProcess], **kwargs: Any
    ) -> HammalProcess:
        """
        hammal, once each of C{registries} saw its start-up ping (``GET
        /v2/``): what the tests count afterwards is only what they asked.
        """
        logs = [RegistryLog(registry) for registry in registries]
        hammal = launch_hammal(self, args, **kwargs)
        for registry, log in zip(registries, logs):
            wait_until(lambda: "/v2/" in log.paths(), "hammal's start-up ping", 10, registry)
        return hammal


class HostRoutingTests(_RoutingTestCase):
    """``--route a.test=TOKEN-AUTH --route b.test=PLAIN`` and no ``--upstream``."""

    def setUp(self) -> None:
        super().setUp()
        self.plain, self.plain_url = self.start_plain_registry()
        self.plain_host = self.plain_url.split("//", 1)[1]
        assert self.env.registry is not None
        self.hammal = self.launch_settled(
            ["--route", f"a.test={self.env.registry_url}", "--route", f"b.test={self.plain_url}"],
            [self.env.registry, self.plain],
            upstream=None,
        )

    def test_each_host_reaches_only_its_upstream(self) -> None:
        alpine = self.env.image("library/alpine:3.20")
        ociimg = self.env.image("library/ociimg:1")
        env_log, plain_log = self.env_registry_log(), RegistryLog(self.plain)

        self.assertEqual(fetch(self.hammal.url + "/v2/", [("Host", "a.test")]).status, 200)
        response = fetch(
            self.hammal.url + "/v2/library/alpine/manifests/3.20", [("Host", "a.test:443"), *ACCEPT]
        )
        self.assertEqual(response.status, 200, f"{response.describe()}\n{self.diagnostics()}")
        self.assertEqual(response.header("Docker-Content-Digest"), alpine.manifest_digest)
        blob = alpine.blob_digests[0]
        response = fetch(self.hammal.url + f"/v2/library/alpine/blobs/{blob}", [("Host", "a.test")])
        self.assertEqual(response.status, 200, response.describe())
        self.assertEqual(len(response.body), alpine.blob_sizes[blob])
        self.assertIn("/v2/library/alpine/manifests/3.20", env_log.paths())
        self.assertTrue(self.env.token_log(), "a.test: no token requested from the token server")
        self.assertTrue(self.env.cdn_log(), "a.test: blob not fetched through the CDN")
        self.assertEqual(plain_log.requests(), [], "a.test reached the plain registry")

        self.env.reset_logs()
        env_log, plain_log = self.env_registry_log(), RegistryLog(self.plain)
        response = fetch(
            self.hammal.url + "/v2/library/ociimg/manifests/1", [("Host", "B.TEST"), *ACCEPT]
        )
        self.assertEqual(response.status, 200, f"{response.describe()}\n{self.diagnostics()}")
        self.assertEqual(response.header("Docker-Content-Digest"), ociimg.manifest_digest)
        blob = ociimg.blob_digests[-1]
        response = fetch(self.hammal.url + f"/v2/library/ociimg/blobs/{blob}", [("Host", "b.test")])
        self.assertEqual(response.status, 200, response.describe())
        self.assertEqual(len(response.body), ociimg.blob_sizes[blob])
        self.assertIn("/v2/library/ociimg/manifests/1", plain_log.paths())
        self.assertIn(f"/v2/library/ociimg/blobs/{blob}", plain_log.paths())
        self.assertEqual(env_log.requests(), [], "b.test reached the token-auth registry")
        self.assertEqual(self.env.token_log(), [])
        self.assertEqual(self.env.cdn_log(), [])

    def test_unknown_host_is_404_listing_hosts(self) -> None:
        env_log, plain_log = self.env_registry_log(), RegistryLog(self.plain)
        for path in ("/v2/", "/v2/library/alpine/manifests/3.20"):
            response = fetch(self.hammal.url + path, [("Host", "c.test"), *ACCEPT])
            self.assertEqual(response.status, 404, response.describe())
            error = response.json()["errors"][0]
            self.assertEqual(error["detail"], {"hosts": ["a.test", "b.test"]}, response.describe())
        self.assertEqual(env_log.requests() + plain_log.requests(), [])
        self.assertEqual(self.env.token_log(), [])

    def test_ns_picks_the_registry(self) -> None:
        ociimg = self.env.image("library/ociimg:1")
        env_log, plain_log = self.env_registry_log(), RegistryLog(self.plain)
        # ?ns= wins over the Host header, and works for an unknown Host.
        for host in ("a.test", "c.test"):
            response = fetch(
                self.hammal.url + f"/v2/library/ociimg/manifests/1?ns={self.plain_host}",
                [("Host", host), *ACCEPT],
            )
            self.assertEqual(response.status, 200, f"{response.describe()}\n{self.diagnostics()}")
            self.assertEqual(response.header("Docker-Content-Digest"), ociimg.manifest_digest)
        self.assertIn("/v2/library/ociimg/manifests/1", plain_log.paths())
        self.assertEqual(env_log.requests(), [])
        response = fetch(
            self.hammal.url + f"/v2/library/ociimg/manifests/1?ns={self.env.registry_host}",
            [("Host", "b.test"), *ACCEPT],
        )
        self.assertEqual(response.status, 200, response.describe())
        self.assertIn("/v2/library/ociimg/manifests/1", env_log.paths())
        # A --route host name (what clients call the mirror) is not a registry name for ?ns=.
        response = fetch(self.hammal.url + "/v2/library/ociimg/manifests/1?ns=b.test", ACCEPT)
        self.assertEqual(response.status, 403, response.describe())

    def test_path_prefix_with_port_is_not_a_registry(self) -> None:
        """Documented limitation: ``/v2/127.0.0.1:PORT/name/...`` cannot route
        (``:`` is not allowed in a repository name)."""
        plain_log = RegistryLog(self.plain)
        response = fetch(
            self.hammal.url + f"/v2/{self.plain_host}/library/ociimg/manifests/1",
            [("Host", "c.test"), *ACCEPT],
        )
        self.assertEqual(response.status, 400, response.describe())
        self.assertEqual(response.json()["errors"][0]["code"], "NAME_INVALID")
        self.assertEqual(plain_log.requests(), [])


class SkopeoHostRoutingTests(_RoutingTestCase):
    def test_skopeo_pulls_by_host_name(self) -> None:
        """Real clients: ``localhost:PORT`` and ``127.0.0.1:PORT`` as two mirror hosts."""
        plain, plain_url = self.start_plain_registry()
        hammal = launch_hammal(
            self,
            ["--route", f"localhost={self.env.registry_url}", "--route", f"127.0.0.1={plain_url}"],
            upstream=None,
        )
        env_log, plain_log = self.env_registry_log(), RegistryLog(plain)
        alpine = self.env.image("library/alpine:3.20")
        skopeo_copy(
            self,
            f"localhost:{hammal.port}/alpine:3.20",
            alpine,
            ["--src-tls-verify=false", "--src-no-creds"],
        )
        self.assertIn("/v2/library/alpine/manifests/3.20", env_log.paths())
        self.assertFalse([p for p in plain_log.paths() if "alpine" in p], plain_log.paths())
        redis = self.env.image("bitnami/redis:7")
        skopeo_copy(
            self,
            f"127.0.0.1:{hammal.port}/bitnami/redis:7",
            redis,
            ["--src-tls-verify=false", "--src-no-creds"],
        )
        self.assertIn("/v2/bitnami/redis/manifests/7", plain_log.paths())
        self.assertFalse([p for p in env_log.paths() if "bitnami" in p], env_log.paths())
        for digest in redis.blob_digests:
            self.assertIn(f"/v2/bitnami/redis/blobs/{digest}", plain_log.paths())


class PathPrefixTests(_RoutingTestCase):
    """``/v2/REGISTRY/name/...`` for a registry whose host has no port."""

    def test_dotted_registry_host_in_path(self) -> None:
        if not can_bind(80):
            self.skipTest("needs to bind 127.0.0.1:80 (root) for a port-less registry URL")
        plain, _ = self.start_plain_registry(80)
        assert self.env.registry is not None
        hammal = self.launch_settled(
            ["--route", "plain.test=http://127.0.0.1"], [plain, self.env.registry]
        )
        plain_log, env_log = RegistryLog(plain), self.env_registry_log()
        ociimg = self.env.image("library/ociimg:1")
        response = hammal.request("GET", "/v2/127.0.0.1/library/ociimg/manifests/1", ACCEPT)
        self.assertEqual(response.status, 200, f"{response.describe()}\n{self.diagnostics()}")
        self.assertEqual(response.header("Docker-Content-Digest"), ociimg.manifest_digest)
        skopeo_copy(
            self,
            f"{hammal.host}/127.0.0.1/library/ociimg:1",
            ociimg,
            ["--src-tls-verify=false", "--src-no-creds"],
        )
        self.assertIn("/v2/library/ociimg/manifests/1", plain_log.paths())
        for digest in ociimg.blob_digests:
            self.assertIn(f"/v2/library/ociimg/blobs/{digest}", plain_log.paths())
        self.assertEqual(env_log.requests(), [], "the default upstream was used")
        # An unknown dotted first component is just part of the name (default upstream).
        response = hammal.request("GET", "/v2/unknown.example/library/ociimg/manifests/1", ACCEPT)
        self.assertEqual(response.status, 404, response.describe())
        self.assertIn("/v2/unknown.example/library/ociimg/manifests/1", env_log.paths())


class MirrorFailoverTests(_RoutingTestCase):
    def test_failover_to_mirror(self) -> None:
        _, plain_url = self.start_plain_registry()
        closed = free_port()
        hammal = launch_hammal(self, ["--mirror", plain_url], upstream=f"http://127.0.0.1:{closed}")
        alpine = self.env.image("library/alpine:3.20")
        skopeo_copy(
            self, f"{hammal.host}/alpine:3.20", alpine, ["--src-tls-verify=false", "--src-no-creds"]
        )
        skopeo_copy(
            self,
            f"{hammal.host}/library/multi:1",
            self.env.image("library/multi:1"),
            ["--src-tls-verify=false", "--src-no-creds"],
            all_platforms=True,
        )
        log = hammal_output(hammal)
        self.assertRegex(
            log, rf"upstream 127\.0\.0\.1:{closed} failed \(.*\); trying the next mirror"
        )
        metrics = scrape(hammal.url + "/metrics")
        failovers = metrics.get("hammal_upstream_failovers_total", host=f"127.0.0.1:{closed}")
        self.assertGreater(failovers, 0, metrics.text)
        ready = hammal.request("GET", "/readyz")
        self.assertEqual(ready.status, 200, f"/readyz with a working mirror: {ready.describe()}")
