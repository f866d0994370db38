"""``--workers``: several processes on one port and one cache directory, over real TCP.

hammal runs with ``--workers 2`` in front of ``faults.py`` (a fault server
of its own here, with several blobs), read by blocking ``http.client``
clients in threads that hash every byte. Upstream fetches are counted in
the fault server's request log; which worker served what, from the
``worker`` label of ``/metrics``; the cache from ``--cache-dir``.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import signal
import socket
import ssl
import sys
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Tuple

from twisted.trial import unittest

from tests.integration.environment import (
    HERE,
    REPO_ROOT,
    HammalProcess,
    ManagedProcess,
    _hammal_env,
    clean_env,
    free_port,
    http_request,
    make_tempdir,
    start_hammal,
    twistd_path,
    wait_until,
)
from tests.integration.faults import blob_bytes
from tests.integration.support import IntegrationTestCase
from tests.integration.test_cache import Fetched, fetch, files_under

MiB = 1 << 20
REPO = "faults/img"
#: (size, seed) of the blobs this module's fault server serves.
BLOBS = [(8 * MiB, 11 + i) for i in range(8)] + [(3 * MiB, 31 + i) for i in range(8)]
CRAWL = BLOBS[:8]  # 8 MiB each: slow fills to join, or to kill a worker in
SMALL = BLOBS[8:]  # 3 MiB each: to fill a 10 MB cache


def digest_of(spec: Tuple[int, int]) -> str:
    return "sha256:" + hashlib.sha256(blob_bytes(*spec)).hexdigest()


class _Upstream:
    """``faults.py`` with :data:`BLOBS`, and its admin API."""

    def __init__(self) -> None:
        self.workdir = make_tempdir("hammal-it-workers-faults-")
        port_file = os.path.join(self.workdir, "port")
        argv = [
            sys.executable,
            os.path.join(HERE, "faults.py"),
            "--port",
            "0",
            "--port-file",
            port_file,
        ]
        for size, seed in BLOBS:
            argv += ["--blob", f"{size}:{seed}"]
        self.process = ManagedProcess(
            "faults",
            argv,
            os.path.join(self.workdir, "faults.log"),
            env=clean_env(PYTHONUNBUFFERED="1"),
        ).start()
        wait_until(
            lambda: os.path.exists(port_file), "the fault server's port file", process=self.process
        )
        with open(port_file) as f:
            self.url = f"http://127.0.0.1:{int(f.read())}"
        self.digests = {spec: digest_of(spec) for spec in BLOBS}

    def admin(self, method: str, what: str, **query: Any) -> Any:
        url = f"{self.url}/_admin/{what}" + ("?" + urllib.parse.urlencode(query) if query else "")
        response = http_request(method, url, timeout=10)
        assert response.status == 200, response.describe()
        return response.json()

    def gets(self, spec: Tuple[int, int]) -> List[Dict[str, Any]]:
        return [
            e
            for e in self.admin("GET", "log")
            if self.digests[spec] in e["path"] and e["method"] == "GET"
        ]


_upstream: Optional[_Upstream] = None


def upstream() -> _Upstream:
    global _upstream
    if _upstream is None or not _upstream.process.running():
        _upstream = _Upstream()
    return _upstream


def worker_counts(hammal: HammalProcess, route: str = "blob") -> Dict[str, float]:
    """Requests of C{route} answered 200, by worker, from /metrics."""
    text = http_request("GET", hammal.url + "/metrics", timeout=10).body.decode()
    counts: Dict[str, float] = {}
    pattern = re.compile(r"^hammal_requests_total\{(.*)\} (\S+)$")
    for line in text.splitlines():
        match = pattern.match(line)
        if not match:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        if labels.get("route") == route and labels.get("status") == "200":
            counts[labels["worker"]] = counts.get(labels["worker"], 0) + float(match.group(2))
    return counts


def start_fill(hammal: HammalProcess, digest: str) -> None:
    """GET a blob, read its headers and leave: the fill goes on without the client."""
    with socket.create_connection(("127.0.0.1", hammal.port), timeout=10) as sock:
        sock.sendall(f"GET /v2/{REPO}/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        sock.recv(4096)


def directory_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, name)) for name in files_under(path))


class WorkersTests(unittest.TestCase):
    def setUp(self) -> None:
        self.upstream = upstream()
        self.upstream.admin("POST", "reset")
        self.hammals: List[HammalProcess] = []

    def start(self, workers: int = 2, *args: str, **options: Any) -> HammalProcess:
        options.setdefault("upstream", self.upstream.url)
        hammal = start_hammal(extra_args=["--workers", str(workers), *args], **options)
        self.addCleanup(hammal.stop)
        self.hammals.append(hammal)
        return hammal

    def diagnostics(self) -> str:
        parts = [f"--- hammal ---\n{h.log_tail(6000)}" for h in self.hammals]
        try:
            parts.append(
                "--- upstream requests ---\n"
                + json.dumps(self.upstream.admin("GET", "log"))[-3000:]
            )
        except Exception as e:  # noqa: BLE001 - diagnostics only
            parts.append(repr(e))
        return "\n".join(parts)

    def expect(self, condition: Any, message: str) -> None:
        if not condition:
            self.fail(f"{message}\n{self.diagnostics()}")

    def expect_blob(self, got: Fetched, spec: Tuple[int, int], what: str) -> None:
        self.expect(
            got.status == 200
            and not got.aborted
            and got.size == spec[0]
            and got.digest == self.upstream.digests[spec],
            f"{what}: expected all of {self.upstream.digests[spec]} ({spec[0]} bytes),"
            f" got {got.describe()}",
        )

    def get(self, hammal: HammalProcess, spec: Tuple[int, int], **kw: Any) -> Fetched:
        return fetch(f"{hammal.url}/v2/{REPO}/blobs/{self.upstream.digests[spec]}", **kw)

    def test_cold_crowd_on_both_workers_one_upstream_fetch(self) -> None:
        """10 concurrent cold GETs of a blob arriving at 4 MiB/s land on both
        workers: one upstream GET, every client gets exact bytes. Which
        worker accepts a connection is the kernel's choice: a crowd that all
        landed on one worker shows nothing about sharing a fill, so the
        crowd of another blob is tried (three at most)."""
        hammal = self.start(2)
        before: Dict[str, float] = {}
        landed: List[Dict[str, float]] = []
        for spec in CRAWL[:3]:
            self.upstream.admin("POST", "fault", kind="slow", rate=4 * MiB)
            with ThreadPoolExecutor(max_workers=10) as pool:
                results = list(pool.map(lambda _: self.get(hammal, spec), range(10)))
            for i, got in enumerate(results):
                self.expect_blob(got, spec, f"client {i}")
            gets = self.upstream.gets(spec)
            self.expect(len(gets) == 1, f"{len(gets)} upstream GETs of a blob, expected 1: {gets}")

            # A scrape shows its own process live and the others as of
            # their last snapshot (at most 2 s old): wait for all 10.
            seen: List[Dict[str, float]] = []

            def all_counted() -> bool:
                seen.append(worker_counts(hammal))
                return sum(seen[-1].values()) - sum(before.values()) == 10

            try:
                wait_until(all_counted, "the crowd's blob requests counted", timeout=10)
            except Exception:
                self.fail(f"blob requests by worker, last seen: {seen[-1:]}\n{self.diagnostics()}")
            now = seen[-1]
            crowd = {worker: now[worker] - before.get(worker, 0) for worker in now}
            landed.append(crowd)
            if crowd.get("0", 0) > 0 and crowd.get("1", 0) > 0:
                return
            before = now
        self.fail(f"three crowds each landed on one worker: {landed}\n{self.diagnostics()}")

    def test_kill_9_a_worker_mid_fill(self) -> None:
        """The worker filling a blob is killed with -9 while 6 clients read it:
        it is started again, clients of the other worker end with exact bytes,
        the killed worker's clients are cut (never ended short) and their
        retry gets exact bytes."""
        hammal = self.start(2)
        main_pid = hammal.process.pid
        self.upstream.admin("POST", "fault", kind="slow", rate=2 * MiB, count=-1)
        locks = os.path.join(hammal.owned_cache_dir or "", "locks")
        chosen: Optional[Tuple[Tuple[int, int], int]] = None
        for spec in CRAWL[1:]:
            # One client starts the fill; keep the blob if a worker (not the
            # main process) holds it, else try the next blob.
            start_fill(hammal, self.upstream.digests[spec])
            lock = os.path.join(locks, "sha256-" + self.upstream.digests[spec].split(":")[1])
            holder: Dict[str, Any] = {}

            def announced() -> bool:
                with open(lock) as f:
                    holder.update(json.loads(f.read()))
                return True

            wait_until(announced, "the fill's lock file", timeout=10)
            if holder["pid"] != main_pid:
                chosen = spec, holder["pid"]
                break
        self.expect(chosen is not None, "the main process held every fill")
        assert chosen is not None
        spec, victim = chosen
        with ThreadPoolExecutor(max_workers=6) as pool:
            futures = [pool.submit(self.get, hammal, spec, timeout=60) for _ in range(6)]
            time.sleep(1.0)
            before = len(self.upstream.gets(spec))
            os.kill(victim, signal.SIGKILL)
            results = [f.result() for f in futures]
        cut = [got for got in results if got.aborted]
        whole = [got for got in results if not got.aborted]
        for got in whole:
            self.expect_blob(got, spec, "a client that was not cut")
        for got in cut:
            self.expect(
                got.size < spec[0] and not got.timed_out, f"a cut client got {got.describe()}"
            )
        for i in range(len(cut) + 1):
            self.expect_blob(self.get(hammal, spec), spec, f"retry {i}")
        # One process took the fill over (from the start) for every reader
        # left, and the retries: one upstream GET, not one per reader.
        after = self.upstream.gets(spec)[before:]
        self.expect(
            len(after) == 1 and after[0]["range"] is None, f"upstream GETs after the kill: {after}"
        )

        def restarted() -> bool:
            return "worker 1 (pid" in hammal.log_text() and "starting it again" in hammal.log_text()

        wait_until(restarted, "the killed worker started again", timeout=10)

    def _fill_many(self, hammals: List[HammalProcess], cache_dir: str) -> List[int]:
        """Every small blob, two at a time, through the hammals in turn; the
        directory's size after each pair."""
        sizes = []
        pairs = [SMALL[i : i + 2] for i in range(0, len(SMALL), 2)]
        for n, pair in enumerate(pairs):
            with ThreadPoolExecutor(max_workers=2) as pool:
                results = list(
                    pool.map(
                        lambda item: self.get(hammals[(n + item[0]) % len(hammals)], item[1]),
                        enumerate(pair),
                    )
                )
            for spec, got in zip(pair, results):
                self.expect_blob(got, spec, "a small blob")
            time.sleep(0.3)  # the last commit follows the last byte
            sizes.append(
                directory_size(os.path.join(cache_dir, "blobs"))
                + directory_size(os.path.join(cache_dir, "tmp"))
            )
        return sizes

    def test_two_workers_keep_the_directory_under_the_cap(self) -> None:
        """--workers 2 --cache-max-size 10M: 8 blobs of 3 MiB through both
        workers; the directory never holds more than 10 MiB."""
        cache_dir = os.path.join(make_tempdir("hammal-it-workers-cap-"), "cache")
        hammal = self.start(2, "--cache-max-size", "10M", cache_dir=cache_dir)
        sizes = self._fill_many([hammal], cache_dir)
        self.expect(max(sizes) <= 10 * MiB, f"directory sizes after each pair: {sizes}")
        self.expect(sizes[-1] >= 6 * MiB, f"the cache kept too little: {sizes}")
        seen: List[Dict[str, float]] = []

        def on_both() -> bool:
            seen.append(worker_counts(hammal))
            return sum(seen[-1].values()) == len(SMALL) and set(seen[-1]) == {"0", "1"}

        try:
            wait_until(on_both, "small blobs served by both workers", timeout=10)
        except Exception:
            self.fail(f"requests by worker: {seen[-1:]}\n{self.diagnostics()}")

    def test_two_instances_sharing_a_directory_keep_the_cap(self) -> None:
        """Two hammal processes (not workers of one) on one directory, each
        sent every other blob: still 10 MiB for the directory as a whole."""
        cache_dir = os.path.join(make_tempdir("hammal-it-workers-shared-"), "cache")
        first = self.start(1, "--cache-max-size", "10M", cache_dir=cache_dir)
        second = self.start(1, "--cache-max-size", "10M", cache_dir=cache_dir)
        sizes = self._fill_many([first, second], cache_dir)
        self.expect(max(sizes) <= 10 * MiB, f"directory sizes after each pair: {sizes}")
        # Each index forgot what the other evicted: a blob it stored and the
        # other removed is fetched again, not served from a missing file.
        for spec in SMALL[:2]:
            self.expect_blob(self.get(first, spec), spec, "an evicted blob again")

    def _launch(self, *args: str) -> Tuple[ManagedProcess, int, str]:
        """hammal with ``--workers 2`` and C{args}, not waiting for plain HTTP."""
        workdir = make_tempdir("hammal-it-workers-")
        port = free_port()
        argv = [
            twistd_path(),
            "--pidfile=",
            "-n",
            "hammal",
            "--workers",
            "2",
            "--port",
            f"tcp:{port}:interface=127.0.0.1",
            "--upstream",
            self.upstream.url,
            "--cache-dir",
            os.path.join(workdir, "var", "cache"),
            "--read-timeout",
            "5",
            *args,
        ]
        process = ManagedProcess(
            "hammal", argv, os.path.join(workdir, "hammal.log"), env=_hammal_env(), cwd=REPO_ROOT
        ).start()
        self.addCleanup(process.stop)
        wait_until(
            lambda: process.log_text().count("starting on") >= 2,
            "both processes listening",
            process=process,
        )
        return process, port, workdir

    def test_tls_in_every_worker(self) -> None:
        """--tls --workers 2: both processes serve HTTPS with the kept
        certificate; a cold crowd over TLS makes one upstream fetch."""
        process, port, workdir = self._launch("--tls")
        context = ssl.create_default_context(
            cafile=os.path.join(workdir, "var", "tls", "hammal.crt")
        )
        spec = CRAWL[7]
        self.upstream.admin("POST", "fault", kind="slow", rate=8 * MiB)

        def get(path: str) -> Tuple[int, bytes]:
            conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=context)
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                return response.status, response.read()
            finally:
                conn.close()

        blob_path = f"/v2/{REPO}/blobs/{self.upstream.digests[spec]}"
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(lambda _: get(blob_path), range(8)))
        for status, body in results:
            self.expect(
                status == 200
                and hashlib.sha256(body).hexdigest() == self.upstream.digests[spec][7:],
                f"a TLS client got {status} and {len(body)} bytes\n{process.log_tail()}",
            )
        self.expect(
            len(self.upstream.gets(spec)) == 1, f"upstream GETs: {self.upstream.gets(spec)}"
        )
        seen: List[str] = []

        def both_served_tls() -> bool:
            text = get("/metrics")[1].decode()
            seen.append(text)
            workers = set(
                re.findall(
                    r'hammal_requests_total\{route="blob",status="200",worker="(\d)"\}', text
                )
            )
            return workers == {"0", "1"}

        try:
            wait_until(both_served_tls, "TLS blob requests on both workers", timeout=10)
        except Exception:
            self.fail(
                f"blob requests by worker over TLS: "
                f"{re.findall(r'hammal_requests_total.*blob.*', seen[-1] if seen else '')}"
                f"\n{process.log_tail()}"
            )

    def test_sigterm_drains_every_worker(self) -> None:
        """SIGTERM to the main process while transfers run in both: every
        client ends with exact bytes, then every process exits."""
        process, port, _ = self._launch()
        workers = _children(process.pid or 0)
        self.expect(len(workers) == 1, f"worker processes: {workers}")
        spec = CRAWL[6]
        self.upstream.admin("POST", "fault", kind="slow", rate=4 * MiB)
        url = f"http://127.0.0.1:{port}/v2/{REPO}/blobs/{self.upstream.digests[spec]}"
        with ThreadPoolExecutor(max_workers=8) as pool:
            futures = [pool.submit(fetch, url, timeout=30) for _ in range(8)]
            time.sleep(0.8)
            os.kill(process.pid or 0, signal.SIGTERM)
            results = [f.result() for f in futures]
        for got in results:
            self.expect_blob(got, spec, "a client during the drain")
        wait_until(lambda: not process.running(), "the main process to exit", timeout=20)
        # twistd ends with the signal it stopped on (Twisted re-raises SIGTERM).
        self.expect(
            process.popen is not None and process.popen.returncode in (0, -signal.SIGTERM),
            f"exit code {process.popen and process.popen.returncode}\n{process.log_tail()}",
        )
        for pid in workers:
            self.expect(
                not os.path.exists(f"/proc/{pid}") or _zombie(pid), f"worker {pid} still runs"
            )
        log = process.log_text()
        self.expect(
            log.count("Server Shut Down.") == 2, f"both processes shut down:\n{log[-4000:]}"
        )

    def test_logfile_one_per_process(self) -> None:
        """--logfile FILE: the main process logs there, worker 1 to FILE.worker1."""
        workdir = make_tempdir("hammal-it-workers-log-")
        port = free_port()
        logfile = os.path.join(workdir, "hammal.log")
        argv = [
            twistd_path(),
            "--pidfile=",
            "-n",
            f"--logfile={logfile}",
            "hammal",
            "--workers",
            "2",
            "--port",
            f"tcp:{port}:interface=127.0.0.1",
            "--upstream",
            self.upstream.url,
            "--cache-dir",
            os.path.join(workdir, "cache"),
        ]
        process = ManagedProcess(
            "hammal", argv, os.path.join(workdir, "stdout.log"), env=_hammal_env(), cwd=REPO_ROOT
        ).start()
        self.addCleanup(process.stop)

        def read(path: str) -> str:
            try:
                with open(path) as f:
                    return f.read()
            except FileNotFoundError:
                return ""

        def both_served() -> bool:
            http_request("GET", f"http://127.0.0.1:{port}/v2/", timeout=2)
            return all('"GET /v2/" 200' in read(path) for path in (logfile, logfile + ".worker1"))

        wait_until(both_served, "access lines in both log files", timeout=20, process=process)

    def test_workers_stop_when_the_main_process_dies(self) -> None:
        """kill -9 of the main process: its workers notice (their standard
        input closes) and stop instead of serving on alone."""
        process, port, _ = self._launch()
        workers = _children(process.pid or 0)
        self.expect(len(workers) == 1, f"worker processes: {workers}")
        with open(f"/proc/{workers[0]}/environ", "rb") as environ:
            variables = dict(
                item.split(b"=", 1) for item in environ.read().split(b"\0") if b"=" in item
            )
        snapshots = variables[b"HAMMAL_WORKER_METRICS_DIR"].decode()
        self.expect(os.path.isdir(snapshots), f"no metrics snapshots in {snapshots}")
        process.kill()

        def gone() -> bool:
            return all(not os.path.exists(f"/proc/{pid}") or _zombie(pid) for pid in workers)

        wait_until(gone, "the orphaned worker to stop", timeout=15)
        self.expect("the main hammal process is gone" in process.log_text(), process.log_tail())
        self.expect(not os.path.exists(snapshots), f"{snapshots} left behind")


