"""hammal behind an outbound forward proxy: Debian's ``tinyproxy`` carries
every upstream, token and CDN request of a skopeo pull, for an ``http://``
upstream (absolute-form requests) and an ``https://`` one (``CONNECT``
tunnels, TLS verified against a private CA with ``--upstream-ca``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import unittest
from typing import Dict, List, Mapping, Sequence

from tests.integration.environment import (
    REGISTRY_BIN,
    REGISTRY_SERVICE,
    REPO_ROOT,
    TOKEN_ISSUER,
    HammalProcess,
    ManagedProcess,
    _hammal_env,
    _registry_config,
    free_port,
    hammal_argv,
    http_request,
    make_tempdir,
    port_open,
    wait_until,
)
from tests.integration.support import IntegrationTestCase

TINYPROXY_BIN = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
PROXY_USER = "proxyuser"
PROXY_PASSWORD = "pr0xy-s3cret-41"


class TinyProxy:
    """``tinyproxy -d`` on a free loopback port, requiring Basic credentials."""

    def __init__(self, connect_ports: Sequence[int]) -> None:
        self.workdir = make_tempdir("hammal-it-tinyproxy-")
        self.port = free_port()
        self.log_path = os.path.join(self.workdir, "tinyproxy.log")
        config = os.path.join(self.workdir, "tinyproxy.conf")
        lines = [
            f"Port {self.port}",
            "Listen 127.0.0.1",
            "Allow 127.0.0.1",
            "Timeout 60",
            f'LogFile "{self.log_path}"',
            "LogLevel Info",
            "MaxClients 100",
            f"BasicAuth {PROXY_USER} {PROXY_PASSWORD}",
            *(f"ConnectPort {port}" for port in connect_ports),
        ]
        with open(config, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.process = ManagedProcess(
            "tinyproxy",
            [TINYPROXY_BIN, "-d", "-c", config],
            os.path.join(self.workdir, "stdout.log"),
        ).start()
        wait_until(lambda: port_open(self.port), "tinyproxy", process=self.process)

    @property
    def url(self) -> str:
        return f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{self.port}"

    def log_text(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def targets(self) -> List[str]:
        """Every ``HOST:PORT`` tinyproxy opened a connection to, in order."""
        return re.findall(r"opening connection to (\S+?:\d+)", self.log_text())

    def connects(self) -> List[str]:
        """The targets of CONNECT requests (``CONNECT host:port``)."""
        return re.findall(r"Request \(file descriptor \d+\): CONNECT (\S+)", self.log_text())

    def stop(self) -> None:
        self.process.stop()


def _start_hammal(
    test: IntegrationTestCase, upstream: str, environ: Mapping[str, str], extra: Sequence[str] = ()
) -> HammalProcess:
    """hammal with exactly C{environ}'s proxy variables (none of the harness's NO_PROXY)."""
    port = free_port()
    workdir = make_tempdir("hammal-it-hammal-")
    argv = hammal_argv(
        port, upstream, cache_dir=os.path.join(workdir, "cache"), extra_args=list(extra)
    )
    env = {
        k: v
        for k, v in _hammal_env().items()
        if k.lower() not in ("http_proxy", "https_proxy", "no_proxy", "all_proxy")
    }
    env.update(environ)
    process = ManagedProcess("hammal", argv, os.path.join(workdir, "hammal.log"), env=env).start()
    hammal = HammalProcess(process, port, argv)
    test.addCleanup(hammal.stop)
    test._hammals.append(hammal)
    wait_until(
        lambda: http_request("GET", hammal.url + "/v2/", timeout=2).status == 200,
        "hammal /v2/",
        process=process,
    )
    return hammal


class ForwardProxyTests(IntegrationTestCase):
    """A pull whose every upstream byte crossed tinyproxy."""

    def setUp(self) -> None:
        super().setUp()
        if not os.access(TINYPROXY_BIN, os.X_OK):
            if os.environ.get("CI"):
                self.fail("tinyproxy is not installed (make system-deps)")
            raise unittest.SkipTest("tinyproxy is not installed (make system-deps)")

    def _proxy(self, connect_ports: Sequence[int] = ()) -> TinyProxy:
        proxy = TinyProxy(connect_ports)
        self.addCleanup(proxy.stop)
        return proxy

    def _check_no_secret(self, hammal: HammalProcess, secret: str = PROXY_PASSWORD) -> None:
        """hammal's own lines (the harness writes the command line first)."""
        own = [line for line in hammal.log_text().splitlines() if not line.startswith("==> ")]
        self.assertTrue(own)
        self.assertNotIn(secret, "\n".join(own))

    def test_http_upstream_through_http_proxy(self) -> None:
        """HTTP_PROXY from the environment: absolute-form requests to the
        registry, the token realm and the CDN, with the proxy's credentials."""
        proxy = self._proxy()
        hammal = _start_hammal(self, self.env.registry_url, {"HTTP_PROXY": proxy.url})
        image = self.env.image("library/alpine:3.20")
        self.pull(hammal.host, "alpine", image)
        targets = set(proxy.targets())
        for port, what in (
            (self.env.registry_port, "registry"),
            (self.env.token_port, "token realm"),
            (self.env.cdn_port, "CDN"),
        ):
            self.assertIn(
                f"127.0.0.1:{port}",
                targets,
                f"the {what} was reached around the proxy\n{proxy.log_text()[-3000:]}"
                f"\n{self.diagnostics()}",
            )
        self.assertTrue(self.env.token_log(), "no token request reached the token server")
        self._check_no_secret(hammal)

    def test_no_proxy_exempts_loopback_only_when_listed(self) -> None:
        proxy = self._proxy()
        hammal = _start_hammal(
            self,
            self.env.registry_url,
            {
                "http_proxy": proxy.url,
                "no_proxy": "10.0.0.0/8, 127.0.0.0/8",
            },
        )
        self.pull(hammal.host, "alpine", self.env.image("library/alpine:3.20"))
        self.assertEqual(proxy.targets(), [], proxy.log_text()[-2000:])

    def test_wrong_proxy_credentials_fail_cleanly(self) -> None:
        proxy = self._proxy()
        wrong = f"http://{PROXY_USER}:not-the-password@127.0.0.1:{proxy.port}"
        hammal = _start_hammal(
            self, self.env.registry_url, {}, ["--upstream-proxy", wrong, "--retries", "0"]
        )
        response = hammal.request("GET", "/v2/library/alpine/manifests/3.20")
        # tinyproxy answers wrong credentials with a 401 of its own.
        self.assertGreaterEqual(response.status, 400, response.describe())
        self.assertNotIn("not-the-password", response.body.decode())
        self._check_no_secret(hammal, "not-the-password")
        self.assertEqual(proxy.targets(), [])

    def test_missing_proxy_credentials_are_hammals_problem(self) -> None:
        """The proxy's 407 is not relayed (a client would think its own
        proxy wants credentials): a 502 naming it."""
        proxy = self._proxy()
        hammal = _start_hammal(
            self,
            self.env.registry_url,
            {},
            [
                "--upstream-proxy",
                f"http://127.0.0.1:{proxy.port}",
                "--retries",
                "0",
            ],
        )
        response = hammal.request("GET", "/v2/library/alpine/manifests/3.20")
        self.assertOCIError(response, 502, "UNAVAILABLE", ["407"])
        self.assertEqual(proxy.targets(), [])

    def test_https_upstream_through_connect_tunnel(self) -> None:
        """--upstream-proxy wins over the environment; https:// goes through
        CONNECT with the upstream's certificate checked against --upstream-ca."""
        assert self.env.pki is not None
        registry_port = free_port()
        registry = self._tls_registry(registry_port)
        self.addCleanup(registry.stop)
        proxy = self._proxy([registry_port])
        hammal = _start_hammal(
            self,
            f"https://127.0.0.1:{registry_port}",
            {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"},
            ["--upstream-proxy", proxy.url, "--upstream-ca", self.env.pki.ca_cert],
        )
        image = self.env.image("library/alpine:3.20")
        self.pull(hammal.host, "alpine", image)
        connects = proxy.connects()
        self.assertIn(
            f"127.0.0.1:{registry_port}",
            connects,
            f"no CONNECT tunnel to the registry\n{proxy.log_text()[-3000:]}\n{self.diagnostics()}",
        )
        targets = set(proxy.targets())
        self.assertIn(f"127.0.0.1:{self.env.token_port}", targets)
        self.assertIn(f"127.0.0.1:{self.env.cdn_port}", targets)
        self._check_no_secret(hammal)
        self.assertNotIn("Starting factory", hammal.log_text(), "a log line per tunnel")

    def test_https_upstream_certificate_is_verified_through_the_tunnel(self) -> None:
        """Without --upstream-ca the private CA is not trusted: no pull."""
        registry_port = free_port()
        registry = self._tls_registry(registry_port)
        self.addCleanup(registry.stop)
        proxy = self._proxy([registry_port])
        hammal = _start_hammal(
            self,
            f"https://127.0.0.1:{registry_port}",
            {"HTTPS_PROXY": proxy.url},
            ["--retries", "0"],
        )
        response = hammal.request("GET", "/v2/library/alpine/manifests/3.20")
        self.assertIn(response.status, (502, 503), response.describe())
        self.assertIn(f"127.0.0.1:{registry_port}", proxy.connects())

    def _tls_registry(self, port: int) -> ManagedProcess:
        """A second Distribution over the seeded storage, serving TLS."""
        assert self.env.pki is not None
        config = json.loads(
            _registry_config(
                port,
                self.env.storage_root,
                auth={
                    "realm": self.env.realm,
                    "service": REGISTRY_SERVICE,
                    "issuer": TOKEN_ISSUER,
                    "rootcertbundle": self.env.pki.ca_cert,
                },
                redirect_baseurl=self.env.cdn_url + "/",
            )
        )
        config["http"]["tls"] = {"certificate": self.env.pki.tls_chain, "key": self.env.pki.tls_key}
        workdir = make_tempdir("hammal-it-tls-registry-")
        path = os.path.join(workdir, "registry.yml")
        with open(path, "w") as f:
            f.write(json.dumps(config))
        env: Dict[str, str] = dict(_hammal_env(), HOME=workdir)
        process = ManagedProcess(
            "tls-registry",
            [REGISTRY_BIN, "serve", path],
            os.path.join(workdir, "registry.log"),
            env=env,
            cwd=workdir,
        ).start()
        wait_until(lambda: port_open(port), "TLS registry", process=process)
        return process


class PrefetchThroughProxyTests(IntegrationTestCase):
    """``hammal prefetch`` reaches the mirror by the same proxy rules."""

    def setUp(self) -> None:
        super().setUp()
        if not os.access(TINYPROXY_BIN, os.X_OK):
            if os.environ.get("CI"):
                self.fail("tinyproxy is not installed (make system-deps)")
            raise unittest.SkipTest("tinyproxy is not installed (make system-deps)")
        self.proxy = TinyProxy([])
        self.addCleanup(self.proxy.stop)
        self.hammal = self.start_hammal()

    def _prefetch(
        self, environ: Mapping[str, str], *args: str
    ) -> "subprocess.CompletedProcess[str]":
        env = {
            k: v
            for k, v in _hammal_env().items()
            if k.lower() not in ("http_proxy", "https_proxy", "no_proxy", "all_proxy")
        }
        env.update(environ)
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "hammal",
                "prefetch",
                "library/alpine:3.20",
                "--mirror",
                self.hammal.url,
                *args,
            ],
            env=env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def test_http_proxy_variable(self) -> None:
        result = self._prefetch({"HTTP_PROXY": self.proxy.url})
        self.assertEqual(result.returncode, 0, result.stderr + result.stdout)
        self.assertIn(self.hammal.host, self.proxy.targets(), self.proxy.log_text()[-2000:])
        self.assertNotIn(PROXY_PASSWORD, result.stdout + result.stderr)

    def test_no_proxy_cidr_exempts_the_mirror(self) -> None:
        """A CIDR entry, which urllib alone does not understand."""
        result = self._prefetch({"http_proxy": self.proxy.url, "no_proxy": "127.0.0.0/8"})
        self.assertEqual(result.returncode, 0, result.stderr + result.stdout)
        self.assertEqual(self.proxy.targets(), [])

    def test_proxy_option_wins(self) -> None:
        result = self._prefetch({"HTTP_PROXY": "http://127.0.0.1:9"}, "--proxy", self.proxy.url)
        self.assertEqual(result.returncode, 0, result.stderr + result.stdout)
        self.assertIn(self.hammal.host, self.proxy.targets())
