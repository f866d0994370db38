"""hammal run the twistd way: daemonized with ``--logfile``, ``--tls``
without certificate files, ``--port N`` on both address families."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from tests.integration.environment import (
    _hammal_env,
    free_port,
    http_request,
    make_tempdir,
    twistd_path,
    wait_until,
)
from tests.integration.support import IntegrationTestCase
from tests.integration.environment import REPO_ROOT


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
            twistd_path(), "--pidfile", pidfile, "--logfile", logfile, "hammal",
            "--port", f"tcp:{port}:interface=127.0.0.1", "--upstream", self.env.registry_url,
            "--cache-dir", os.path.join(workdir, "cache"), "--log-format", "json",
        ]
        started = subprocess.run(argv, env=_hammal_env(), cwd=REPO_ROOT, capture_output=True, text=True,
                                 timeout=60, stdin=subprocess.DEVNULL)
        self.addCleanup(self._stop, pidfile)
        self.assertEqual(started.returncode, 0, started.stderr + started.stdout)
        wait_until(lambda: http_request("GET", f"http://127.0.0.1:{port}/v2/", timeout=2).status == 200,
                   "the daemon's /v2/")
        response = http_request("GET", f"http://127.0.0.1:{port}/v2/library/alpine/manifests/3.20",
                                [("Accept", "application/vnd.docker.distribution.manifest.v2+json")])
        self.assertEqual(response.status, 200, response.describe())

        def logged() -> bool:
            with open(logfile) as f:
                return "/v2/library/alpine/manifests/3.20" in f.read()

        wait_until(logged, "the access line in --logfile")
        with open(logfile) as f:
            text = f.read()
        # hammal's JSON observer, not twistd's default text one.
        access = [line for line in text.split("\x1e") if "/v2/library/alpine/manifests/3.20" in line]
        self.assertTrue(access[0].lstrip().startswith("{"), text[-2000:])
        self.assertIn('"route": "manifest"', access[0])
