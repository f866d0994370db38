"""hammal's benchmark: hammal vs nginx proxy_pass vs Distribution, on loopback.

Run from the repository root::

    PYTHONPATH=. .venv/bin/python -m bench.run            # full: 3 runs, 256 MiB
    PYTHONPATH=. .venv/bin/python -m bench.run --quick    # cold-blob rows only, 64 MiB

Prints every figure (medians), the ratios and the targets with PASS/MISS,
and writes ``bench/results.json``. It never fails on a missed target: it
reports. See ``bench/README.rst`` for what each figure means.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import urllib.parse
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from bench import machine
from bench.clients import (
    MiB,
    RSSSampler,
    cpu_seconds,
    curl_get,
    curl_many,
    many_slow_readers,
    rss_kib,
    slow_reader,
    total_rss_mib,
    wrk,
)
from bench.cluster import cluster_row
from bench.cluster import describe as describe_cluster
from bench.crowd import slow_crowd
from bench.hashing import hashed_get
from bench.latency import ProbeProcess
from bench.stack import (
    ACCEPT_ALL,
    BenchUpstream,
    DistributionPeer,
    HammalBench,
    NginxReference,
    bench_workdir,
    build_image,
)
from bench.ttfb import first_body_byte
from bench.verdicts import NO_HOLD_TAIL, Verdict, judge
from tests.integration.environment import (
    REPO_ROOT,
    HarnessError,
    http_get_digest,
    make_tempdir,
    skopeo_pull,
    wait_until,
)

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results.json")


@dataclasses.dataclass
class Config:
    """Sizes and durations of a run."""

    runs: int
    big_size: int
    multi_layers: List[int]
    concurrent: int
    wrk_seconds: int
    slow_seconds: float
    slow_rate: float
    many_slow: int
    many_slow_seconds: float
    crowd: int = 3000
    crowd_rate: float = 64 * 1024
    crowd_seconds: float = 20
    crowd_probe_rate: float = 100


FULL = Config(
    runs=3,
    big_size=256 * MiB,
    multi_layers=[8 * MiB] * 8,
    concurrent=50,
    wrk_seconds=10,
    slow_seconds=30,
    slow_rate=1_000_000,
    many_slow=500,
    many_slow_seconds=20,
)
QUICK = Config(
    runs=1,
    big_size=64 * MiB,
    multi_layers=[2 * MiB] * 4,
    concurrent=50,
    wrk_seconds=3,
    slow_seconds=10,
    slow_rate=1_000_000,
    many_slow=500,
    many_slow_seconds=8,
    crowd_seconds=10,
)

#: What ``--quick`` runs unless ``--only`` says otherwise: the cold-blob rows.
QUICK_SECTIONS = ["throughput", "ttfb"]

Proxy = Any  # HammalBench | DistributionPeer | NginxReference


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def median(values: Sequence[float]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


class Bench:
    def __init__(self, quick: bool, runs: Optional[int], sections: Sequence[str]) -> None:
        self.quick = quick
        self.cfg = dataclasses.replace(QUICK if quick else FULL)
        if runs:
            self.cfg.runs = runs
        self.sections = list(sections)
        self.workdir = bench_workdir()
        self.figures: Dict[str, Any] = {}
        self.problems: List[str] = []
        self.loadavg_at_start = os.getloadavg()
        self.sha256_MBps = machine.sha256_speed()
        self.cpu_flags = machine.cpu_flags()
        self.revision_at_start = hammal_revision()
        # thousands of sockets here and in hammal (which inherits the limit)
        self.nofile = machine.raise_nofile(2 * self.cfg.crowd + 4096)
        self.no_hold_tail: Optional[HammalBench] = None
        self.no_hold_tail_reason = ""

    # -- set-up ------------------------------------------------------------

    def setup(self) -> None:
        t0 = time.monotonic()
        images_dir = os.path.join(self.workdir, "images")
        log(f"building images in {images_dir}")
        self.big = build_image(images_dir, "bench/big", "1", [self.cfg.big_size], seed=11)
        self.multi = build_image(images_dir, "bench/multi", "1", self.cfg.multi_layers, seed=12)
        self.blob, self.blob_size = self.big.largest_layer
        log(
            f"big layer {self.blob} ({self.blob_size} bytes); "
            f"multi: {len(self.multi.layers)} layers"
        )
        self.upstream = BenchUpstream(self.workdir).start([self.big, self.multi])
        self.nginx = NginxReference(self.workdir, self.upstream).start()
        self.peer = DistributionPeer(self.workdir, self.upstream)
        self.hammal = HammalBench(self.workdir, self.upstream, buffer_size="1M")
        self.proxies: List[Proxy] = [self.hammal, self.nginx, self.peer]
        self._probe_no_hold_tail()
        log(
            f"upstream up and seeded in {time.monotonic() - t0:.1f}s "
            f"(registry {self.upstream.registry_url}, CDN {self.upstream.cdn_url}, "
            f"nginx reference {self.nginx.url})"
        )
        self._sanity()

    def _probe_no_hold_tail(self) -> None:
        """A second hammal with ``--no-hold-tail``, if hammal accepts the option."""
        candidate = HammalBench(
            self.workdir, self.upstream, buffer_size="1M", extra_args=["--no-hold-tail"]
        )
        try:
            candidate.restart_fresh()
        except HarnessError as refused:
            lines = [line.strip() for line in str(refused).splitlines() if line.strip()]
            said = next(
                (line for line in lines if "no-hold-tail" in line and "exited" not in line),
                lines[0] if lines else "",
            )
            said = said.rsplit(": ", 1)[-1]  # twistd's "PATH --pidfile=: option ... not recognized"
            self.no_hold_tail_reason = f"not available: hammal refuses it ({said[:100]})"
            log(self.no_hold_tail_reason)
            candidate.stop()
            return
        candidate.stop()
        self.no_hold_tail = candidate
        log("hammal accepts --no-hold-tail: measuring it too")

    def blob_path(self) -> str:
        return f"/v2/{self.big.repo}/blobs/{self.blob}"

    def _sanity(self) -> None:
        """Every proxy serves the right bytes (small blob digest, big blob size)."""
        self.hammal.restart_fresh()
        self.peer.restart_fresh()
        config = [d for d in self.multi.blobs if d not in self.multi.layers][0]
        small = self.multi.layers[0]
        for proxy in self.proxies:
            for digest in (config, small):
                resp, got, size = http_get_digest(
                    f"{proxy.url}/v2/{self.multi.repo}/blobs/{digest}",
                    proxy.client_headers(self.multi.repo),
                    timeout=60,
                )
                if resp.status != 200 or got != digest:
                    raise HarnessError(f"{proxy.name} served {resp.status} {got} for {digest}")
        log("sanity: every proxy serves the right digests")

    # -- helpers -----------------------------------------------------------

    def fresh(self, proxy: Proxy) -> None:
        if proxy is not self.nginx:
            proxy.restart_fresh()

    def blob_url(self, proxy: Proxy) -> str:
        return proxy.url + self.blob_path()

    def wait_peer_stored(self, digests: Sequence[str], repo: str, timeout: float = 120) -> None:
        """Distribution stores a proxied blob on a goroutine of its own: wait for it."""
        storage = os.path.join(
            self.workdir, f"peer-storage-{self.peer.generation}", "docker", "registry", "v2"
        )

        def stored() -> bool:
            for d in digests:
                hexd = d.split(":", 1)[1]
                data = os.path.join(storage, "blobs", "sha256", hexd[:2], hexd, "data")
                link = os.path.join(
                    storage, "repositories", repo, "_layers", "sha256", hexd, "link"
                )
                if not (os.path.exists(data) and os.path.exists(link)):
                    return False
            return True

        wait_until(stored, "Distribution to store the blobs", timeout)
        time.sleep(0.2)

    def check_curl(self, what: str, res: Any, size: int) -> None:
        if res.code != 200 or res.size != size:
            self.problems.append(f"{what}: HTTP {res.code}, {res.size} of {size} bytes {res.error}")

    # -- figures -----------------------------------------------------------

    def throughput(self) -> None:
        runs = self.cfg.runs
        cold: Dict[str, List[float]] = {p.name: [] for p in self.proxies}
        warm: Dict[str, List[float]] = {"hammal": [], "distribution": []}
        gib = self.blob_size / (1 << 30)
        cpu: Dict[str, List[float]] = {}  # CPU seconds of the proxy per GiB served

        def get(proxy: Proxy, what: str, headers: List[Tuple[str, str]]) -> float:
            before = cpu_seconds(proxy.pids())
            res = curl_get(self.blob_url(proxy), headers)
            used = cpu_seconds(proxy.pids()) - before
            cpu.setdefault(f"{proxy.name} {what}", []).append(round(used / gib, 2))
            self.check_curl(f"{what} {proxy.name} run {r + 1}", res, self.blob_size)
            return res.speed / 1e6

        for r in range(runs):
            for proxy in self.proxies:
                self.fresh(proxy)
                headers = proxy.client_headers(self.big.repo)
                speed = get(proxy, "cold", headers)
                cold[proxy.name].append(speed)
                line = f"run {r + 1}: {proxy.name} cold {speed:.0f} MB/s"
                if proxy.name in warm:
                    if proxy is self.peer:
                        self.wait_peer_stored([self.blob], self.big.repo)
                    speed = get(proxy, "warm", headers)
                    warm[proxy.name].append(speed)
                    line += f", warm {speed:.0f} MB/s"
                log(line)
            if self.no_hold_tail is not None:
                self.no_hold_tail.restart_fresh()
                speed = get(self.no_hold_tail, "cold --no-hold-tail", [])
                cold.setdefault(NO_HOLD_TAIL, []).append(speed)
                self.no_hold_tail.stop()
                log(f"run {r + 1}: {NO_HOLD_TAIL} cold {speed:.0f} MB/s")
        log(
            "proxy CPU seconds per GiB served: "
            + ", ".join(f"{k} {median(v)}" for k, v in cpu.items())
        )
        self.figures["cpu_s_per_GiB"] = {
            k: {"runs": v, "median": median(v)} for k, v in cpu.items()
        }
        # the client's ceiling: curl straight from the CDN (nginx sendfile)
        hexd = self.blob.split(":", 1)[1]
        cdn_url = f"{self.upstream.cdn_url}/docker/registry/v2/blobs/sha256/{hexd[:2]}/{hexd}/data"
        direct = [curl_get(cdn_url).speed / 1e6 for _ in range(runs)]
        log(f"client ceiling (curl from the CDN directly): {[round(x) for x in direct]} MB/s")
        self.figures["cdn_direct_MBps"] = {"runs": direct, "median": median(direct)}
        self.figures["hashing_client_MBps"] = self.hashing_ceilings(runs, cdn_url)
        self.figures["cold_MBps"] = {k: {"runs": v, "median": median(v)} for k, v in cold.items()}
        self.figures["no_hold_tail"] = {
            "available": self.no_hold_tail is not None,
            "reason": self.no_hold_tail_reason,
        }
        self.figures["warm_MBps"] = {k: {"runs": v, "median": median(v)} for k, v in warm.items()}

    def hashing_ceilings(self, runs: int, cdn_url: str) -> Dict[str, Any]:
        """
        The blob received by a client that hashes it on a second thread
        (L{bench.hashing}): through nginx (a proxy that neither hashes nor
        stores, the hash left to the client) and straight from the CDN. No
        proxy doing nginx's work plus the hash can beat the first here.
        """
        cdn = urllib.parse.urlsplit(cdn_url)
        sources = {
            "nginx": (self.nginx.port, self.blob_path(), self.nginx.client_headers(self.big.repo)),
            "cdn": (cdn.port or 80, cdn.path, []),
        }
        found: Dict[str, Any] = {}
        for name, (port, path, headers) in sources.items():
            speeds = []
            for r in range(runs):
                got = hashed_get(port, path, headers)
                if got.error or got.status != 200 or got.digest != self.blob:
                    raise RuntimeError(
                        f"hashing client via {name} run {r + 1}: {got.status} {got.error}"
                        f" {got.digest} (wanted {self.blob})"
                    )
                speeds.append(round(got.speed / 1e6))
            found[name] = {"runs": speeds, "median": median(speeds)}
            log(f"hashing client (sha256 on a 2nd thread) via {name}: {speeds} MB/s")
        return found

    def concurrent(self) -> None:
        runs, n = self.cfg.runs, self.cfg.concurrent
        hexd = self.blob.split(":", 1)[1]
        out: Dict[str, Dict[str, List[Any]]] = {}
        for r in range(runs):
            for proxy in self.proxies:
                self.fresh(proxy)
                headers = proxy.client_headers(self.big.repo)
                offset = self.upstream.cdn.log_offset()
                cpu_before = cpu_seconds(proxy.pids())
                with RSSSampler(proxy.pids, interval=0.05) as sampler:
                    wall, results = curl_many(self.blob_url(proxy), n, headers)
                cpu_used = cpu_seconds(proxy.pids()) - cpu_before
                time.sleep(0.5)  # the CDN logs a request when it ends
                lines = self.upstream.cdn.log_lines(offset)
                gets = sum(1 for line in lines if line.startswith("GET ") and hexd in line)
                heads = sum(1 for line in lines if line.startswith("HEAD ") and hexd in line)
                full = sum(
                    1
                    for line in lines
                    if line.startswith("GET ")
                    and hexd in line
                    and line.split()[3] == str(self.blob_size)
                )
                ok = sum(1 for x in results if x.code == 200 and x.size == self.blob_size)
                if ok != n:
                    bad = [
                        f"{x.code}/{x.size}/{x.error}"
                        for x in results
                        if not (x.code == 200 and x.size == self.blob_size)
                    ][:5]
                    self.problems.append(
                        f"{n} concurrent via {proxy.name} run {r + 1}: only {ok} "
                        f"complete; e.g. {bad}"
                    )
                hwm = (
                    (rss_kib(proxy.pids()[0], "VmHWM") / 1024.0) if len(proxy.pids()) == 1 else None
                )
                rec = out.setdefault(
                    proxy.name,
                    {
                        "wall_s": [],
                        "cdn_gets": [],
                        "cdn_heads": [],
                        "cdn_full_bodies": [],
                        "peak_rss_MiB": [],
                        "vmhwm_MiB": [],
                        "complete": [],
                        "cpu_s": [],
                    },
                )
                rec["cpu_s"].append(round(cpu_used, 1))
                rec["wall_s"].append(round(wall, 2))
                rec["cdn_gets"].append(gets)
                rec["cdn_heads"].append(heads)
                rec["cdn_full_bodies"].append(full)
                rec["peak_rss_MiB"].append(round(sampler.peak, 1))
                rec["vmhwm_MiB"].append(round(hwm, 1) if hwm is not None else None)
                rec["complete"].append(ok)
                log(
                    f"run {r + 1}: {n} concurrent cold via {proxy.name}: {wall:.1f}s, "
                    f"CDN GETs {gets} ({full} full bodies), HEADs {heads}, "
                    f"peak RSS {sampler.peak:.0f} MiB"
                    f"{'' if hwm is None else f' (VmHWM {hwm:.0f} MiB)'}, "
                    f"CPU {cpu_used:.1f}s, {ok}/{n} complete"
                )
        self.figures["concurrent_cold"] = {
            name: {
                **rec,
                "median_wall_s": median(rec["wall_s"]),
                "median_peak_rss_MiB": median(rec["peak_rss_MiB"]),
                "max_cdn_gets": max(rec["cdn_gets"]),
            }
            for name, rec in out.items()
        }

    def manifests(self) -> None:
        runs, secs = self.cfg.runs, self.cfg.wrk_seconds
        path = f"/v2/{self.multi.repo}/manifests/{self.multi.tag}"
        out: Dict[str, Dict[str, List[float]]] = {}
        for proxy in (self.hammal, self.peer):
            if proxy.process is None:
                proxy.restart_fresh()
        for r in range(runs):
            for proxy in self.proxies:
                headers = [("Accept", ACCEPT_ALL)] + proxy.client_headers(self.multi.repo)
                # warm it (hammal caches the tag; the others ask upstream anyway)
                resp, digest, _ = http_get_digest(proxy.url + path, headers, timeout=30)
                if resp.status != 200 or digest != self.multi.manifest_digest:
                    self.problems.append(f"manifest via {proxy.name}: {resp.status} {digest}")
                res = wrk(proxy.url + path, headers, connections=50, seconds=secs)
                rec = out.setdefault(
                    proxy.name,
                    {
                        "req_per_s": [],
                        "p50_ms": [],
                        "p99_ms": [],
                        "non_2xx": [],
                        "socket_errors": [],
                    },
                )
                rec["req_per_s"].append(res.requests_per_s)
                rec["p50_ms"].append(res.p50_ms)
                rec["p99_ms"].append(res.p99_ms)
                rec["non_2xx"].append(res.non_2xx)
                rec["socket_errors"].append(res.socket_errors)  # type: ignore[arg-type]
                if res.non_2xx or res.requests_per_s == 0:
                    self.problems.append(
                        f"wrk via {proxy.name} run {r + 1}: {res.non_2xx} non-2xx"
                        f" of {res.requests}; {res.socket_errors}"
                    )
                log(
                    f"run {r + 1}: manifest by tag via {proxy.name}: "
                    f"{res.requests_per_s:.0f} req/s,"
                    f" p50 {res.p50_ms:.1f} ms, p99 {res.p99_ms:.1f} ms"
                    f"{f', {res.non_2xx} non-2xx' if res.non_2xx else ''}"
                    f"{f', socket errors {res.socket_errors}' if res.socket_errors else ''}"
                )
        self.figures["manifest_by_tag"] = {
            name: {
                **rec,
                "median_req_per_s": median(rec["req_per_s"]),
                "median_p50_ms": median(rec["p50_ms"]),
                "median_p99_ms": median(rec["p99_ms"]),
            }
            for name, rec in out.items()
        }

    def workers(self) -> None:
        """Manifest by tag under wrk -c50: hammal ``--workers 2`` against one process (issue 14)."""
        runs, secs = self.cfg.runs, self.cfg.wrk_seconds
        path = f"/v2/{self.multi.repo}/manifests/{self.multi.tag}"
        two = HammalBench(
            self.workdir, self.upstream, buffer_size="1M", extra_args=["--workers", "2"]
        )
        out: Dict[str, Dict[str, List[float]]] = {}
        try:
            if self.hammal.process is None:
                self.hammal.restart_fresh()
            two.restart_fresh()
            for r in range(runs):
                for label, proxy in (("1", self.hammal), ("2", two)):
                    headers = [("Accept", ACCEPT_ALL)] + proxy.client_headers(self.multi.repo)
                    for _ in range(4):  # warm every process (the kernel picks one per connection)
                        resp, digest, _ = http_get_digest(proxy.url + path, headers, timeout=30)
                        if resp.status != 200 or digest != self.multi.manifest_digest:
                            self.problems.append(f"manifest via {label} worker(s): {resp.status}")
                    res = wrk(proxy.url + path, headers, connections=50, seconds=secs)
                    rec = out.setdefault(label, {"req_per_s": [], "p50_ms": [], "p99_ms": []})
                    rec["req_per_s"].append(res.requests_per_s)
                    rec["p50_ms"].append(res.p50_ms)
                    rec["p99_ms"].append(res.p99_ms)
                    if res.non_2xx or res.requests_per_s == 0:
                        self.problems.append(
                            f"wrk via {label} worker(s) run {r + 1}:"
                            f" {res.non_2xx} non-2xx of {res.requests}"
                        )
                    log(
                        f"run {r + 1}: manifest by tag, {label} worker(s):"
                        f" {res.requests_per_s:.0f} req/s, p99 {res.p99_ms:.1f} ms"
                    )
        finally:
            two.stop()
        self.figures["manifest_workers"] = {
            label: {
                **rec,
                "median_req_per_s": median(rec["req_per_s"]),
                "median_p50_ms": median(rec["p50_ms"]),
                "median_p99_ms": median(rec["p99_ms"]),
            }
            for label, rec in out.items()
        }

    def skopeo(self) -> None:
        runs = self.cfg.runs
        source_path = f"{self.multi.repo}:{self.multi.tag}"
        out: Dict[str, Dict[str, List[float]]] = {}

        def pull(proxy: Proxy) -> float:
            dest = make_tempdir("hammal-bench-skopeo-")
            os.rmdir(dest)
            t0 = time.monotonic()
            result = skopeo_pull(f"127.0.0.1:{proxy.port}/{source_path}", dest, timeout=600)
            took = time.monotonic() - t0
            if result.returncode != 0:
                self.problems.append(f"skopeo via {proxy.name}: {result.stderr[-400:]}")
            subprocess.run(["rm", "-rf", dest], check=False)
            return round(took, 2)

        for r in range(runs):
            for proxy in self.proxies:
                self.fresh(proxy)
                rec = out.setdefault(proxy.name, {"cold_s": [], "warm_s": []})
                rec["cold_s"].append(pull(proxy))
                if proxy is self.nginx:
                    log(f"run {r + 1}: skopeo via nginx: {rec['cold_s'][-1]}s")
                    continue
                if proxy is self.peer:
                    self.wait_peer_stored(self.multi.layers, self.multi.repo)
                rec["warm_s"].append(pull(proxy))
                log(
                    f"run {r + 1}: skopeo via {proxy.name}: cold {rec['cold_s'][-1]}s, "
                    f"warm {rec['warm_s'][-1]}s"
                )
        self.figures["skopeo_pull_s"] = {
            name: {
                **rec,
                "median_cold_s": median(rec["cold_s"]),
                "median_warm_s": median(rec["warm_s"]),
            }
            for name, rec in out.items()
        }

    def slow_client(self) -> None:
        secs, rate = self.cfg.slow_seconds, self.cfg.slow_rate
        self.hammal.restart_fresh()
        samples: List[float] = []

        def tick(_: int) -> None:
            samples.append(round(total_rss_mib(self.hammal.pids()), 1))

        res = slow_reader(self.hammal.port, self.blob_path(), [], rate, secs, tick)
        log(
            f"slow client ({rate / 1e6:.0f} MB/s, {secs}s, cold blob) via hammal: {res}; "
            f"RSS MiB first {samples[0]} max {max(samples)} last {samples[-1]}"
        )
        self.figures["slow_client"] = {
            "rate_Bps": rate,
            "seconds": secs,
            "read": res,
            "rss_MiB": samples,
            "first_MiB": samples[0],
            "max_MiB": max(samples),
            "last_MiB": samples[-1],
        }

    def many_slow(self) -> None:
        """500 slow readers of the big blob: cold (they follow hammal's fetch
        in flight) at --buffer-size 1M and at the default 256K, and warm (a
        complete cache hit) at 1M."""
        count, secs = self.cfg.many_slow, self.cfg.many_slow_seconds
        out: Dict[str, Any] = {}
        for buffer_size, state in (("1M", "cold"), ("1M", "warm"), ("256K", "cold")):
            hammal = (
                self.hammal
                if buffer_size == "1M"
                else HammalBench(self.workdir, self.upstream, buffer_size=buffer_size)
            )
            hammal.restart_fresh()
            if state == "warm":
                warm_up = curl_get(self.blob_url(hammal))
                self.check_curl("many-slow warm-up", warm_up, self.blob_size)
            samples: List[float] = []

            def tick(_: int) -> None:
                samples.append(round(total_rss_mib(hammal.pids()), 1))

            res = many_slow_readers(hammal.port, self.blob_path(), [], count, secs, tick)
            hwm = rss_kib(hammal.pids()[0], "VmHWM") / 1024.0
            key = f"{buffer_size} {state}"
            out[key] = {
                **res,
                "rss_MiB": samples,
                "first_MiB": samples[0],
                "max_MiB": max(samples),
                "last_MiB": samples[-1],
                "vmhwm_MiB": round(hwm, 1),
            }
            log(
                f"{count} slow clients via hammal --buffer-size {buffer_size}, {state} blob: {res};"
                f" RSS MiB first {samples[0]} max {max(samples)} last {samples[-1]}"
                f" (VmHWM {hwm:.0f})"
            )
            if hammal is not self.hammal:
                hammal.stop()
        self.figures["many_slow_clients"] = out

    def ttfb(self) -> None:
        """Request to first body byte of the cold blob, each proxy fresh."""
        out: Dict[str, List[float]] = {}
        proxies: List[Proxy] = [self.hammal, self.peer, self.nginx]
        if self.no_hold_tail is not None:
            proxies.append(self.no_hold_tail)
        # Each sample is one GET of a few ms: twice as many samples as runs
        # (at least 5) keep one slow token or connection from moving the median.
        for r in range(max(5, 2 * self.cfg.runs)):
            for proxy in proxies:
                extra = proxy is self.no_hold_tail
                name = NO_HOLD_TAIL if extra else proxy.name
                if extra:
                    proxy.restart_fresh()
                else:
                    self.fresh(proxy)
                res = first_body_byte(
                    proxy.port, self.blob_path(), proxy.client_headers(self.big.repo), timeout=300
                )
                if extra:
                    proxy.stop()
                if res.error or res.status != 200 or res.body_bytes != self.blob_size:
                    self.problems.append(
                        f"TTFB via {name} run {r + 1}: HTTP {res.status},"
                        f" {res.body_bytes} of {self.blob_size} bytes {res.error}"
                    )
                ms = round(res.ttfb_s * 1000, 1)
                out.setdefault(name, []).append(ms)
                log(
                    f"run {r + 1}: cold TTFB via {name}: {ms} ms (headers at"
                    f" {res.headers_s * 1000:.1f} ms, body done at {res.seconds:.2f} s)"
                )
        self.figures["ttfb_ms"] = {k: {"runs": v, "median": median(v)} for k, v in out.items()}

    def crowd(self) -> None:
        """N slow readers of the warm big blob arrive at once; meanwhile a
        paced probe GETs the manifest by tag and times every request."""
        cfg = self.cfg
        hammal = self.hammal
        hammal.restart_fresh()
        warm_up = curl_get(self.blob_url(hammal))
        self.check_curl("crowd warm-up", warm_up, self.blob_size)
        path = f"/v2/{self.multi.repo}/manifests/{self.multi.tag}"
        headers = [("Accept", ACCEPT_ALL)]
        resp, digest, _ = http_get_digest(hammal.url + path, headers, timeout=30)
        if resp.status != 200 or digest != self.multi.manifest_digest:
            self.problems.append(f"crowd: manifest warm-up {resp.status} {digest}")
        lead = 1.0  # the probe's baseline before the crowd arrives
        probe = ProbeProcess(
            hammal.port,
            path,
            headers,
            cfg.crowd_probe_rate,
            lead + cfg.crowd_seconds + 1,
            env={**os.environ, "PYTHONPATH": REPO_ROOT},
        )
        samples: List[float] = []
        kernel: List[float] = []
        try:
            if not probe.wait_started():
                self.problems.append("crowd: the latency probe did not start within 30 s")
            time.sleep(lead)

            def tick(_: int) -> None:
                samples.append(round(total_rss_mib(hammal.pids()), 1))
                kernel.append(machine.tcp_kernel_mib())

            readers = slow_crowd(
                hammal.port,
                self.blob_path(),
                [],
                cfg.crowd,
                cfg.crowd_rate,
                cfg.crowd_seconds,
                tick,
            )
            result = probe.result()
        finally:
            probe.kill()
        if result.error and not result.requests:
            self.problems.append(f"crowd: the latency probe failed: {result.error}")
        if readers.held_open != cfg.crowd:
            self.problems.append(
                f"crowd: {readers.held_open}/{cfg.crowd} readers held open;"
                f" connect errors {readers.connect_errors},"
                f" statuses {readers.statuses}"
            )
        self.figures["crowd"] = {
            "count": cfg.crowd,
            "rate_Bps": cfg.crowd_rate,
            "seconds": cfg.crowd_seconds,
            "probe_rate": cfg.crowd_probe_rate,
            "nofile": list(self.nofile),
            "readers": dataclasses.asdict(readers),
            "probe": dataclasses.asdict(result),
            "rss_MiB": samples,
            "max_MiB": max(samples, default=0.0),
            "kernel_tcp_MiB": kernel,
            "max_kernel_tcp_MiB": max(kernel, default=0.0),
        }
        log(
            f"crowd: {cfg.crowd} readers at {cfg.crowd_rate / 1024:.0f} KiB/s for"
            f" {cfg.crowd_seconds}s: connected {readers.connected} in {readers.connect_s}s,"
            f" held {readers.held_open}, {readers.per_reader_Bps / 1024:.0f} KiB/s each,"
            f" errors {readers.connect_errors}; manifest by tag: {result.requests} GETs,"
            f" p50 {result.p50_ms} ms, p99 {result.p99_ms} ms, max {result.max_ms} ms,"
            f" errors {result.errors}; hammal RSS max {max(samples, default=0.0)} MiB,"
            f" kernel TCP buffers (machine-wide) max {max(kernel, default=0.0)} MiB;"
            f" slowest manifest GET per second (ms, the crowd arrives at second {lead:g}):"
            f" {result.max_ms_by_second}"
        )

    # -- report ------------------------------------------------------------

    def cluster(self) -> None:
        """3 nodes behind HAProxy vs 1 node, 50 cold clients (bench/cluster.py)."""
        figures = cluster_row(self.cfg.big_size, self.cfg.concurrent)
        for key, rec in figures.items():
            if rec["complete"] != rec["clients"]:
                self.problems.append(
                    f"cluster row, {key}: only {rec['complete']}/{rec['clients']} complete"
                )
        for line in describe_cluster(figures):
            log(line)
        self.figures["cluster"] = figures

    def targets(self) -> List[Verdict]:
        return judge(self.figures, self.sha256_MBps, self.cfg.many_slow)

    def report(self, elapsed: float) -> Dict[str, Any]:
        f = self.figures
        lines = [
            "",
            "=" * 100,
            f"hammal benchmark ({'quick' if self.quick else 'full'}: "
            f"{self.cfg.runs} run(s), blob {self.blob_size / MiB:.0f} MiB), medians",
            "=" * 100,
        ]

        def fmt(v: Optional[float], spec: str = ".0f") -> str:
            return "-" if v is None else format(v, spec)

        def row(
            label: str,
            h: Optional[float],
            n: Optional[float],
            d: Optional[float],
            spec: str = ".0f",
        ) -> None:
            rhn = f"{h / n:.2f}" if h is not None and n else "-"
            rhd = f"{h / d:.2f}" if h is not None and d else "-"
            lines.append(
                f"{label:<44}{fmt(h, spec):>10}{fmt(n, spec):>10}{fmt(d, spec):>14}"
                f"{rhn:>10}{rhd:>10}"
            )

        lines.append(
            f"{'figure':<44}{'hammal':>10}{'nginx':>10}{'Distribution':>14}"
            f"{'h/nginx':>10}{'h/Dist':>10}"
        )
        if "cold_MBps" in f:
            c, w = f["cold_MBps"], f["warm_MBps"]
            row(
                "cold blob, 1 client (MB/s)",
                c["hammal"]["median"],
                c["nginx"]["median"],
                c["distribution"]["median"],
            )
            if NO_HOLD_TAIL in c:
                row(
                    "cold blob, hammal --no-hold-tail (MB/s)",
                    c[NO_HOLD_TAIL]["median"],
                    c["nginx"]["median"],
                    c["distribution"]["median"],
                )
            else:
                lines.append(
                    f"{'cold blob, hammal --no-hold-tail (MB/s)':<44}"
                    f"{'-':>10}   ({f['no_hold_tail']['reason']})"
                )
            lines.append(
                f"{'sha256 on one core here (MB/s)':<44}{self.sha256_MBps:>10.0f}"
                f"   (CPU flags: {machine.describe_flags(self.cpu_flags)})"
            )
            row(
                "warm blob, 1 client (MB/s)",
                w["hammal"]["median"],
                None,
                w["distribution"]["median"],
            )
        if "ttfb_ms" in f:
            t = f["ttfb_ms"]

            def ms(key: str) -> Optional[float]:
                return t[key]["median"] if key in t else None

            row(
                "cold blob: time to first body byte (ms)",
                ms("hammal"),
                ms("nginx"),
                ms("distribution"),
                ".1f",
            )
            if NO_HOLD_TAIL in t:
                row(
                    "  same, hammal --no-hold-tail (ms)",
                    ms(NO_HOLD_TAIL),
                    ms("nginx"),
                    ms("distribution"),
                    ".1f",
                )
        if "cpu_s_per_GiB" in f:
            c = f["cpu_s_per_GiB"]

            def cpu(key: str) -> Optional[float]:
                return c[key]["median"] if key in c else None

            row(
                "proxy CPU s per GiB, cold",
                cpu("hammal cold"),
                cpu("nginx cold"),
                cpu("distribution cold"),
                ".2f",
            )
            row(
                "proxy CPU s per GiB, warm",
                cpu("hammal warm"),
                None,
                cpu("distribution warm"),
                ".2f",
            )
        if "cdn_direct_MBps" in f:
            lines.append(
                f"{'client ceiling: curl from the CDN (MB/s)':<44}"
                f"{fmt(f['cdn_direct_MBps']['median']):>10}"
            )
        hashing = f.get("hashing_client_MBps")
        if hashing:
            lines.append(
                f"{'hashing client via nginx (MB/s)':<44}{'-':>10}"
                f"{fmt(hashing['nginx']['median']):>10}"
                f"   (sha256 at the client on a 2nd thread; from the CDN directly:"
                f" {fmt(hashing['cdn']['median'])})"
            )
        if "concurrent_cold" in f:
            cc = f["concurrent_cold"]
            n = self.cfg.concurrent
            row(
                f"{n} concurrent cold: wall (s)",
                cc["hammal"]["median_wall_s"],
                cc["nginx"]["median_wall_s"],
                cc["distribution"]["median_wall_s"],
                ".1f",
            )
            row(
                f"{n} concurrent cold: CDN blob GETs (max)",
                cc["hammal"]["max_cdn_gets"],
                cc["nginx"]["max_cdn_gets"],
                cc["distribution"]["max_cdn_gets"],
            )
            row(
                f"{n} concurrent cold: proxy CPU (s)",
                median(cc["hammal"]["cpu_s"]),
                median(cc["nginx"]["cpu_s"]),
                median(cc["distribution"]["cpu_s"]),
                ".1f",
            )
            row(
                f"{n} concurrent cold: peak RSS (MiB)",
                cc["hammal"]["median_peak_rss_MiB"],
                cc["nginx"]["median_peak_rss_MiB"],
                cc["distribution"]["median_peak_rss_MiB"],
            )
        if "manifest_by_tag" in f:
            m = f["manifest_by_tag"]
            row(
                "manifest by tag, wrk -c50 (req/s)",
                m["hammal"]["median_req_per_s"],
                m["nginx"]["median_req_per_s"],
                m["distribution"]["median_req_per_s"],
            )
            row(
                "manifest by tag: p50 (ms)",
                m["hammal"]["median_p50_ms"],
                m["nginx"]["median_p50_ms"],
                m["distribution"]["median_p50_ms"],
                ".1f",
            )
            row(
                "manifest by tag: p99 (ms)",
                m["hammal"]["median_p99_ms"],
                m["nginx"]["median_p99_ms"],
                m["distribution"]["median_p99_ms"],
                ".1f",
            )
        if "manifest_workers" in f:
            mw = f["manifest_workers"]
            one, two = mw["1"], mw["2"]
            ratio = (
                f"{two['median_req_per_s'] / one['median_req_per_s']:.2f}x"
                if one["median_req_per_s"]
                else "-"
            )
            lines.append(
                f"{'manifest by tag, wrk -c50, 2 workers (req/s)':<44}"
                f"{fmt(two['median_req_per_s']):>10}   (1 worker"
                f" {fmt(one['median_req_per_s'])}: {ratio})"
            )
            lines.append(
                f"{'manifest by tag, 2 workers: p99 (ms)':<44}"
                f"{fmt(two['median_p99_ms'], '.1f'):>10}   (1 worker"
                f" {fmt(one['median_p99_ms'], '.1f')})"
            )
        if "skopeo_pull_s" in f:
            s = f["skopeo_pull_s"]
            row(
                "skopeo pull, multi-layer, cold (s)",
                s["hammal"]["median_cold_s"],
                s["nginx"]["median_cold_s"],
                s["distribution"]["median_cold_s"],
                ".2f",
            )
            row(
                "skopeo pull, multi-layer, warm (s)",
                s["hammal"]["median_warm_s"],
                None,
                s["distribution"]["median_warm_s"],
                ".2f",
            )
        if "slow_client" in f:
            s = f["slow_client"]
            lines.append(
                f"1 MB/s slow client, {s['seconds']}s: hammal RSS MiB first {s['first_MiB']}"
                f" max {s['max_MiB']} last {s['last_MiB']}"
            )
        if "many_slow_clients" in f:
            for size, rec in f["many_slow_clients"].items():
                lines.append(
                    f"{self.cfg.many_slow} slow clients, --buffer-size {size} blob: held "
                    f"{rec['held_open']}/{rec['connections']}, hammal RSS MiB first "
                    f"{rec['first_MiB']} max {rec['max_MiB']} last {rec['last_MiB']}"
                )
        if "crowd" in f:
            cr = f["crowd"]
            rd, pr = cr["readers"], cr["probe"]
            lines.append(
                f"{cr['count']:,} slow readers ({cr['rate_Bps'] / 1024:.0f} KiB/s each) of the"
                f" warm blob arriving at once: manifest by tag p50 {pr['p50_ms']} ms,"
                f" p99 {pr['p99_ms']} ms, max {pr['max_ms']} ms ({pr['requests']} GETs);"
                f" readers connected {rd['connected']} in {rd['connect_s']} s, held"
                f" {rd['held_open']}; hammal RSS max {cr['max_MiB']} MiB, kernel TCP"
                f" buffers (machine-wide) max {cr.get('max_kernel_tcp_MiB', 0.0)} MiB"
            )
        if "cluster" in f:
            lines += describe_cluster(f["cluster"])
        targets = self.targets()
        lines += ["", "targets (issue 12 first, then earlier ones):"]
        lines += ["  " + t.line() for t in targets]
        if self.problems:
            lines += ["", "problems seen (the figures above may be affected):"]
            lines += [f"  - {p}" for p in self.problems]
        revision = hammal_revision()
        lines.append(
            f"\nhammal revision {self.revision_at_start}"
            + (
                ""
                if revision == self.revision_at_start
                else f" at start, {revision} at the end: hammal changed during the run,"
                " the figures mix both versions"
            )
        )
        start_load = ", ".join(f"{x:.1f}" for x in self.loadavg_at_start)
        end_load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        lines.append(
            f"load average at start {start_load}, at end {end_load} ({os.cpu_count()} CPUs)"
        )
        lines.append(f"elapsed {elapsed:.0f}s; results in {RESULTS}")
        print("\n".join(lines), flush=True)
        return {
            "meta": {
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "mode": "quick" if self.quick else "full",
                "config": dataclasses.asdict(self.cfg),
                "blob": {"digest": self.blob, "size": self.blob_size},
                "versions": _versions(),
                "machine": {
                    "cpus": os.cpu_count(),
                    "cpu": machine.cpu_model(),
                    "cpu_flags": self.cpu_flags,
                    "sha256_MBps_one_core": self.sha256_MBps,
                    "nofile": list(self.nofile),
                    "python": platform.python_version(),
                    "kernel": platform.release(),
                },
                "hammal_argv": _redact(self.hammal.argv()[2:]),
                "loadavg_at_start": self.loadavg_at_start,
                "hammal_revision": self.revision_at_start,
                "hammal_revision_at_end": hammal_revision(),
                "loadavg_at_end": os.getloadavg(),
                "elapsed_s": round(elapsed, 1),
            },
            "figures": self.figures,
            "targets": [t.as_dict() for t in targets],
            "problems": self.problems,
        }

    def stop(self) -> None:
        for name in ("hammal", "peer", "nginx", "upstream"):
            obj = getattr(self, name, None)
            if obj is not None:
                try:
                    obj.stop()
                except Exception:  # noqa: BLE001 - best effort
                    traceback.print_exc()


def hammal_revision() -> str:
    """The commit of hammal/ measured, ``+dirty`` with uncommitted changes
    (read-only git commands)."""
    root = os.path.dirname(HERE)
    try:
        # the last commit that changed hammal itself (bench/ commits do not count)
        head = subprocess.run(
            ["git", "-C", root, "log", "-1", "--format=%h", "--", "hammal", "twisted"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--", "hammal", "twisted"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty.strip() else "")


def _redact(argv: Sequence[str]) -> List[str]:
    return ["***" if i and "password" in argv[i - 1] else a for i, a in enumerate(argv)]


def _versions() -> Dict[str, str]:
    """The programs measured and measuring."""
    out: Dict[str, str] = {}
    for name, argv in {
        "nginx": ["nginx", "-v"],
        "distribution": ["docker-registry", "--version"],
        "curl": ["curl", "--version"],
        "wrk": ["wrk", "-v"],
        "skopeo": ["skopeo", "--version"],
        "twisted": [sys.executable, "-c", "import twisted; print(twisted.__version__)"],
    }.items():
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            text = (proc.stdout + proc.stderr).strip().splitlines()
            out[name] = text[0][:120] if text else ""
        except (OSError, subprocess.SubprocessError):
            out[name] = "?"
    return out


SECTIONS: Dict[str, Callable[[Bench], None]] = {
    "throughput": Bench.throughput,
    "concurrent": Bench.concurrent,
    "manifests": Bench.manifests,
    "workers": Bench.workers,
    "skopeo": Bench.skopeo,
    "slow": Bench.slow_client,
    "many-slow": Bench.many_slow,
    "ttfb": Bench.ttfb,
    "crowd": Bench.crowd,
    "cluster": Bench.cluster,
}


def chosen_sections(quick: bool, only: Optional[Sequence[str]]) -> List[str]:
    """``--only`` as given; else the cold-blob rows for ``--quick``; else all."""
    if only:
        return list(only)
    return list(QUICK_SECTIONS) if quick else list(SECTIONS)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="hammal vs nginx vs Distribution, on loopback")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the cold-blob rows only (throughput, TTFB), 1 run, a 64 MiB blob",
    )
    parser.add_argument("--runs", type=int, help="repeat each figure this many times")
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(SECTIONS),
        help="run only this section (repeatable)",
    )
    parser.add_argument(
        "--output",
        default=None,
        help="where to write the JSON results (default bench/results.json)",
    )
    args = parser.parse_args(argv)
    global RESULTS
    if args.output:
        RESULTS = args.output
    sections = chosen_sections(args.quick, args.only)
    bench = Bench(args.quick, args.runs, sections)
    load1 = os.getloadavg()[0]
    if load1 > 1.0:
        log(
            f"WARNING: load average {load1:.1f} on {os.cpu_count()} CPUs before starting:"
            " other work on this machine will skew the figures"
        )
    t0 = time.monotonic()
    try:
        bench.setup()
        for name in sections:
            log(f"== {name}")
            try:
                SECTIONS[name](bench)
            except Exception as e:  # noqa: BLE001 - report, carry on
                traceback.print_exc()
                bench.problems.append(f"section {name} failed: {e!r}")
        result = bench.report(time.monotonic() - t0)
        with open(RESULTS, "w") as f:
            json.dump(result, f, indent=2, default=str)
    finally:
        bench.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
