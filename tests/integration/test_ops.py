"""Operability through real processes (issue 5): Prometheus counters around
real skopeo pulls, ``--metrics-port``, ``/readyz`` following redis, draining
on SIGTERM with a transfer in flight, no secrets in the logs (text and JSON,
``--debug``), and ``python -m hammal prefetch``.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Dict, List

from tests.integration.environment import (
    PRIVATE_PASSWORD,
    PRIVATE_USER,
    REDIS_BIN,
    REPO_ROOT,
    ManagedProcess,
    clean_env,
    free_port,
    make_tempdir,
    port_open,
    wait_until,
)
from tests.integration.support import IntegrationTestCase
from tests.integration.test_access import (
    CLIENT_PASSWORD,
    CLIENT_USER,
    JWT_RE,
    Metrics,
    fetch,
    hammal_output,
    launch_hammal,
    scrape,
    skopeo_copy,
    tls_args,
)

ANONYMOUS = ["--src-tls-verify=false", "--src-no-creds"]


def _delta(after: Metrics, before: Metrics, name: str, **labels: str) -> float:
    return after.get(name, **labels) - before.get(name, **labels)


class MetricsTests(IntegrationTestCase):
    def test_counters_follow_a_cold_then_warm_pull(self) -> None:
        hammal = launch_hammal(self)
        image = self.env.image("library/alpine:3.20")
        blobs, size = len(image.blob_digests), sum(image.blob_sizes.values())
        url = hammal.url + "/metrics"

        m0 = scrape(url)
        skopeo_copy(self, f"{hammal.host}/alpine:3.20", image, ANONYMOUS)
        m1 = scrape(url)
        # Blobs enter the store just after their clients got them (after
        # fdatasync): wait for all of them before the warm pull.
        deadline = time.monotonic() + 10
        while m1.get("hammal_blob_cache_blobs") < blobs and time.monotonic() < deadline:
            time.sleep(0.05)
            m1 = scrape(url)
        cdn_cold = [e for e in self.env.cdn_log() if e["method"] == "GET"]
        self.env.reset_logs()
        skopeo_copy(self, f"{hammal.host}/alpine:3.20", image, ANONYMOUS)
        m2 = scrape(url)
        cdn_warm = [e for e in self.env.cdn_log() if e["method"] == "GET"]

        def check(
            phase: str, after: Metrics, before: Metrics, name: str, want: float, **labels: str
        ) -> None:
            got = _delta(after, before, name, **labels)
            self.assertEqual(
                got,
                want,
                f"{phase} pull: {name}{labels} moved by {got}, "
                f"expected {want}\n{after.text}\n{self.diagnostics()}",
            )

        check("cold", m1, m0, "hammal_requests_total", blobs, route="blob", status="200")
        check("warm", m2, m1, "hammal_requests_total", blobs, route="blob", status="200")
        check("cold", m1, m0, "hammal_response_bytes_total", size, route="blob")
        check("warm", m2, m1, "hammal_response_bytes_total", size, route="blob")
        check("cold", m1, m0, "hammal_cache_responses_total", blobs, kind="blob", outcome="miss")
        check("cold", m1, m0, "hammal_cache_responses_total", 0, kind="blob", outcome="hit")
        check("warm", m2, m1, "hammal_cache_responses_total", blobs, kind="blob", outcome="hit")
        check("warm", m2, m1, "hammal_cache_responses_total", 0, kind="blob", outcome="miss")
        check("cold", m1, m0, "hammal_blob_fetches_total", blobs)
        check("warm", m2, m1, "hammal_blob_fetches_total", 0)
        check("cold", m1, m0, "hammal_upstream_bytes_total", size)
        check("warm", m2, m1, "hammal_upstream_bytes_total", 0)
        self.assertGreater(_delta(m1, m0, "hammal_upstream_requests_total"), 0)
        # The warm pull (manifest within --manifest-ttl, blobs cached) asks upstream nothing.
        check("warm", m2, m1, "hammal_upstream_requests_total", 0)
        self.assertEqual(len(cdn_cold), blobs, cdn_cold)
        self.assertEqual(cdn_warm, [])
        self.assertEqual(m2.get("hammal_blob_cache_blobs"), blobs)
        self.assertEqual(m2.get("hammal_blob_cache_size_bytes"), size)

    def test_metrics_port(self) -> None:
        metrics_port = free_port()
        hammal = launch_hammal(self, ["--metrics-port", f"tcp:{metrics_port}:interface=127.0.0.1"])
        self.assertEqual(hammal.request("GET", "/v2/").status, 200)
        main = hammal.request("GET", "/metrics")
        self.assertEqual(main.status, 404, f"/metrics still on the main port: {main.describe()}")
        wait_until(lambda: port_open(metrics_port), "the metrics port", 10)
        metrics = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        self.assertGreaterEqual(
            metrics.get("hammal_requests_total", route="base", status="200"), 1, metrics.text
        )
        self.assertEqual(fetch(f"http://127.0.0.1:{metrics_port}/v2/").status, 404)


class ReadinessTests(IntegrationTestCase):
    def setUp(self) -> None:
        super().setUp()
        if not self.env.redis.ping():
            self.env.redis.restart()
        self.addCleanup(self._revive)

    def _revive(self) -> None:
        if not self.env.redis.ping():
            self.env.redis.restart()

    def test_readyz_follows_redis(self) -> None:
        hammal = launch_hammal(self, redis=self.env.redis.url)
        readyz = hammal.url + "/readyz"
        wait_until(
            lambda: fetch(readyz, timeout=5).status == 200, "/readyz 200", 15, hammal.process
        )
        report = fetch(readyz).json()
        self.assertEqual(report["checks"].get("redis"), "ok", report)

        self.env.redis.kill()
        wait_until(
            lambda: fetch(readyz, timeout=5).status == 503,
            "/readyz 503 without redis",
            15,
            hammal.process,
        )
        down = fetch(readyz)
        report = down.json()
        self.assertFalse(report["ready"], report)
        self.assertNotEqual(report["checks"]["redis"], "ok", report)
        self.assertEqual(report["checks"]["draining"], "ok", report)
        self.assertEqual(down.header("Content-Type"), "application/json")
        # hammal keeps serving pulls meanwhile.
        skopeo_copy(
            self, f"{hammal.host}/library/ociimg:1", self.env.image("library/ociimg:1"), ANONYMOUS
        )

        self.env.redis.restart()
        wait_until(
            lambda: fetch(readyz, timeout=5).status == 200,
            "/readyz 200 again after redis restarted",
            30,
            hammal.process,
        )
        self.assertEqual(fetch(readyz).json()["checks"]["redis"], "ok")


class DrainTests(IntegrationTestCase):
    def test_sigterm_drains_an_in_flight_transfer(self) -> None:
        drain_timeout = 20.0
        hammal = launch_hammal(self, ["--drain-timeout", str(drain_timeout)])
        image = self.env.image("library/big:1")
        digest = max(image.blob_digests, key=image.blob_sizes.__getitem__)
        size = image.blob_sizes[digest]
        self.assertGreater(size, 64 * 1024 * 1024)

        # A keep-alive connection opened before SIGTERM, to ask /readyz after it.
        keep = http.client.HTTPConnection("127.0.0.1", hammal.port, timeout=10)
        self.addCleanup(keep.close)
        keep.request("GET", "/readyz")
        answer = keep.getresponse()
        answer.read()
        self.assertEqual(answer.status, 200, self.diagnostics())

        # A slow client: small receive buffer, reads 1 MiB, then stops reading.
        slow = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(slow.close)
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        slow.settimeout(30)
        slow.connect(("127.0.0.1", hammal.port))
        slow.sendall(
            f"GET /v2/library/big/blobs/{digest} HTTP/1.1\r\n"
            f"Host: {hammal.host}\r\nUser-Agent: slow-client\r\n\r\n".encode()
        )
        buffered = b""
        while b"\r\n\r\n" not in buffered:
            chunk = slow.recv(65536)
            self.assertTrue(chunk, "hammal closed the blob connection early")
            buffered += chunk
        head, _, body_start = buffered.partition(b"\r\n\r\n")
        self.assertIn(b" 200 ", head.split(b"\r\n")[0], head)
        length = int(
            next(
                line.split(b":", 1)[1]
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
        )
        self.assertEqual(length, size)
        hasher = hashlib.sha256(body_start)
        received = len(body_start)
        while received < 1024 * 1024:
            chunk = slow.recv(65536)
            self.assertTrue(chunk)
            hasher.update(chunk)
            received += len(chunk)

        pid = hammal.process.pid
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        signalled = time.monotonic()

        # New connections are refused (the port closed) ...
        wait_until(
            lambda: not port_open(hammal.port), "hammal to stop listening", 5, hammal.process
        )
        # ... /readyz on the already-open connection says draining ...
        keep.request("GET", "/readyz")
        answer = keep.getresponse()
        report = json.loads(answer.read())
        self.assertEqual(answer.status, 503, report)
        self.assertFalse(report["ready"], report)
        self.assertNotEqual(report["checks"]["draining"], "ok", report)
        self.assertTrue(hammal.running(), "hammal exited with a transfer in flight")

        # ... and the transfer still completes with the exact bytes.
        while received < size:
            chunk = slow.recv(1 << 20)
            if not chunk:
                break
            hasher.update(chunk)
            received += len(chunk)
        self.assertEqual(received, size, f"transfer cut short\n{self.diagnostics()}")
        self.assertEqual("sha256:" + hasher.hexdigest(), digest)

        popen = hammal.process.popen
        assert popen is not None
        code = popen.wait(drain_timeout + 5)
        elapsed = time.monotonic() - signalled
        # twistd re-raises the terminating signal at exit (status -15, 143 in a
        # shell): a clean stop for systemd and Docker, though not exit code 0.
        self.assertIn(code, (0, -signal.SIGTERM), f"hammal exited {code}\n{hammal.log_tail()}")
        self.assertIn("Server Shut Down.", hammal.log_text())
        self.assertLess(elapsed, drain_timeout, "hammal waited for the drain timeout")
        self.assertRegex(hammal_output(hammal), r"draining [1-9]\d* in-flight requests")
        self.assertNotIn("drain timeout", hammal_output(hammal))


class SecretScrubbingTests(IntegrationTestCase):
    """``--debug`` logs upstream exchanges, never a secret."""

    REDIS_PASSWORD = "Rd-pass-5f1c9e-hammal"

    def _redis_with_password(self) -> str:
        port = free_port()
        workdir = make_tempdir("hammal-it-redis-")
        process = ManagedProcess(
            "redis-server-auth",
            [
                REDIS_BIN,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                workdir,
                "--requirepass",
                self.REDIS_PASSWORD,
            ],
            os.path.join(workdir, "redis.log"),
            cwd=workdir,
        ).start()
        self.addCleanup(process.stop)
        wait_until(lambda: port_open(port), "redis with a password", 10, process)
        return f"redis://:{self.REDIS_PASSWORD}@127.0.0.1:{port}/0"

    def _secrets(self) -> Dict[str, str]:
        def b64(user: str, password: str) -> str:
            return base64.b64encode(f"{user}:{password}".encode()).decode()

        return {
            "upstream password": PRIVATE_PASSWORD,
            "client password": CLIENT_PASSWORD,
            "redis password": self.REDIS_PASSWORD,
            "upstream Basic credentials": b64(PRIVATE_USER, PRIVATE_PASSWORD),
            "client Basic credentials": b64(CLIENT_USER, CLIENT_PASSWORD),
        }

    def _scrub_run(self, log_format: str, redis_url: str) -> int:
        hammal = launch_hammal(
            self,
            [
                "--debug",
                "--log-format",
                log_format,
                "--auth",
                "basic",
                "--auth-user",
                CLIENT_USER,
                "--auth-password",
                CLIENT_PASSWORD,
            ],
            redis=redis_url,
            upstream_username=PRIVATE_USER,
            upstream_password=PRIVATE_PASSWORD,
        )
        creds = ["--src-tls-verify=false", "--src-creds", f"{CLIENT_USER}:{CLIENT_PASSWORD}"]
        skopeo_copy(
            self, f"{hammal.host}/private/secret:1", self.env.image("private/secret:1"), creds
        )
        skopeo_copy(
            self, f"{hammal.host}/alpine:3.20", self.env.image("library/alpine:3.20"), creds
        )
        wrong = fetch(
            hammal.url + "/v2/",
            [
                (
                    "Authorization",
                    "Basic "
                    + base64.b64encode(f"{CLIENT_USER}:{CLIENT_PASSWORD}x".encode()).decode(),
                )
            ],
        )
        self.assertEqual(wrong.status, 401)
        ready = hammal.request("GET", "/readyz")
        self.assertEqual(ready.status, 200, f"redis with a password: {ready.describe()}")
        tokens = self.env.token_log()
        self.assertTrue(all(e["user"] == PRIVATE_USER for e in tokens), tokens)
        hammal.stop()

        out = hammal_output(hammal)
        if log_format == "json":
            records, not_json = [], []
            for chunk in out.split("\x1e"):
                if chunk.strip():
                    try:
                        records.append(json.loads(chunk))
                    except ValueError:
                        not_json.append(chunk)
            self.assertEqual(not_json, [], "--log-format json wrote lines that are not JSON")
            debug = [
                r
                for r in records
                if r.get("log_level", {}).get("name") == "debug"
                and r.get("log_format", "").startswith("upstream {method}")
            ]
            self.assertTrue(debug, "no --debug upstream exchange was logged")
        else:
            self.assertIn("upstream GET", out, "no --debug upstream exchange was logged")
        for what, secret in self._secrets().items():
            self.assertNotIn(secret, out, f"{log_format} log holds the {what}")
        self.assertEqual(JWT_RE.findall(out), [], f"{log_format} log holds a bearer token")
        self.assertNotRegex(out.lower(), r"bearer [a-z0-9._-]{20,}")
        return len(tokens)

    def test_text_and_json_logs(self) -> None:
        redis_url = self._redis_with_password()
        self.assertGreater(self._scrub_run("text", redis_url), 0, "no token was asked for")
        self.env.reset_logs()
        # The second process may find the first one's tokens in Redis (it knows
        # the challenge from its start-up ping): whatever it asks for is checked.
        self._scrub_run("json", redis_url)


class PrefetchTests(IntegrationTestCase):
    def _prefetch(
        self, mirror: str, *args: str, **env_extra: str
    ) -> "subprocess.CompletedProcess[str]":
        env = clean_env(PYTHONPATH=REPO_ROOT, **env_extra)
        return subprocess.run(
            [sys.executable, "-m", "hammal", "prefetch", *args, "--mirror", mirror],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )

    def _cdn_blobs(self) -> List[str]:
        return sorted(
            {
                "sha256:" + e["path"].rsplit("/", 2)[-2]
                for e in self.env.cdn_log()
                if e["method"] == "GET"
            }
        )

    def test_prefetch_fills_the_cache(self) -> None:
        hammal = launch_hammal(self)
        image = self.env.image("library/multi:1")
        result = self._prefetch(hammal.url, "library/multi:1")
        self.assertEqual(
            result.returncode, 0, f"{result.stdout}\n{result.stderr}\n{self.diagnostics()}"
        )
        self.assertEqual(self._cdn_blobs(), sorted(image.blob_digests))

        self.env.reset_logs()
        skopeo_copy(self, f"{hammal.host}/library/multi:1", image, ANONYMOUS, all_platforms=True)
        self.assertEqual(self._cdn_blobs(), [], "the pull after prefetch fetched blobs upstream")
        self.assertEqual([e for e in self.env.cdn_log() if e["method"] == "GET"], [])

    def test_prefetch_over_tls(self) -> None:
        """
        Prefetch through hammal's own --tls listener (ALPN offered by
        Python's client), verifying its certificate against the CA named by
        SSL_CERT_FILE; without that CA it refuses the mirror.
        """
        assert self.env.pki is not None
        pki = self.env.pki
        hammal = launch_hammal(self, tls_args(pki.tls_chain, pki.tls_key), tls_ca=pki.ca_cert)
        mirror = f"https://localhost:{hammal.port}"
        image = self.env.image("library/multi:1")
        untrusted = self._prefetch(mirror, "library/multi:1", SSL_CERT_FILE=os.devnull)
        self.assertNotEqual(untrusted.returncode, 0, untrusted.stdout)
        self.assertIn("certificate", (untrusted.stdout + untrusted.stderr).lower())
        self.assertEqual(self._cdn_blobs(), [])
        result = self._prefetch(mirror, "library/multi:1", SSL_CERT_FILE=pki.ca_cert)
        self.assertEqual(
            result.returncode, 0, f"{result.stdout}\n{result.stderr}\n{self.diagnostics()}"
        )
        self.assertEqual(self._cdn_blobs(), sorted(image.blob_digests))

    def test_prefetch_one_platform(self) -> None:
        hammal = launch_hammal(self)
        image = self.env.image("library/multi:1")
        arm64 = next(c for c in image.children if c.platform["architecture"] == "arm64")
        amd64 = next(c for c in image.children if c.platform["architecture"] == "amd64")
        result = self._prefetch(hammal.url, "library/multi:1", "--platform", "linux/arm64")
        self.assertEqual(result.returncode, 0, f"{result.stdout}\n{result.stderr}")
        self.assertEqual(
            self._cdn_blobs(), sorted(arm64.blob_digests), f"amd64 blobs: {amd64.blob_digests}"
        )
        self.assertFalse(set(amd64.blob_digests) & set(self._cdn_blobs()))
