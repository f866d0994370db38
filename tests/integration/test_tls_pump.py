"""A cold pull of a 64 MiB layer from an upstream that serves its blobs over
TLS itself (a second Distribution over the seeded storage with TLS and no
CDN redirect): hammal decrypts the body on a pump thread
(``hammal_pumped_bodies_total{kind="tls"}``), and skopeo checks every
digest; directly, and through ``tinyproxy``'s ``CONNECT`` tunnel."""

from __future__ import annotations

import json
import os
import re
import unittest

from tests.integration.environment import (
    REGISTRY_BIN,
    REGISTRY_SERVICE,
    TOKEN_ISSUER,
    HammalProcess,
    ManagedProcess,
    _hammal_env,
    _registry_config,
    free_port,
    http_request,
    make_tempdir,
    port_open,
    wait_until,
)
from tests.integration.support import IntegrationTestCase
from tests.integration.test_proxy import TINYPROXY_BIN, TinyProxy, _start_hammal

_PUMPED_TLS = re.compile(r'^hammal_pumped_bodies_total\{[^}]*kind="tls"[^}]*\} (\S+)$', re.M)


class TLSUpstreamPumpTests(IntegrationTestCase):
    """Blob bodies over TLS from the upstream itself, read by a pump thread."""

    def _tls_registry(self) -> int:
        """A Distribution serving the seeded storage over TLS, blobs included; its port."""
        assert self.env.pki is not None
        port = free_port()
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
                redirect_baseurl=None,
            )
        )
        config["http"]["tls"] = {"certificate": self.env.pki.tls_chain, "key": self.env.pki.tls_key}
        workdir = make_tempdir("hammal-it-tls-blobs-")
        path = os.path.join(workdir, "registry.yml")
        with open(path, "w") as f:
            f.write(json.dumps(config))
        process = ManagedProcess(
            "tls-blob-registry",
            [REGISTRY_BIN, "serve", path],
            os.path.join(workdir, "registry.log"),
            env=dict(_hammal_env(), HOME=workdir),
            cwd=workdir,
        ).start()
        self.addCleanup(process.stop)
        wait_until(lambda: port_open(port), "TLS registry", process=process)
        return port

    def _pumped_tls(self, hammal: HammalProcess) -> float:
        page = http_request("GET", hammal.url + "/metrics", timeout=10).body.decode()
        found = _PUMPED_TLS.search(page)
        return float(found.group(1)) if found else 0.0

    def _pull_big(self, hammal: HammalProcess) -> None:
        self.pull(hammal.host, "big", self.env.image("library/big:1"))
        self.assertGreaterEqual(
            self._pumped_tls(hammal),
            1,
            f"the 64 MiB layer was not pumped over TLS\n{self.diagnostics()}",
        )

    def test_big_layer_decrypted_on_a_pump_thread(self) -> None:
        """A cold pull straight from the TLS upstream: pumped, every digest right."""
        assert self.env.pki is not None
        port = self._tls_registry()
        hammal = _start_hammal(
            self, f"https://127.0.0.1:{port}", {}, ["--upstream-ca", self.env.pki.ca_cert]
        )
        self._pull_big(hammal)

    def test_big_layer_through_a_connect_tunnel(self) -> None:
        """The same through tinyproxy: TLS inside the tunnel is pumped too."""
        if not os.access(TINYPROXY_BIN, os.X_OK):
            if os.environ.get("CI"):
                self.fail("tinyproxy is not installed (make system-deps)")
            raise unittest.SkipTest("tinyproxy is not installed (make system-deps)")
        assert self.env.pki is not None
        port = self._tls_registry()
        proxy = TinyProxy([port])
        self.addCleanup(proxy.stop)
        hammal = _start_hammal(
            self,
            f"https://127.0.0.1:{port}",
            {},
            ["--upstream-proxy", proxy.url, "--upstream-ca", self.env.pki.ca_cert],
        )
        self._pull_big(hammal)
        self.assertIn(f"127.0.0.1:{port}", proxy.connects())
