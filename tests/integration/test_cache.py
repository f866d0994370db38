"""The pull-through cache over real TCP, with real files.

Most tests run hammal against ``faults.py`` (an anonymous upstream that
serves deterministic 8 MiB and 32 MiB blobs and misbehaves on request) and
read hammal with blocking ``http.client`` clients in threads, hashing every
byte received (``FaultServerTests`` check the fault server itself first).
``RegistryCacheTests`` run against the Docker-Hub-like environment (token
auth, CDN redirects) and pull with skopeo.

Upstream traffic is counted from the fault server's request log (or the
CDN's and Distribution's logs); cache state is read from ``--cache-dir``.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from twisted.trial import unittest

from tests.integration import faults
from tests.integration.environment import (
    HERE,
    HammalProcess,
    ManagedProcess,
    clean_env,
    http_request,
    make_tempdir,
    start_hammal,
    wait_until,
)
from tests.integration.images import ALL_MANIFEST_TYPES
from tests.integration.support import IntegrationTestCase

HIT = "hammal; hit"
MISS = "hammal; fwd=miss"
COALESCED = "hammal; fwd=miss; collapsed; detail=coalesced"
STALE = "hammal; fwd=stale; detail=stale-if-error"
STALE_WARNING = '110 - "Response is Stale"'
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"

MiB = 1 << 20
SMALL = (8 * MiB, 1)  # blob A: (size, seed)
LARGE = (32 * MiB, 2)  # blob B
READ_CHUNK = 64 * 1024
REPO = "faults/img"  # two parts: no library/ rewriting


@functools.lru_cache(maxsize=None)
def blob(spec: Tuple[int, int]) -> bytes:
    """The content the fault server serves for *spec* (size, seed)."""
    return faults.blob_bytes(*spec)


@functools.lru_cache(maxsize=None)
def digest_of(spec: Tuple[int, int]) -> str:
    return "sha256:" + hashlib.sha256(blob(spec)).hexdigest()


def blob_path(spec: Tuple[int, int]) -> str:
    return f"/v2/{REPO}/blobs/{digest_of(spec)}"


def digest_mismatches(hammal: HammalProcess) -> float:
    """hammal's ``hammal_digest_mismatches_total`` from its /metrics."""
    got = fetch(hammal.url + "/metrics", keep=True, timeout=10)
    for line in got.body.decode().splitlines():
        if line.startswith("hammal_digest_mismatches_total "):
            return float(line.split()[1])
    raise AssertionError(f"no hammal_digest_mismatches_total in /metrics: {got.describe()}")


# -- the fault server ------------------------------------------------------------


class FaultUpstream:
    """``faults.py`` as a child process, and its admin API."""

    def __init__(self) -> None:
        self.workdir = make_tempdir("hammal-it-faults-")
        port_file = os.path.join(self.workdir, "port")
        specs = [f"{SMALL[0]}:{SMALL[1]}", f"{LARGE[0]}:{LARGE[1]}"]
        argv = [
            sys.executable,
            os.path.join(HERE, "faults.py"),
            "--port",
            "0",
            "--port-file",
            port_file,
        ]
        for spec in specs:
            argv += ["--blob", spec]
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
            self.port = int(f.read())
        self.url = f"http://127.0.0.1:{self.port}"
        served = self._admin("GET", "blobs")
        self.manifest_digest = served["manifest_digest"]
        self.manifest = http_request(
            "GET", f"{self.url}/v2/{REPO}/manifests/latest", timeout=10
        ).body

    def _admin(self, method: str, what: str, **query: Any) -> Any:
        url = f"{self.url}/_admin/{what}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        response = http_request(method, url, timeout=10)
        if response.status != 200:
            raise AssertionError(f"fault server admin {what}: {response.describe()}")
        return response.json()

    def fault(self, kind: str, **params: Any) -> None:
        """Queue a fault (``after``, ``count``, ``rate``, ``path``)."""
        self._admin("POST", "fault", kind=kind, **params)

    def reset(self) -> None:
        self._admin("POST", "reset")

    def log(self, path_contains: str = "") -> List[Dict[str, Any]]:
        """Requests seen (optionally only those whose path holds a string)."""
        return [e for e in self._admin("GET", "log") if path_contains in e["path"]]

    def gets(self, spec: Tuple[int, int]) -> List[Dict[str, Any]]:
        """Every upstream ``GET`` of one blob."""
        return [e for e in self.log(digest_of(spec)) if e["method"] == "GET"]


_fault_upstream: Optional[FaultUpstream] = None
_fault_lock = threading.Lock()


def get_fault_upstream() -> FaultUpstream:
    """The module's one fault server, started on first use. (trial has no
    setUpClass; the process and its directory go at exit, with the rest of
    the environment's, see ``environment._cleanup_at_exit``.)"""
    global _fault_upstream
    with _fault_lock:
        if _fault_upstream is None or not _fault_upstream.process.running():
            _fault_upstream = FaultUpstream()
        return _fault_upstream


