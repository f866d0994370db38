"""A full or small disk is not an outage: hammal with its cache on a 64 MiB
tmpfs, pulling more than fits, with the disk 100 % full, with the disk
filling in the middle of a fill followed by ranged readers, with a blob over
``--cache-max-size``, and killed (``kill -9``) in the middle of a fill.

Every pull is exact and nothing answers 5xx. Mounting a tmpfs needs root
(or CAP_SYS_ADMIN); where the machine refuses, these tests skip and the
in-memory fault-injecting tests (``tests.test_cache_disk_faults``) stand in.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence

from twisted.trial.unittest import SkipTest

from tests.integration.environment import REPO_ROOT, http_request, make_tempdir, skopeo_pull
from tests.resilience.support import (
    FixtureCase,
    RawResponse,
    Sandbox,
    cache_problems,
    sha256,
    start_sandboxed_hammal,
)
from tests.resilience.upstream import OCI_MANIFEST, Blob, FaultyRegistry, Image

MiB = 1024 * 1024
DISK = 64 * MiB


def mount_small_disk(test: FixtureCase) -> str:
    """A fresh 64 MiB tmpfs, unmounted when C{test} ends."""
    path = make_tempdir("hammal-disk-")
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={DISK // MiB}m", "tmpfs", path],
            capture_output=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SkipTest(f"cannot mount a tmpfs here ({e}); see tests.test_cache_disk_faults")
    if done.returncode != 0:
        raise SkipTest(
            "cannot mount a tmpfs here "
            f"({done.stderr.decode(errors='replace').strip()}); "
            "see tests.test_cache_disk_faults"
        )
    test.addCleanup(subprocess.run, ["umount", "-l", path], capture_output=True, timeout=20)
    return path


def fill(path: str) -> str:
    """Fill the filesystem of C{path} to 100 % with one file; its name."""
    filler = os.path.join(path, "filler")
    chunk = b"\0" * MiB
    with open(filler, "wb", buffering=0) as out:
        try:
            while True:
                out.write(chunk)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
        # the last pages, below a whole chunk
        try:
            while True:
                out.write(b"\0" * 4096)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
    return filler


def get(
    port: int, name: str, blob: Blob, headers: Sequence[str] = (), timeout: float = 60.0
) -> RawResponse:
    """
    C{GET} a blob, reading as fast as the socket allows (the shared
    L{raw_exchange} copies its buffer on every read: too slow for 60 MiB).
    """
    lines = [
        f"GET /v2/{name}/blobs/{blob.digest} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Connection: close",
        *headers,
    ]
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    chunks: List[bytes] = []
    error = ""
    try:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    except OSError as e:
        error = f"recv: {e}"
    finally:
        sock.close()
    data = b"".join(chunks)
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = status_line.split(" ")
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
    parsed = [(k.strip(), v.strip()) for k, _, v in (h.partition(":") for h in header_lines)]
    length = next((int(v) for k, v in parsed if k.lower() == "content-length"), None)
    complete = length is not None and len(body) == length and not error
    return RawResponse(status, parsed, body, complete, error)


def in_thread(work: Callable[[], RawResponse]) -> Callable[[], RawResponse]:
    """Start C{work} on a thread; the returned function joins it and gives its result."""
    result: List[RawResponse] = []
    thread = threading.Thread(target=lambda: result.append(work()), daemon=True)
    thread.start()

    def join() -> RawResponse:
        thread.join(120)
        assert result, "the request did not end"
        return result[0]

    return join


class SmallDiskTests(FixtureCase):
    registry: FaultyRegistry
    _seed = 0

    @classmethod
    def start_fixture(cls) -> None:
        cls.registry = FaultyRegistry()

    @classmethod
    def stop_fixture(cls) -> None:
        cls._stop_shared("registry")

    def setUp(self) -> None:
        super().setUp()
        self.registry.clear_faults()
        self.disk = mount_small_disk(self)

    def start(self, *args: str) -> Sandbox:
        sandbox = start_sandboxed_hammal(
            self.registry.url,
            read_timeout=5,
            retries=2,
            retry_backoff=0.05,
            extra_args=["--cache-dir", self.disk, *args],
        )
        self.addCleanup(sandbox.stop)
        return sandbox

    def image(self, sizes: Sequence[int]) -> Image:
        type(self)._seed += 1
        name = f"disk/{self.id().rsplit('.', 1)[-1].replace('_', '-')}-{self._seed}"
        return self.registry.add_image(name, list(sizes), seed=self._seed + 500)

    def pull(self, sandbox: Sandbox, image: Image) -> None:
        """Manifest by tag and every blob, each exact (never a 5xx)."""
        resp = http_request(
            "GET",
            f"{sandbox.hammal.url}/v2/{image.name}/manifests/latest",
            [("Accept", OCI_MANIFEST)],
            timeout=60,
        )
        self.assertEqual(resp.status, 200, resp.describe())
        self.assertEqual(sha256(resp.body), image.digest)
        for blob in [image.config, *image.layers]:
            self.assertExact(get(sandbox.hammal.port, image.name, blob), blob)

    def skopeo(self, sandbox: Sandbox, image: Image) -> None:
        """A real client's pull (skopeo checks every digest), each layer compared."""
        dest = os.path.join(make_tempdir("hammal-disk-pull-"), "image")
        result = skopeo_pull(f"127.0.0.1:{sandbox.hammal.port}/{image.name}:latest", dest)
        self.assertEqual(result.returncode, 0, f"skopeo failed:\n{result.stderr[-3000:]}")
        for blob in image.layers:
            with open(os.path.join(dest, blob.hex), "rb") as layer:
                self.assertTrue(sha256(layer.read()) == blob.digest, "a layer differs")

    def assertExact(
        self, resp: RawResponse, blob: Blob, start: int = 0, end: Optional[int] = None
    ) -> None:
        expected = blob.data[start:end]
        self.assertEqual(
            resp.status,
            200 if start == 0 and end is None else 206,
            f"{resp.status} {resp.error} {resp.body[:300]!r}",
        )
        self.assertTrue(resp.complete, resp.error)
        self.assertEqual(len(resp.body), len(expected))
        self.assertTrue(resp.body == expected, "wrong bytes")

    def metric(self, sandbox: Sandbox, name: str) -> float:
        text = http_request("GET", f"{sandbox.hammal.url}/metrics", timeout=10).body.decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and not line.startswith("#"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stored(self, blob: Blob) -> bool:
        return os.path.exists(os.path.join(self.disk, "blobs", "sha256", blob.hex[:2], blob.hex))

    def tmp_files(self) -> List[str]:
        tmp = os.path.join(self.disk, "tmp")
        return os.listdir(tmp) if os.path.isdir(tmp) else []

    def assertCacheSound(self, sandbox: Sandbox) -> None:
        self.assertEqual(cache_problems(self.disk), [])
        self.assertTrue(
            self.settle(lambda: self.tmp_files() == [], 10),
            f"temporaries left behind: {self.tmp_files()}",
        )
        self.assertNoTraceback(sandbox)
        self.assertAlive(sandbox)

    # -- the tests -------------------------------------------------------------------

    def test_image_larger_than_the_disk(self) -> None:
        """
        72 MiB of layers and a 66 MiB layer through a 64 MiB cache disk:
        every pull exact, twice; the disk never overflows.
        """
        sandbox = self.start()
        image = self.image([24 * MiB, 24 * MiB, 24 * MiB, 66 * MiB])
        self.skopeo(sandbox, image)
        self.pull(sandbox, image)
        self.skopeo(sandbox, image)
        self.assertFalse(self.stored(image.layers[3]))
        # the cache was used all along, within the disk
        self.assertTrue(any(self.stored(blob) for blob in image.layers[:3]))
        self.assertCacheSound(sandbox)

    def test_upstream_breaks_a_blob_larger_than_the_disk(self) -> None:
        """
        Upstream resets the connection in the middle of a 66 MiB layer that
        streams through uncached: hammal resumes it with C{Range}, and
        skopeo's pull is exact (before, skopeo failed with a reset).
        """
        sandbox = self.start()
        image = self.image([66 * MiB])
        blob = image.layers[0]
        self.registry.add_fault("reset", f"/blobs/{blob.digest}", after=20 * MiB)
        self.skopeo(sandbox, image)
        ranges = [e.range for e in self.registry.entries(f"/blobs/{blob.digest}")]
        self.assertEqual(len(ranges), 2, ranges)
        self.assertIsNone(ranges[0])
        self.assertRegex(ranges[1] or "", r"^bytes=\d+-%d$" % (len(blob.data) - 1))
        self.assertFalse(self.stored(blob))
        self.assertIn("resuming uncached", sandbox.hammal.log_text())
        self.assertCacheSound(sandbox)

    def test_disk_full(self) -> None:
        """With the disk 100 % full, pulls are exact, counted as write errors."""
        sandbox = self.start()
        filler = fill(self.disk)
        image = self.image([3 * MiB, 5 * MiB])
        self.skopeo(sandbox, image)
        self.pull(sandbox, image)
        self.assertGreater(self.metric(sandbox, "hammal_cache_write_errors_total"), 0)
        ready = http_request("GET", f"{sandbox.hammal.url}/readyz", timeout=10)
        self.assertEqual(ready.status, 200, ready.describe())  # degraded, not out of service
        self.assertFalse(any(self.stored(blob) for blob in image.layers))
        self.assertCacheSound(sandbox)
        log = sandbox.hammal.log_text()
        self.assertIn("cache write failed, serving uncached", log)
        os.unlink(filler)  # room again: cached from now on
        self.pull(sandbox, image)
        self.assertTrue(self.settle(lambda: all(self.stored(b) for b in image.layers), 10))

    def test_disk_fills_during_a_fill_with_ranged_followers(self) -> None:
        """
        The disk fills while a 40 MiB blob is being written, followed by a
        whole reader and two ranged ones: each gets exactly upstream's bytes.
        """
        sandbox = self.start()
        image = self.image([40 * MiB])
        blob = image.layers[0]
        # 5 s of transfer: the disk fills long before it ends, even on a busy machine
        self.registry.add_fault("slow", f"/blobs/{blob.digest}", rate=8 * MiB)
        port = sandbox.hammal.port
        whole = in_thread(lambda: get(port, image.name, blob))
        self.assertTrue(
            self.settle(
                lambda: any(
                    os.path.getsize(os.path.join(self.disk, "tmp", name)) > 4 * MiB
                    for name in self.tmp_files()
                ),
                20,
            ),
            "the fill did not start",
        )
        early = in_thread(lambda: get(port, image.name, blob, ["Range: bytes=1048576-3145727"]))
        late = in_thread(lambda: get(port, image.name, blob, ["Range: bytes=31457280-36700159"]))
        follower = in_thread(lambda: get(port, image.name, blob))
        time.sleep(0.3)  # let the followers join the fill
        fill(self.disk)
        self.assertExact(whole(), blob)
        self.assertExact(follower(), blob)
        self.assertExact(early(), blob, 1 * MiB, 3 * MiB)
        self.assertExact(late(), blob, 30 * MiB, 35 * MiB)
        self.assertFalse(self.stored(blob))
        self.assertCacheSound(sandbox)
        # no blame on upstream: nothing logged as a digest mismatch
        self.assertEqual(self.metric(sandbox, "hammal_digest_mismatches_total"), 0)

    def test_blob_larger_than_the_cap(self) -> None:
        """Over --cache-max-size a blob streams through and evicts nothing."""
        sandbox = self.start("--cache-max-size", "16M")
        small = self.image([4 * MiB, 4 * MiB])
        self.pull(sandbox, small)
        self.assertTrue(self.settle(lambda: all(self.stored(b) for b in small.layers), 10))
        large = self.image([20 * MiB])
        self.pull(sandbox, large)
        self.assertFalse(self.stored(large.layers[0]))
        self.assertTrue(all(self.stored(b) for b in small.layers))
        self.assertCacheSound(sandbox)

    def test_kill_mid_fill_then_restart(self) -> None:
        """
        kill -9 in the middle of fills: after a restart nothing partial is
        served, the temporaries are gone at once, and the pulls are exact.
        """
        sandbox = self.start()
        image = self.image([20 * MiB, 12 * MiB])
        joins: Dict[str, Callable[[], RawResponse]] = {}
        for blob in image.layers:
            self.registry.add_fault("slow", f"/blobs/{blob.digest}", rate=4 * MiB)
            joins[blob.digest] = in_thread(
                lambda blob=blob: get(sandbox.hammal.port, image.name, blob)
            )  # type: ignore[misc]
        self.assertTrue(
            self.settle(
                lambda: (
                    len(self.tmp_files()) >= 2
                    and all(
                        os.path.getsize(os.path.join(self.disk, "tmp", name)) > MiB
                        for name in self.tmp_files()
                    )
                ),
                20,
            ),
            "the fills did not start",
        )
        os.kill(sandbox.pid, signal.SIGKILL)
        for join in joins.values():
            self.assertFalse(join().complete)
        self.assertTrue(self.tmp_files())
        self.registry.clear_faults()
        restarted = self.start()
        self.assertEqual(self.tmp_files(), [])
        self.assertFalse(any(self.stored(blob) for blob in image.layers))
        self.pull(restarted, image)
        self.pull(restarted, image)
        self.assertCacheSound(restarted)
        errors = [json.dumps(e.path) for e in self.registry.entries("/blobs/") if e.status >= 500]
        self.assertEqual(errors, [])

    def test_gc_on_a_running_server(self) -> None:
        """
        ``hammal cache gc`` while the server fills and serves: the fill in
        flight keeps its temporary, blobs removed under the server are
        fetched again, every pull exact.
        """
        sandbox = self.start()
        cached = self.image([2 * MiB, 3 * MiB])
        self.pull(sandbox, cached)
        self.assertTrue(self.settle(lambda: all(self.stored(b) for b in cached.layers), 10))
        filling = self.image([16 * MiB])
        blob = filling.layers[0]
        # 8 s of transfer: gc runs while it is in flight, even on a busy machine
        self.registry.add_fault("slow", f"/blobs/{blob.digest}", rate=2 * MiB)
        whole = in_thread(lambda: get(sandbox.hammal.port, filling.name, blob))
        self.assertTrue(self.settle(lambda: bool(self.tmp_files()), 20), "the fill did not start")
        in_flight = self.tmp_files()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "hammal",
                "cache",
                "gc",
                "--cache-dir",
                self.disk,
                "--max-size",
                "1K",
            ],
            capture_output=True,
            timeout=60,
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": REPO_ROOT},
        )
        self.assertEqual(done.returncode, 0, done.stderr.decode(errors="replace"))
        self.assertFalse(any(self.stored(b) for b in cached.layers))
        self.assertTrue(
            set(in_flight) <= set(self.tmp_files()), "gc removed a transfer in progress"
        )
        self.assertExact(whole(), blob)
        self.pull(sandbox, cached)
        self.pull(sandbox, filling)
        self.assertCacheSound(sandbox)
