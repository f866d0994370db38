"""Redis dies and returns while hammal is under load: no request fails.

Uses the integration environment (token-auth Distribution, CDN redirects,
its redis-server, which is SIGKILLed and restarted empty on the same port).
hammal runs with ``--redis`` and ``--manifest-ttl 0``, so every tag request
goes through the shared tag map and the token cache, both in redis.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from typing import Dict, List, Tuple

from tests.integration.environment import (
    get_environment,
    http_request,
    missing_binaries,
)
from tests.integration.images import ALL_MANIFEST_TYPES
from tests.resilience.support import ResilienceCase, cache_problems, start_sandboxed_hammal

WORKERS = 8
LOAD_SECONDS = 9.0


class RedisOutageTests(ResilienceCase):
    def setUp(self) -> None:
        missing = missing_binaries()
        if missing:
            if os.environ.get("CI"):
                self.fail(f"needs {missing}: make test installs them")
            self.skipTest(f"needs {missing} (make system-deps)")
        self.env = get_environment()
        if not self.env.redis.ping():
            self.env.redis.restart()
        self.addCleanup(self._revive)

    def _revive(self) -> None:
        if not self.env.redis.ping():
            self.env.redis.restart()

    def test_redis_dies_and_returns_mid_load(self) -> None:
        env = self.env
        sandbox = start_sandboxed_hammal(
            env.registry_url, redis=env.redis.url, extra_args=["--manifest-ttl", "0"]
        )
        self.addCleanup(sandbox.stop)
        images = [
            env.image(r) for r in ("library/alpine:3.20", "library/ociimg:1", "bitnami/redis:7")
        ]
        work: List[Tuple[str, str, List[Tuple[str, str]], str]] = []
        for img in images:
            accept = [("Accept", t) for t in ALL_MANIFEST_TYPES]
            work.append(
                (f"/v2/{img.repo}/manifests/{img.tag}", "manifest", accept, img.manifest_digest)
            )
            work.append(
                (
                    f"/v2/{img.repo}/manifests/{img.manifest_digest}",
                    "manifest",
                    accept,
                    img.manifest_digest,
                )
            )
            for d in img.blob_digests[:2]:
                work.append((f"/v2/{img.repo}/blobs/{d}", "blob", [], d))
        # warm-up: tokens and tags land in redis
        for path, _, headers, want in work:
            resp = http_request("GET", sandbox.hammal.url + path, headers, timeout=30)
            self.assertEqual(resp.status, 200, resp.describe())
        self.assertTrue(env.redis.keys("*"), "hammal wrote nothing to redis")

        failures: List[str] = []
        counts: Dict[str, int] = {"before": 0, "down": 0, "after": 0}
        latencies: List[float] = []
        phase = ["before"]
        lock = threading.Lock()
        stop = threading.Event()

        def worker(offset: int) -> None:
            i = offset
            while not stop.is_set():
                path, kind, headers, want = work[i % len(work)]
                i += 1
                current = phase[0]
                t0 = time.monotonic()
                try:
                    resp = http_request("GET", sandbox.hammal.url + path, headers, timeout=20)
                    got = "sha256:" + hashlib.sha256(resp.body).hexdigest()
                    problem = (
                        ""
                        if resp.status == 200 and got == want
                        else f"{path} during {current}: {resp.status} {resp.body[:200]!r}"
                    )
                except Exception as e:  # noqa: BLE001 - a failure to report
                    problem = f"{path} during {current}: {e!r}"
                with lock:
                    latencies.append(time.monotonic() - t0)
                    counts[current] += 1
                    if problem:
                        failures.append(problem)

        threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(WORKERS)]
        for t in threads:
            t.start()
        try:
            time.sleep(LOAD_SECONDS / 4)
            env.redis.kill()
            phase[0] = "down"
            time.sleep(LOAD_SECONDS / 3)
            env.redis.restart()
            phase[0] = "after"
            time.sleep(LOAD_SECONDS / 3)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        self.assertEqual(
            failures[:10],
            [],
            f"{len(failures)} failed requests; counts {counts}\n{sandbox.hammal.log_tail(3000)}",
        )
        self.assertTrue(all(counts.values()), f"no traffic in some phase: {counts}")
        self.assertAlive(sandbox)
        self.assertNoTraceback(sandbox)
        self.assertEqual(cache_problems(sandbox.cache_dir), [])

        # with redis back, hammal uses it again
        def wrote_again() -> bool:
            http_request("GET", sandbox.hammal.url + work[0][0], work[0][2], timeout=10)
            return bool(env.redis.keys("*"))

        self.assertTrue(self.settle(wrote_again, 20), "hammal never wrote to the restarted redis")