def _children(pid: int) -> List[int]:
    """The processes whose parent is C{pid}."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as stat:
                fields = stat.read().rpartition(b")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(name))
    return found


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[0] in (b"Z", b"X")
    except OSError:
        return True


class WorkersSkopeoTests(IntegrationTestCase):
    """skopeo pulls through ``--workers 2`` from token-auth Distribution with CDN redirects."""

    def test_pulls_through_both_workers_then_all_from_the_cache(self) -> None:
        image = self.env.image("library/alpine:3.20")
        hammal = self.start_hammal(extra_args=["--workers", "2"])
        for _ in range(3):  # each pull on new connections, spread over the workers
            self.pull(hammal.host, "alpine", image)
        self.env.reset_logs()
        assert self.env.registry is not None
        registry_log = len(self.env.registry.log_text())
        self.pull(hammal.host, "alpine", image)
        self.assertEqual(
            [e for e in self.env.cdn_log() if e["method"] == "GET"],
            [],
            f"a warm pull reached the CDN\n{self.diagnostics()}",
        )
        blob_requests = re.findall(
            r'"(?:GET|HEAD) /v2/[^" ]*/blobs/[^" ]*', self.env.registry.log_text()[registry_log:]
        )
        self.assertEqual(
            blob_requests, [], f"a warm pull asked upstream for blobs\n{self.diagnostics()}"
        )
