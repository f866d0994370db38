"""Every kind of TLS client completes a handshake with ``--tls`` (issue 13).

Clients that offer ALPN (curl by default and with ``--http1.1``/``--http2``,
browsers, Go's HTTP/2-capable transports as in docker and containerd) were
refused with an ``internal_error`` alert because the connection-limit wrapper
hid the site's protocol list from Twisted's ALPN callback. Each test here
talks to a real ``twistd hammal --tls`` over TCP and checks the answer.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import textwrap
from typing import List

from tests.integration.environment import make_tempdir
from tests.integration.support import IntegrationTestCase
from tests.integration.test_access import launch_hammal, tls_args


class TLSClientTests(IntegrationTestCase):
    """One hammal with ``--tls``; clients with and without ALPN."""

    def setUp(self) -> None:
        super().setUp()
        assert self.env.pki is not None
        self.pki = self.env.pki
        self.hammal = launch_hammal(
            self, tls_args(self.pki.tls_chain, self.pki.tls_key), tls_ca=self.pki.ca_cert
        )
        self.url = f"https://localhost:{self.hammal.port}"

    def handshake(self, protocols: List[str]) -> tuple[str | None, bytes]:
        """Offer C{protocols} by ALPN; the one chosen and the first response line."""
        context = ssl.create_default_context(cafile=self.pki.ca_cert)
        if protocols:
            context.set_alpn_protocols(protocols)
        with socket.create_connection(("127.0.0.1", self.hammal.port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                chosen = tls.selected_alpn_protocol()
                tls.sendall(b"GET /v2/ HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                return chosen, tls.recv(65536).split(b"\r\n", 1)[0]

    def test_alpn_negotiates_http_1_1(self) -> None:
        """A client offering h2 and http/1.1 (curl, browsers, Go) gets http/1.1."""
        chosen, status = self.handshake(["h2", "http/1.1"])
        self.assertEqual(chosen, "http/1.1")
        self.assertEqual(status, b"HTTP/1.1 200 OK")

    def test_alpn_http_1_1_only(self) -> None:
        chosen, status = self.handshake(["http/1.1"])
        self.assertEqual(chosen, "http/1.1")
        self.assertEqual(status, b"HTTP/1.1 200 OK")

    def test_no_alpn(self) -> None:
        """Clients offering no ALPN (skopeo, curl --no-alpn) keep working."""
        chosen, status = self.handshake([])
        self.assertIsNone(chosen)
        self.assertEqual(status, b"HTTP/1.1 200 OK")

    def curl(self, *flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "curl",
                "-sS",
                "--max-time",
                "20",
                "--cacert",
                self.pki.ca_cert,
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{http_version}",
                *flags,
                self.url + "/v2/",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )

    def test_curl(self) -> None:
        """curl by default, with --http1.1, --http2 and --no-alpn: 200 over HTTP/1.1."""
        if shutil.which("curl") is None:
            self.fail_or_skip("curl")
        for flags in ((), ("--http1.1",), ("--http2",), ("--no-alpn",)):
            result = self.curl(*flags)
            self.assertEqual(
                (result.returncode, result.stdout),
                (0, "200 1.1"),
                f"curl {' '.join(flags)}: {result.stderr}",
            )

    def test_go_client(self) -> None:
        """Go's net/http with HTTP/2 enabled (what docker and containerd use)."""
        go = shutil.which("go") or (
            "/usr/lib/go/bin/go" if os.path.exists("/usr/lib/go/bin/go") else None
        )
        if go is None:
            self.fail_or_skip("go")
            return
        workdir = make_tempdir("hammal-it-go-")
        source = os.path.join(workdir, "client.go")
        with open(source, "w") as f:
            f.write(_GO_CLIENT)
        env = dict(
            os.environ,
            GOCACHE=os.path.join(workdir, "cache"),
            GOPATH=os.path.join(workdir, "gopath"),
            GO111MODULE="off",
            GOFLAGS="",
            GOTOOLCHAIN="local",
        )
        result = subprocess.run(
            [go, "run", source, self.pki.ca_cert, self.url + "/v2/"],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            cwd=workdir,
        )
        self.assertEqual(
            (result.returncode, result.stdout.strip()), (0, "200 HTTP/1.1"), result.stderr
        )

    def fail_or_skip(self, binary: str) -> None:
        from twisted.trial.unittest import SkipTest

        if os.environ.get("CI"):
            self.fail(f"{binary} is not installed (make test installs it)")
        raise SkipTest(f"{binary} is not installed")


#: A Go client as docker and containerd build theirs: HTTP/2 attempted, so
#: the ClientHello offers ``h2`` and ``http/1.1``.
_GO_CLIENT = textwrap.dedent(
    """\
    package main

    import (
    \t"crypto/tls"
    \t"crypto/x509"
    \t"fmt"
    \t"net/http"
    \t"os"
    )

    func main() {
    \tpem, err := os.ReadFile(os.Args[1])
    \tif err != nil {
    \t\tpanic(err)
    \t}
    \tpool := x509.NewCertPool()
    \tpool.AppendCertsFromPEM(pem)
    \ttransport := &http.Transport{
    \t\tTLSClientConfig:   &tls.Config{RootCAs: pool},
    \t\tForceAttemptHTTP2: true,
    \t}
    \tresponse, err := (&http.Client{Transport: transport}).Get(os.Args[2])
    \tif err != nil {
    \t\tfmt.Fprintln(os.Stderr, err)
    \t\tos.Exit(1)
    \t}
    \tdefer response.Body.Close()
    \tfmt.Println(response.StatusCode, response.Proto)
    }
    """
)
