"""hammal run the twistd way: daemonized with ``--logfile``, ``--tls``
without certificate files, ``--port N`` on both address families."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import unittest

from tests.integration.environment import (
    REPO_ROOT,
    ManagedProcess,
    _hammal_env,
    free_port,
    http_request,
    make_tempdir,
    skopeo,
    twistd_path,
    wait_until,
)
from tests.integration.support import IntegrationTestCase, check_pulled_dir


class DaemonLogfileTests(IntegrationTestCase):
    """A daemonized ``twistd hammal`` (no ``-n``) logs to ``--logfile``."""

    def _stop(self, pidfile: str) -> None:
        try:
            with open(pidfile) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)

    def test_daemon_writes_hammals_lines_to_the_logfile(self) -> None:
        workdir = make_tempdir("hammal-it-daemon-")
        pidfile, logfile = os.path.join(workdir, "hammal.pid"), os.path.join(workdir, "hammal.log")
        port = free_port()
        argv = [
            twistd_path(),
            "--pidfile",
            pidfile,
            "--logfile",
            logfile,
            "hammal",
            "--port",
            f"tcp:{port}:interface=127.0.0.1",
            "--upstream",
            self.env.registry_url,
            "--cache-dir",
            os.path.join(workdir, "cache"),
            "--log-format",
            "json",
        ]
        started = subprocess.run(
            argv,
            env=_hammal_env(),
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        self.addCleanup(self._stop, pidfile)
        self.assertEqual(started.returncode, 0, started.stderr + started.stdout)
        wait_until(
            lambda: http_request("GET", f"http://127.0.0.1:{port}/v2/", timeout=2).status == 200,
            "the daemon's /v2/",
        )
        response = http_request(
            "GET",
            f"http://127.0.0.1:{port}/v2/library/alpine/manifests/3.20",
            [("Accept", "application/vnd.docker.distribution.manifest.v2+json")],
        )
        self.assertEqual(response.status, 200, response.describe())

        def logged() -> bool:
            with open(logfile) as f:
                return "/v2/library/alpine/manifests/3.20" in f.read()

        wait_until(logged, "the access line in --logfile")
        with open(logfile) as f:
            text = f.read()
        # hammal's JSON observer, not twistd's default text one.
        access = [
            line for line in text.split("\x1e") if "/v2/library/alpine/manifests/3.20" in line
        ]
        self.assertTrue(access[0].lstrip().startswith("{"), text[-2000:])
        self.assertIn('"route": "manifest"', access[0])


class SelfSignedTlsTests(IntegrationTestCase):
    """``--tls`` without files: a kept self-signed certificate a client can trust."""

    def _start(self, workdir: str, port: int, log: str = "hammal.log") -> ManagedProcess:
        argv = [
            twistd_path(),
            "--pidfile=",
            "-n",
            "hammal",
            "--tls",
            "--library-prefix",
            "--port",
            f"tcp:{port}:interface=127.0.0.1",
            "--upstream",
            self.env.registry_url,
            "--cache-dir",
            os.path.join(workdir, "var", "cache"),
        ]
        process = ManagedProcess(
            "hammal", argv, os.path.join(workdir, log), env=_hammal_env(), cwd=REPO_ROOT
        ).start()
        self.addCleanup(process.stop)
        wait_until(lambda: "starting on" in process.log_text(), "hammal to listen", process=process)
        return process

    def _logged(self, process: ManagedProcess) -> str:
        lines = [line for line in process.log_text().splitlines() if "self-signed" in line]
        self.assertEqual(len(lines), 1, process.log_text())
        return lines[0]

    def test_made_trusted_by_a_client_and_kept(self) -> None:
        workdir = make_tempdir("hammal-it-tls-")
        port = free_port()
        process = self._start(workdir, port)
        cert = os.path.join(workdir, "var", "tls", "hammal.crt")
        line = self._logged(process)
        self.assertIn(cert, line)
        openssl = subprocess.run(
            ["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", cert],
            capture_output=True,
            text=True,
            check=True,
        )
        fingerprint = openssl.stdout.strip().split("=", 1)[1]
        self.assertIn(fingerprint, line)
        self.assertIn("/etc/docker/certs.d/", line)
        self.assertIn(f":{port}/ca.crt", line)

        # What the logged command does, for skopeo: the certificate as ca.crt.
        certs_dir = self.make_dir()
        shutil.copy(cert, os.path.join(certs_dir, "ca.crt"))
        dest = self.make_dir()
        result = skopeo(
            [
                "copy",
                "--src-cert-dir",
                certs_dir,
                "--src-no-creds",
                f"docker://127.0.0.1:{port}/alpine:3.20",
                f"dir:{dest}",
            ]
        )
        self.assertEqual(result.returncode, 0, result.stderr[-3000:] + process.log_tail())
        self.assertEqual(check_pulled_dir(dest, self.env.image("library/alpine:3.20"), False), [])
        # Untrusted, the same pull fails verification.
        untrusted = skopeo(
            [
                "copy",
                "--src-no-creds",
                f"docker://127.0.0.1:{port}/alpine:3.20",
                f"dir:{self.make_dir()}",
            ]
        )
        self.assertNotEqual(untrusted.returncode, 0)

        process.stop()
        again = self._start(workdir, free_port(), "restarted.log")
        kept = self._logged(again)
        self.assertIn("(kept)", kept)
        self.assertIn(fingerprint, kept)


class DualStackTests(IntegrationTestCase):
    """``--port N`` answers on IPv4 and IPv6 where the machine has both."""

    def test_bare_port_answers_both_families(self) -> None:
        try:
            probe = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            probe.bind(("::1", 0))
            probe.close()
        except OSError:
            raise unittest.SkipTest("this machine has no IPv6 loopback")
        workdir = make_tempdir("hammal-it-dual-")
        port = free_port()
        argv = [
            twistd_path(),
            "--pidfile=",
            "-n",
            "hammal",
            "--port",
            str(port),
            "--upstream",
            self.env.registry_url,
            "--cache-dir",
            os.path.join(workdir, "cache"),
        ]
        process = ManagedProcess(
            "hammal", argv, os.path.join(workdir, "hammal.log"), env=_hammal_env(), cwd=REPO_ROOT
        ).start()
        self.addCleanup(process.stop)
        wait_until(
            lambda: http_request("GET", f"http://127.0.0.1:{port}/v2/", timeout=2).status == 200,
            "hammal on IPv4",
            process=process,
        )
        response = http_request("GET", f"http://[::1]:{port}/v2/", timeout=5)
        self.assertEqual(response.status, 200, response.describe())