# -- a blocking client that hashes as it reads -------------------------------------


class _SmallBufferConnection(http.client.HTTPConnection):
    """An HTTP connection with a small receive buffer (a slow client's)."""

    rcvbuf = 16 * 1024

    def connect(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.settimeout(self.timeout)
        sock.connect((self.host, self.port))
        self.sock = sock


@dataclass
class Fetched:
    """What a client got: status, headers, and a digest of the body."""

    status: int = 0
    headers: List[Tuple[str, str]] = field(default_factory=list)
    size: int = 0
    digest: str = ""
    body: bytes = b""
    #: the exception that ended the read, if any (``repr``).
    error: Optional[str] = None
    timed_out: bool = False

    def header(self, name: str) -> Optional[str]:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    @property
    def content_length(self) -> Optional[int]:
        value = self.header("Content-Length")
        return int(value) if value is not None else None

    @property
    def aborted(self) -> bool:
        """The transfer broke: an error, or fewer bytes than announced."""
        length = self.content_length
        return self.error is not None or (length is not None and self.size < length)

    @property
    def cache_status(self) -> Optional[str]:
        return self.header("Cache-Status")

    def describe(self) -> str:
        heads = ", ".join(f"{k}: {v}" for k, v in self.headers)
        return f"{self.status} [{heads}] {self.size} bytes {self.digest[:19]}... error={self.error}"


def fetch(
    url: str,
    headers: Sequence[Tuple[str, str]] = (),
    method: str = "GET",
    timeout: float = 30.0,
    keep: bool = False,
    slow_socket: bool = False,
    progress: Optional[Callable[[Fetched], None]] = None,
) -> Fetched:
    """One request; the body is read as it comes (at most 64 KiB a piece)
    and hashed.

    :param keep: also keep the body (small ranges).
    :param slow_socket: use a 16 KiB ``SO_RCVBUF``.
    :param progress: called after every piece (may sleep: a slow reader).
    """
    parts = urllib.parse.urlsplit(url)
    cls = _SmallBufferConnection if slow_socket else http.client.HTTPConnection
    conn = cls(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout)
    result = Fetched()
    hasher = hashlib.sha256()
    kept: List[bytes] = []
    try:
        conn.putrequest(method, parts.path, skip_accept_encoding=True)
        for k, v in headers:
            conn.putheader(k, v)
        conn.endheaders()
        response = conn.getresponse()
        result.status, result.headers = response.status, list(response.getheaders())
        while method != "HEAD":
            try:
                piece = response.read1(READ_CHUNK)
            except (http.client.HTTPException, OSError) as e:
                result.error = repr(e)
                result.timed_out = isinstance(e, (socket.timeout, TimeoutError))
                break
            if not piece:
                break
            hasher.update(piece)
            result.size += len(piece)
            if keep:
                kept.append(piece)
            if progress is not None:
                progress(result)
    finally:
        conn.close()
    result.digest = "sha256:" + hasher.hexdigest()
    result.body = b"".join(kept)
    return result


def files_under(path: str) -> List[str]:
    """Every file below *path* (relative paths)."""
    found = []
    for root, _, names in os.walk(path):
        found += [os.path.relpath(os.path.join(root, n), path) for n in names]
    return sorted(found)


def stored_path(cache_dir: str, digest: str) -> str:
    hexd = digest.split(":", 1)[1]
    return os.path.join(cache_dir, "blobs", "sha256", hexd[:2], hexd)


def wait_stored(cache_dir: str, digest: str, timeout: float = 10.0) -> bool:
    """
    Whether the blob reaches the store within C{timeout}: hammal gives
    clients the verified tail first and commits after fdatasync, so the
    file can appear a moment after the response ended.
    """
    deadline = time.monotonic() + timeout
    path = stored_path(cache_dir, digest)
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# -- the fault server alone (if these fail, fix the harness first) -------------------


class FaultServerTests(unittest.TestCase):
    """``faults.py`` without hammal: its faults do what the tests assume."""

    def setUp(self) -> None:
        self.upstream = get_fault_upstream()
        self.upstream.reset()

    def url(self, spec: Tuple[int, int] = SMALL) -> str:
        return self.upstream.url + blob_path(spec)

    def test_blob_and_range(self) -> None:
        got = fetch(self.url())
        self.assertEqual((got.status, got.digest, got.size), (200, digest_of(SMALL), SMALL[0]))
        part = fetch(self.url(), headers=[("Range", "bytes=1000-")])
        self.assertEqual(part.status, 206)
        self.assertEqual(part.header("Content-Range"), f"bytes 1000-{SMALL[0] - 1}/{SMALL[0]}")
        self.assertEqual(part.digest, "sha256:" + hashlib.sha256(blob(SMALL)[1000:]).hexdigest())
        self.assertEqual([e["range"] for e in self.upstream.log()], [None, "bytes=1000-"])

    def test_faults(self) -> None:
        self.upstream.fault("reset", after=MiB)
        reset = fetch(self.url())
        self.assertTrue(reset.aborted and reset.size <= MiB, reset.describe())
        self.upstream.fault("corrupt", after=5)
        corrupt = fetch(self.url())
        self.assertEqual(corrupt.size, SMALL[0])
        self.assertNotEqual(corrupt.digest, digest_of(SMALL))
        self.upstream.fault("ignore-range")
        ignored = fetch(self.url(), headers=[("Range", "bytes=1000-")])
        self.assertEqual((ignored.status, ignored.digest), (200, digest_of(SMALL)))
        self.upstream.fault("status", count=2)
        self.assertEqual([fetch(self.url()).status for _ in range(3)], [503, 503, 200])
        self.upstream.fault("hang", after=1000)
        hung = fetch(self.url(), timeout=0.5)
        self.assertTrue(hung.timed_out and hung.size == 1000, hung.describe())
        self.assertEqual(
            [e["fault"] for e in self.upstream.log()],
            ["reset", "corrupt", "ignore-range", "status", "status", None, "hang"],
        )

    def test_slow_is_slow_whatever_the_reader(self) -> None:
        """1 MiB at 4 MiB/s may not take less than (1 MiB - 1/20 s worth) / rate,
        even for a client that reads as fast as it can (pauses and resumes)."""
        self.upstream.fault("slow", rate=4 * MiB)
        started = time.monotonic()
        got = fetch(self.url(), headers=[("Range", f"bytes=0-{MiB - 1}")])
        elapsed = time.monotonic() - started
        self.assertEqual(got.size, MiB)
        self.assertGreaterEqual(elapsed, (MiB - 4 * MiB // 20) / (4 * MiB))


# -- the tests against the fault server ----------------------------------------------


class FaultUpstreamCacheTests(unittest.TestCase):
    """hammal in front of ``faults.py``: coalescing, verification, resume,
    ranges, eviction and restarts, with one fault server for the class."""

    upstream: FaultUpstream

    def setUp(self) -> None:
        self.upstream = get_fault_upstream()
        self.upstream.reset()
        self.hammals: List[HammalProcess] = []

    # -- helpers -----------------------------------------------------------

    def start(self, **options: Any) -> HammalProcess:
        """hammal against the fault server (stopped, its cache removed, at the end)."""
        options.setdefault("upstream", self.upstream.url)
        hammal = start_hammal(**options)
        self.addCleanup(hammal.stop)
        self.hammals.append(hammal)
        return hammal

    def make_dir(self) -> str:
        path = make_tempdir("hammal-it-cache-")
        self.addCleanup(shutil.rmtree, path, True)
        return path

    def diagnostics(self) -> str:
        parts = []
        for h in self.hammals:
            parts.append(f"--- hammal {' '.join(h.argv[3:])} ---\n{h.log_tail(5000)}")
        try:
            log = json.dumps(self.upstream.log(), indent=None)[-4000:]
        except Exception as e:  # noqa: BLE001 - diagnostics only
            log = repr(e)
        parts.append(f"--- fault server requests ---\n{log}")
        parts.append(f"--- fault server log ---\n{self.upstream.process.log_tail(1500)}")
        return "\n".join(parts)

    def expect(self, condition: Any, message: str) -> None:
        """Like assertTrue, with hammal's and the upstream's logs on failure."""
        if not condition:
            self.fail(f"{message}\n{self.diagnostics()}")

    def expect_equal(self, got: Any, want: Any, what: str) -> None:
        if got != want:
            self.fail(f"{what}: got {got!r}, expected {want!r}\n{self.diagnostics()}")

    def expect_blob(self, got: Fetched, spec: Tuple[int, int], what: str) -> None:
        """A complete 200 with exactly the blob's bytes."""
        self.expect(
            got.status == 200
            and not got.aborted
            and got.size == spec[0]
            and got.digest == digest_of(spec),
            f"{what}: expected the whole blob {digest_of(spec)} ({spec[0]} bytes),"
            f" got {got.describe()}",
        )

    def expect_aborted(self, got: Fetched, spec: Tuple[int, int], what: str) -> None:
        """A 200 whose body broke off: never the complete blob."""
        self.expect(got.status == 200, f"{what}: expected 200 then an abort, got {got.describe()}")
        self.expect(
            got.aborted and got.size < spec[0],
            f"{what}: the transfer was not aborted: {got.describe()}",
        )
        self.expect(
            not got.timed_out,
            f"{what}: hammal never ended the transfer (the client timed out): {got.describe()}",
        )

    def expect_nothing_cached(self, cache_dir: str) -> None:
        """No blob stored and no temporary left (polled briefly: the fetch
        cleans up as it fails, the client may see the abort first)."""
        tmp = os.path.join(cache_dir, "tmp")

        def clean() -> bool:
            return not files_under(os.path.join(cache_dir, "blobs")) and not files_under(tmp)

        try:
            wait_until(clean, "an empty cache", timeout=5)
        except Exception:
            self.fail(
                f"the cache is not empty: blobs {files_under(os.path.join(cache_dir, 'blobs'))},"
                f" tmp {files_under(tmp)}\n{self.diagnostics()}"
            )

    def get(self, hammal: HammalProcess, spec: Tuple[int, int], **kw: Any) -> Fetched:
        return fetch(hammal.url + blob_path(spec), **kw)

    # -- coalescing -----------------------------------------------------------

    def test_concurrent_cold_clients_share_one_upstream_fetch(self) -> None:
        """20 concurrent cold GETs of a blob arriving at 4 MiB/s: one upstream
        GET, every client gets every byte, one miss and 19 collapsed; then a
        hit without upstream."""
        hammal = self.start()
        self.upstream.fault("slow", rate=4 * MiB)
        with ThreadPoolExecutor(max_workers=20) as pool:
            results = list(pool.map(lambda _: self.get(hammal, SMALL), range(20)))
        for i, got in enumerate(results):
            self.expect_blob(got, SMALL, f"client {i}")
        statuses = sorted(got.cache_status or "" for got in results)
        self.expect_equal(statuses.count(MISS), 1, f"fwd=miss answers among {statuses}")
        self.expect_equal(statuses.count(COALESCED), 19, f"collapsed answers among {statuses}")
        gets = self.upstream.gets(SMALL)
        self.expect_equal(len(gets), 1, f"upstream GETs of the blob ({gets})")
        self.expect_equal(gets[0]["fault"], "slow", "the one upstream GET was the slow one")

        self.expect(wait_stored(hammal.owned_cache_dir or "", digest_of(SMALL)), "not stored")
        later = self.get(hammal, SMALL)
        self.expect_blob(later, SMALL, "a later GET")
        self.expect_equal(later.cache_status, HIT, "Cache-Status of a later GET")
        self.expect_equal(
            len(self.upstream.log(digest_of(SMALL))),
            1,
            "upstream requests for the blob after the hit",
        )

    def test_slow_client_does_not_slow_fast_client(self) -> None:
        """A client reading at most 64 KiB every 100 ms through a 16 KiB
        receive buffer starts the fetch (8 MiB/s upstream); a fast client
        joining it finishes while the slow one is still reading."""
        hammal = self.start()
        self.upstream.fault("slow", rate=8 * MiB)
        started, hurry = threading.Event(), threading.Event()
        seen: List[Fetched] = []

        def dawdle(progress: Fetched) -> None:
            if not seen:
                seen.append(progress)
                started.set()
            if not hurry.is_set():
                time.sleep(0.1)

        with ThreadPoolExecutor(max_workers=1) as pool:
            slow_future = pool.submit(
                self.get, hammal, SMALL, slow_socket=True, progress=dawdle, timeout=60
            )
            self.expect(started.wait(20), "the slow client never received a byte")
            fast = self.get(hammal, SMALL)
            slow_done_first = slow_future.done()
            slow_bytes_then = seen[0].size
            hurry.set()
            slow = slow_future.result(timeout=60)
        self.expect_blob(fast, SMALL, "the fast client")
        self.expect_blob(slow, SMALL, "the slow client")
        self.expect_equal(slow.cache_status, MISS, "the slow client started the fetch")
        self.expect_equal(fast.cache_status, COALESCED, "the fast client joined it")
        self.expect(
            not slow_done_first and slow_bytes_then < SMALL[0],
            f"the slow client finished first (it had {slow_bytes_then} bytes when the"
            " fast one was done): the fast client was held to the slow one's pace",
        )
        self.expect_equal(len(self.upstream.gets(SMALL)), 1, "upstream GETs of the blob")

    # -- verification ----------------------------------------------------------

    def test_corrupt_upstream_never_cached(self) -> None:
        """One flipped byte in a transfer (8 MiB/s) that five clients share:
        each client's transfer is aborted, nothing is stored, no temporary
        is left; the next GET gets the right bytes."""
        hammal = self.start()
        cache = hammal.owned_cache_dir
        assert cache is not None
        self.upstream.fault("corrupt", after=3 * MiB + 17, rate=8 * MiB)
        with ThreadPoolExecutor(max_workers=5) as pool:
            results = list(pool.map(lambda _: self.get(hammal, SMALL), range(5)))
        for i, got in enumerate(results):
            self.expect_aborted(got, SMALL, f"client {i} of a corrupt upstream transfer")
        self.expect_equal(len(self.upstream.gets(SMALL)), 1, "upstream GETs of the blob")
        self.expect_nothing_cached(cache)
        self.expect(
            "digest mismatch" in hammal.log_text(), "hammal did not log the digest mismatch"
        )

        again = self.get(hammal, SMALL)
        self.expect_blob(again, SMALL, "the GET after the corrupt one")
        self.expect_equal(again.cache_status, MISS, "Cache-Status after a discarded fetch")
        self.expect(wait_stored(cache, digest_of(SMALL)), "the good blob was not stored")
        self.expect_equal(
            [e["fault"] for e in self.upstream.gets(SMALL)], ["corrupt", None], "upstream GETs"
        )

    def test_no_hold_tail_corrupt_upstream_never_cached(self) -> None:
        """``--no-hold-tail``: one flipped byte (8 MiB/s upstream) goes to the
        client with the others as they arrive (its own digest check rejects
        them; hammal still ends the transfer when it found the mismatch,
        which may cut what the client had not read yet); the digest still
        decides: nothing is stored, the mismatch is logged and counted, the
        next GET gets the right bytes."""
        hammal = self.start(extra_args=["--no-hold-tail"])
        cache = hammal.owned_cache_dir
        assert cache is not None
        before = digest_mismatches(hammal)
        self.upstream.fault("corrupt", after=3 * MiB + 17, rate=8 * MiB)
        got = self.get(hammal, SMALL)
        self.expect(
            got.status == 200 and got.size > 3 * MiB + 17 and got.digest != digest_of(SMALL),
            f"expected the bytes past the corrupt one, got {got.describe()}",
        )
        self.expect_nothing_cached(cache)
        self.expect(
            "digest mismatch" in hammal.log_text(), "hammal did not log the digest mismatch"
        )
        self.expect_equal(digest_mismatches(hammal) - before, 1, "digest mismatches counted")

        again = self.get(hammal, SMALL)
        self.expect_blob(again, SMALL, "the GET after the corrupt one")
        self.expect(wait_stored(cache, digest_of(SMALL)), "the good blob was not stored")
        self.expect_equal(
            [e["fault"] for e in self.upstream.gets(SMALL)], ["corrupt", None], "upstream GETs"
        )

    def test_fetch_completes_when_every_client_leaves(self) -> None:
        """The only client hangs up after 1 MiB of a 4 MiB/s transfer: the
        fetch still completes into the cache, and the next GET is a hit."""
        hammal = self.start()
        cache = hammal.owned_cache_dir
        assert cache is not None
        self.upstream.fault("slow", rate=4 * MiB)
        conn = http.client.HTTPConnection("127.0.0.1", hammal.port, timeout=20)
        try:
            conn.request("GET", blob_path(SMALL))
            response = conn.getresponse()
            self.expect_equal(response.status, 200, "status")
            self.expect_equal(len(response.read(MiB)), MiB, "bytes read before leaving")
        finally:
            conn.close()
        stored = stored_path(cache, digest_of(SMALL))
        try:
            wait_until(lambda: os.path.exists(stored), "the blob in the cache", timeout=20)
        except Exception:
            self.fail(f"the abandoned fetch never reached the cache\n{self.diagnostics()}")
        got = self.get(hammal, SMALL)
        self.expect_blob(got, SMALL, "the GET after the client left")
        self.expect_equal(got.cache_status, HIT, "Cache-Status")
        self.expect_equal(len(self.upstream.gets(SMALL)), 1, "upstream GETs of the blob")

    # -- resume ---------------------------------------------------------------

    def _resumed(self, after: int, second_fault: Optional[str]) -> Dict[str, Any]:
        hammal = self.start()
        self.upstream.fault("reset", after=after)
        if second_fault:
            self.upstream.fault(second_fault)
        got = self.get(hammal, SMALL)
        self.expect_blob(got, SMALL, "a transfer reset upstream")
        self.expect_equal(got.cache_status, MISS, "Cache-Status")
        assert hammal.owned_cache_dir is not None
        self.expect(
            wait_stored(hammal.owned_cache_dir, digest_of(SMALL)), "the resumed blob was not stored"
        )
        gets = self.upstream.gets(SMALL)
        self.expect_equal(len(gets), 2, f"upstream GETs ({gets})")
        first, resume = gets
        self.expect_equal((first["range"], first["fault"]), (None, "reset"), "first upstream GET")
        match = re.fullmatch(r"bytes=(\d+)-", resume["range"] or "")
        self.expect(match is not None, f"the second GET is not a resume: {resume}")
        assert match is not None
        offset = int(match.group(1))
        self.expect(
            0 < offset <= after, f"resumed at byte {offset}, but the reset came after {after} bytes"
        )
        self.expect(f"at byte {offset}" in hammal.log_text(), "hammal did not log the resume")
        return resume

    def test_resume_after_reset(self) -> None:
        """A reset 3 MiB into the blob: one uninterrupted stream to the
        client, and a ``Range: bytes=N-`` request upstream (N <= 3 MiB)."""
        resume = self._resumed(3 * MiB, None)
        self.expect_equal((resume["status"], resume["fault"]), (206, None), "the resume")

    def test_resume_when_range_ignored(self) -> None:
        """The resume is answered 200 with the whole blob: the prefix is
        skipped and the client still gets the exact bytes."""
        resume = self._resumed(3 * MiB, "ignore-range")
        self.expect_equal((resume["status"], resume["fault"]), (200, "ignore-range"), "the resume")

    def test_hang_mid_body_aborts_client(self) -> None:
        """Upstream goes silent 2 MiB into the blob; with --read-timeout 1
        and --retries 0 the client's transfer is aborted and nothing cached."""
        hammal = self.start(read_timeout=1, retries=0)
        assert hammal.owned_cache_dir is not None
        self.upstream.fault("hang", after=2 * MiB)
        got = self.get(hammal, SMALL, timeout=20)
        self.expect_aborted(got, SMALL, "a transfer whose upstream hung")
        self.expect_nothing_cached(hammal.owned_cache_dir)
        again = self.get(hammal, SMALL)
        self.expect_blob(again, SMALL, "the GET after the hang")
        self.expect_equal(len(self.upstream.gets(SMALL)), 2, "upstream GETs")

    # -- ranges and HEAD ---------------------------------------------------------

    def test_ranges_from_cache(self) -> None:
        """206 with Content-Range from the cache, a suffix range, 416 past
        the end; none of them goes upstream."""
        hammal = self.start()
        size, data = SMALL[0], blob(SMALL)
        self.expect_blob(self.get(hammal, SMALL), SMALL, "the first GET")
        self.expect(wait_stored(hammal.owned_cache_dir or "", digest_of(SMALL)), "not stored")
        cases = [
            ("bytes=100-199", 100, 200),
            ("bytes=-100", size - 100, size),
            (f"bytes={MiB}-", MiB, size),
            (f"bytes={size - 1}-{size + 500}", size - 1, size),
        ]
        for header, start, end in cases:
            got = self.get(hammal, SMALL, headers=[("Range", header)], keep=True)
            self.expect_equal(got.status, 206, f"status for {header}")
            self.expect_equal(
                got.header("Content-Range"),
                f"bytes {start}-{end - 1}/{size}",
                f"Content-Range for {header}",
            )
            self.expect_equal(got.content_length, end - start, f"Content-Length for {header}")
            self.expect(
                got.body == data[start:end] and not got.aborted,
                f"wrong bytes for {header}: {got.describe()}",
            )
            self.expect_equal(got.cache_status, HIT, f"Cache-Status for {header}")
        refused = self.get(hammal, SMALL, headers=[("Range", f"bytes={size}-")], keep=True)
        self.expect_equal(refused.status, 416, "status of an unsatisfiable range")
        self.expect_equal(
            refused.header("Content-Range"), f"bytes */{size}", "Content-Range of the 416"
        )
        self.expect_equal(
            len(self.upstream.log(digest_of(SMALL))), 1, "upstream requests for the blob"
        )

    def test_range_while_blob_arrives(self) -> None:
        """Ranges asked while the blob still arrives (4 MiB/s) are answered
        206 with the right bytes from the growing file; one upstream GET."""
        hammal = self.start()
        size, data = SMALL[0], blob(SMALL)
        self.upstream.fault("slow", rate=4 * MiB)
        started = threading.Event()
        with ThreadPoolExecutor(max_workers=3) as pool:
            whole = pool.submit(self.get, hammal, SMALL, progress=lambda _: started.set())
            self.expect(started.wait(20), "the first client never received a byte")
            tail_start = 7 * MiB
            tail = pool.submit(
                self.get, hammal, SMALL, headers=[("Range", f"bytes={tail_start}-")], keep=True
            )
            middle = pool.submit(
                self.get, hammal, SMALL, headers=[("Range", "bytes=1000-1999")], keep=True
            )
            whole_got, tail_got, middle_got = whole.result(), tail.result(), middle.result()
        self.expect_blob(whole_got, SMALL, "the whole-blob client")
        for got, start, end in ((tail_got, tail_start, size), (middle_got, 1000, 2000)):
            self.expect_equal(got.status, 206, f"status of range {start}-")
            self.expect_equal(
                got.header("Content-Range"),
                f"bytes {start}-{end - 1}/{size}",
                f"Content-Range of range {start}-",
            )
            self.expect(
                got.body == data[start:end] and not got.aborted,
                f"wrong bytes for range {start}-: {got.describe()}",
            )
            self.expect_equal(
                got.cache_status, COALESCED, f"Cache-Status of range {start}- (asked mid-transfer)"
            )
        gets = self.upstream.gets(SMALL)
        self.expect_equal(
            [(e["range"], e["fault"]) for e in gets], [(None, "slow")], "upstream GETs"
        )

    def test_head_on_cached_blob_stays_local(self) -> None:
        hammal = self.start()
        self.expect_blob(self.get(hammal, SMALL), SMALL, "the first GET")
        self.expect(wait_stored(hammal.owned_cache_dir or "", digest_of(SMALL)), "not stored")
        head = self.get(hammal, SMALL, method="HEAD")
        self.expect_equal(head.status, 200, "HEAD status")
        self.expect_equal(head.content_length, SMALL[0], "HEAD Content-Length")
        self.expect_equal(
            head.header("Docker-Content-Digest"), digest_of(SMALL), "HEAD Docker-Content-Digest"
        )
        self.expect_equal(head.cache_status, HIT, "HEAD Cache-Status")
        self.expect_equal(
            [e["method"] for e in self.upstream.log(digest_of(SMALL))],
            ["GET"],
            "upstream requests for the blob",
        )

    # -- manifests --------------------------------------------------------------------

    def test_stale_if_error_on_503(self) -> None:
        """--manifest-ttl 1: once the TTL passed and upstream answers 503,
        the known tag is served with ``Warning: 110``."""
        hammal = self.start(retries=0, extra_args=["--manifest-ttl", "1"])
        path = f"/v2/{REPO}/manifests/latest"
        accept = [("Accept", OCI_MANIFEST)]
        first = fetch(hammal.url + path, headers=accept, keep=True)
        self.expect_equal((first.status, first.cache_status), (200, MISS), "first GET")
        self.expect_equal(first.body, self.upstream.manifest, "manifest body")
        self.upstream.fault("status", count=-1, path="/manifests/")
        stale = self._poll_until_not_hit(
            lambda: fetch(hammal.url + path, headers=accept, keep=True)
        )
        self.expect_equal(stale.status, 200, f"status of the stale answer {stale.describe()}")
        self.expect_equal(stale.header("Warning"), STALE_WARNING, "Warning header")
        self.expect_equal(stale.cache_status, STALE, "Cache-Status")
        self.expect_equal(stale.body, self.upstream.manifest, "stale body")
        self.expect_equal(
            stale.header("Docker-Content-Digest"),
            self.upstream.manifest_digest,
            "stale Docker-Content-Digest",
        )
        failed = [e for e in self.upstream.log("/manifests/") if e["status"] == 503]
        self.expect(failed, "upstream was never asked after the TTL")

    def _poll_until_not_hit(self, get: Callable[[], Fetched], timeout: float = 10) -> Fetched:
        """GET until the answer is no longer a fresh hit (the TTL passed)."""
        deadline = time.monotonic() + timeout
        while True:
            got = get()
            if got.cache_status != HIT or time.monotonic() > deadline:
                return got
            time.sleep(0.1)

    # -- eviction and restarts ----------------------------------------------------------

    def test_eviction_under_small_cache_max_size(self) -> None:
        """--cache-max-size 36M: after the 8 MiB A then the 32 MiB B, A is
        gone and B is there; A again goes upstream."""
        hammal = self.start(extra_args=["--cache-max-size", "36M"])
        cache = hammal.owned_cache_dir
        assert cache is not None
        self.expect_blob(self.get(hammal, SMALL), SMALL, "A")
        self.expect(wait_stored(cache, digest_of(SMALL)), "A was not stored")
        self.expect_blob(self.get(hammal, LARGE), LARGE, "B")
        self.expect(wait_stored(cache, digest_of(LARGE)), "B was not stored")
        self.expect(
            not os.path.exists(stored_path(cache, digest_of(SMALL))),
            f"A was not evicted: {files_under(os.path.join(cache, 'blobs'))}",
        )
        again = self.get(hammal, SMALL)
        self.expect_blob(again, SMALL, "A again")
        self.expect_equal(again.cache_status, MISS, "Cache-Status of A after its eviction")
        self.expect_equal(len(self.upstream.gets(SMALL)), 2, "upstream GETs of A")
        self.expect("evicted" in hammal.log_text(), "hammal did not log the eviction")

    def test_restart_keeps_cache(self) -> None:
        """A new hammal on the same --cache-dir serves the blob as a hit with
        no upstream request (but its ``/v2/`` ping at start), and removes at
        once a temporary whose writer is gone (a kill -9), while keeping one
        whose writer still runs (another process sharing the directory)."""
        cache = self.make_dir()
        first = self.start(cache_dir=cache)
        self.expect_blob(self.get(first, SMALL), SMALL, "the first GET")
        self.expect(wait_stored(cache, digest_of(SMALL)), "the first GET was not stored")
        first.stop()
        tmp = os.path.join(cache, "tmp")
        gone = subprocess.Popen(["true"])
        gone.wait()
        abandoned = os.path.join(tmp, digest_of(LARGE)[7:] + f".{gone.pid}.deadbeef")
        fresh = os.path.join(tmp, digest_of(LARGE)[7:] + f".{os.getpid()}.cafecafe")
        for path in (abandoned, fresh):
            with open(path, "wb") as f:
                f.write(blob(LARGE)[:4096])
        self.upstream.reset()

        second = self.start(cache_dir=cache)
        got = self.get(second, SMALL)
        self.expect_blob(got, SMALL, "the GET after the restart")
        self.expect_equal(got.cache_status, HIT, "Cache-Status after the restart")
        pulls = [e for e in self.upstream.log() if e["path"] != "/v2/"]  # not the start-up ping
        self.expect_equal(pulls, [], "upstream requests after the restart")
        self.expect(not os.path.exists(abandoned), "the abandoned temporary is still there")
        self.expect(
            os.path.exists(fresh), "a fresh temporary (maybe another process's) was removed"
        )


# -- the tests against the Docker-Hub-like environment -----------------------------


def _registry_blob_requests(text: str) -> List[str]:
    """Blob requests in Distribution's access log."""
    return re.findall(r'"(?:GET|HEAD) /v2/[^" ]*/blobs/[^" ]*', text)


class RegistryCacheTests(IntegrationTestCase):
    """hammal in front of token-auth Distribution with CDN redirects."""

    def test_second_skopeo_pull_makes_no_upstream_blob_request(self) -> None:
        image = self.env.image("library/alpine:3.20")
        hammal = self.start_hammal()
        assert self.env.registry is not None
        registry_log_start = len(self.env.registry.log_text())
        self.pull(hammal.host, "alpine", image)
        cdn_gets = [e for e in self.env.cdn_log() if e["method"] == "GET"]
        self.assertTrue(
            cdn_gets, f"the first pull fetched nothing from the CDN\n{self.diagnostics()}"
        )
        registry_log_before = len(self.env.registry.log_text())
        first_blob_requests = _registry_blob_requests(
            self.env.registry.log_text()[registry_log_start:registry_log_before]
        )
        self.assertTrue(
            first_blob_requests,
            f"the first pull asked the registry for no blob?\n{self.diagnostics()}",
        )
        self.env.reset_logs()

        self.pull(hammal.host, "alpine", image)
        cdn = self.env.cdn_log()
        self.assertEqual(cdn, [], f"the second pull reached the CDN\n{self.diagnostics()}")
        blob_requests = _registry_blob_requests(self.env.registry.log_text()[registry_log_before:])
        self.assertEqual(
            blob_requests, [], f"the second pull asked the registry for blobs\n{self.diagnostics()}"
        )

    def test_stale_if_error_when_rate_limited_after_restart(self) -> None:
        """Pull a tag through hammal (--manifest-ttl 1), restart hammal on the
        same cache (no token in memory), rate-limit the token server: past the
        TTL the tag is served stale with ``Warning: 110`` and skopeo still
        pulls the image, every digest right, from the cache alone."""
        image = self.env.image("library/alpine:3.20")
        cache = self.make_dir()
        options: Dict[str, Any] = dict(
            cache_dir=cache, retries=0, extra_args=["--manifest-ttl", "1"]
        )
        accept = [("Accept", t) for t in ALL_MANIFEST_TYPES]
        path = "/v2/alpine/manifests/3.20"
        first = self.start_hammal(**options)
        self.pull(first.host, "alpine", image)
        fresh = fetch(first.url + path, headers=accept, keep=True)
        self.assertEqual(
            (fresh.status, fresh.body),
            (200, image.manifest_bytes),
            f"{fresh.describe()}\n{self.diagnostics()}",
        )
        first.stop()
        self.env.reset_logs()  # (also switches the rate limit off: first)

        self.env.set_ratelimit(True)
        self.addCleanup(self.env.set_ratelimit, False)
        second = self.start_hammal(**options)
        deadline = time.monotonic() + 10
        while True:
            stale = fetch(second.url + path, headers=accept, keep=True)
            if stale.cache_status != HIT or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        context = f"{stale.describe()}\n{self.diagnostics()}"
        self.assertEqual(stale.status, 200, context)
        self.assertEqual(stale.header("Warning"), STALE_WARNING, context)
        self.assertEqual(stale.cache_status, STALE, context)
        self.assertEqual(stale.body, image.manifest_bytes, context)
        self.assertEqual(stale.header("Docker-Content-Digest"), image.manifest_digest, context)
        statuses = [e["status"] for e in self.env.token_log()]
        self.assertIn(429, statuses, f"the token server was not asked\n{self.diagnostics()}")

        self.pull(second.host, "alpine", image)
        self.assertEqual(
            [e for e in self.env.cdn_log() if e["method"] == "GET"],
            [],
            f"the pull while rate-limited reached the CDN\n{self.diagnostics()}",
        )
