"""Cold blob throughput when the CDN speaks TLS, as Docker Hub's does.

The stack of ``bench.run`` (token server, token-auth Distribution with
the ``redirect`` middleware, nginx as the CDN) plus a second nginx CDN
over the same storage with ``listen ... ssl`` (the bench PKI's leaf for
127.0.0.1, TLS 1.3) and a second Distribution redirecting blob GETs to
it. Measured against that upstream, alternated in each run, every one
cold (fresh cache) and read by curl from the proxy over plain HTTP:

* ``hammal``: the blob body decrypted on a pump thread;
* ``hammal event loop``: the same hammal with the TLS pump switched off
  (``tls_body_connection`` answers nothing, through a ``sitecustomize``
  of this process alone): the body decrypted on the event loop, as before;
* ``distribution``: Distribution's pull-through cache (trusting the bench
  CA through ``SSL_CERT_FILE``).

The rows of ``bench.run`` keep their plain-HTTP CDN; this is a script of
its own. Run it under the shared lock::

    flock /work/wt/bench.lock env PYTHONPATH=. .venv/bin/python -m bench.tls_cdn
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence

from bench import stack
from bench.clients import cpu_seconds, curl_get
from bench.stack import (
    BenchUpstream,
    DistributionPeer,
    HammalBench,
    Nginx,
    bench_workdir,
    build_image,
    start_registry,
)
from tests.integration.environment import (
    REGISTRY_SERVICE,
    TOKEN_ISSUER,
    free_port,
    http_request,
    wait_until,
)

#: What the ``hammal event loop`` process imports first: no TLS pump.
_NO_TLS_PUMP = """\
import hammal.cache.fetch as _fetch

_fetch.tls_body_connection = lambda transport: None
"""


def log(message: str) -> None:
    print(f"[tls-cdn {time.strftime('%H:%M:%S')}] {message}", flush=True)


class TLSUpstream:
    """A token-auth Distribution that redirects blob GETs to a CDN over TLS."""

    def __init__(self, workdir: str, base: BenchUpstream) -> None:
        self.workdir = workdir
        self.base = base
        self.cdn_port = free_port()
        self.registry_port = free_port()
        pki = base.pki
        if pki is None:
            raise RuntimeError("the base upstream is not started")
        self.ca_cert = pki.ca_cert
        self.cdn = Nginx(
            "cdn-tls",
            workdir,
            "  sendfile on; tcp_nopush on;\n"
            "  server {\n"
            f"    listen 127.0.0.1:{self.cdn_port} ssl backlog=4096;\n"
            f"    ssl_certificate {pki.tls_chain};\n"
            f"    ssl_certificate_key {pki.tls_key};\n"
            "    ssl_protocols TLSv1.2 TLSv1.3;\n"
            f"    root {base.storage_root};\n"
            "    types { } default_type application/octet-stream;\n"
            "    autoindex off;\n"
            "    location / { }\n"
            "  }",
            workers="2",
        )
        self.registry = None

    @property
    def registry_url(self) -> str:
        return f"http://127.0.0.1:{self.registry_port}"

    def start(self) -> "TLSUpstream":
        pki = self.base.pki
        assert pki is not None
        self.cdn.start(self.cdn_port)
        self.registry = start_registry(
            "registry-tls",
            self.workdir,
            self.registry_port,
            self.base.storage_root,
            auth={
                "realm": self.base.realm,
                "service": REGISTRY_SERVICE,
                "issuer": TOKEN_ISSUER,
                "rootcertbundle": pki.ca_cert,
            },
            redirect_baseurl=f"https://127.0.0.1:{self.cdn_port}/",
        )
        wait_until(
            lambda: http_request("GET", self.registry_url + "/v2/", timeout=2).status == 401,
            "TLS-redirecting registry /v2/ -> 401",
            process=self.registry,
        )
        return self

    def stop(self) -> None:
        if self.registry is not None:
            self.registry.stop()
        self.cdn.stop()


class EventLoopHammal(HammalBench):
    """hammal with its TLS pump switched off (this process only)."""

    name = "hammal event loop"

    def __init__(self, workdir: str, upstream: object, extra_args: Sequence[str]) -> None:
        super().__init__(workdir, upstream, buffer_size="1M", extra_args=extra_args)  # type: ignore[arg-type]
        self.site_dir = os.path.join(workdir, "no-tls-pump")
        os.makedirs(self.site_dir, exist_ok=True)
        with open(os.path.join(self.site_dir, "sitecustomize.py"), "w") as out:
            out.write(_NO_TLS_PUMP)

    def restart_fresh(self) -> "HammalBench":
        saved = stack.REPO_ROOT
        stack.REPO_ROOT = self.site_dir + os.pathsep + saved
        try:
            return super().restart_fresh()
        finally:
            stack.REPO_ROOT = saved


class TrustingPeer(DistributionPeer):
    """Distribution's pull-through cache, trusting the bench CA (Go reads SSL_CERT_FILE)."""

    def __init__(self, workdir: str, upstream: object, ca_cert: str) -> None:
        super().__init__(workdir, upstream)  # type: ignore[arg-type]
        self.ca_cert = ca_cert

    def restart_fresh(self) -> "DistributionPeer":
        saved = os.environ.get("SSL_CERT_FILE")
        os.environ["SSL_CERT_FILE"] = self.ca_cert
        try:
            return super().restart_fresh()
        finally:
            if saved is None:
                del os.environ["SSL_CERT_FILE"]
            else:
                os.environ["SSL_CERT_FILE"] = saved


def thread_cpu(pids: Sequence[int]) -> Dict[str, float]:
    """CPU seconds so far of every thread of *pids* (the main thread: "event loop")."""
    ticks = os.sysconf("SC_CLK_TCK")
    seconds: Dict[str, float] = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            name = "event loop" if tid == str(pid) else f"thread {tid}"
            seconds[name] = (int(fields[11]) + int(fields[12])) / ticks
    return seconds


def busiest(before: Dict[str, float], after: Dict[str, float], gib: float) -> str:
    """The threads that worked during a GET, CPU seconds per GiB, busiest first."""
    used = {name: (after[name] - before.get(name, 0.0)) / gib for name in after}
    ranked = sorted(((v, k) for k, v in used.items() if v >= 0.05), reverse=True)
    return ", ".join(f"{name} {value:.2f}" for value, name in ranked)


class Responsiveness:
    """
    ``GET /v2/`` on the proxy every 10 ms from a thread while a pull runs:
    how long the event loop keeps a small request waiting.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.latencies: List[float] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Responsiveness":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(60)

    def _run(self) -> None:
        while not self._done.is_set():
            started = time.perf_counter()
            http_request("GET", self.url, timeout=30)
            self.latencies.append(time.perf_counter() - started)
            self._done.wait(0.01)

    def summary(self) -> str:
        ordered = sorted(self.latencies) or [0.0]
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        return (
            f"GET /v2/ during the pull: {len(ordered)} requests, median"
            f" {ordered[len(ordered) // 2] * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms,"
            f" max {ordered[-1] * 1000:.1f} ms"
        )


def median(values: List[float]) -> Optional[float]:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256, help="the blob's size (MiB)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-peer", action="store_true", help="leave Distribution out")
    parser.add_argument(
        "--no-hold-tail", action="store_true", help="both hammals with --no-hold-tail"
    )
    parser.add_argument(
        "--threads", action="store_true", help="CPU seconds per GiB of each thread of the proxy"
    )
    args = parser.parse_args(argv)
    workdir = bench_workdir()
    big = build_image(
        os.path.join(workdir, "images"), "bench/big", "1", [args.size_mib << 20], seed=11
    )
    blob, size = big.largest_layer
    base = BenchUpstream(workdir).start([big])
    upstream = TLSUpstream(workdir, base).start()
    ca = ["--upstream-ca", upstream.ca_cert] + (["--no-hold-tail"] if args.no_hold_tail else [])
    proxies: List[HammalBench | DistributionPeer] = [
        HammalBench(workdir, upstream, buffer_size="1M", extra_args=ca),  # type: ignore[arg-type]
        EventLoopHammal(workdir, upstream, ca),
    ]
    if not args.no_peer:
        proxies.append(TrustingPeer(workdir, upstream, upstream.ca_cert))
    speeds: Dict[str, List[float]] = {proxy.name: [] for proxy in proxies}
    cpu: Dict[str, List[float]] = {proxy.name: [] for proxy in proxies}
    gib = size / (1 << 30)
    log(f"blob {blob}, {size} bytes; TLS CDN on port {upstream.cdn_port}")
    try:
        for run in range(args.runs):
            for proxy in proxies:
                proxy.restart_fresh()
                url = f"{proxy.url}/v2/{big.repo}/blobs/{blob}"
                before = cpu_seconds(proxy.pids())
                threads = thread_cpu(proxy.pids())
                with Responsiveness(proxy.url + "/v2/") as probe:
                    result = curl_get(url)
                used = cpu_seconds(proxy.pids()) - before
                log(f"{proxy.name}: {probe.summary()}")
                if args.threads:
                    after = thread_cpu(proxy.pids())
                    log(f"{proxy.name} per thread: {busiest(threads, after, gib)}")
                proxy.stop()
                if result.code != 200 or result.size != size:
                    log(f"{proxy.name}: HTTP {result.code}, {result.size} bytes {result.error}")
                    return 1
                speeds[proxy.name].append(result.speed / 1e6)
                cpu[proxy.name].append(used / gib)
                log(
                    f"run {run + 1}: {proxy.name} cold {result.speed / 1e6:.0f} MB/s,"
                    f" {used / gib:.2f} CPU s/GiB"
                )
    finally:
        for proxy in proxies:
            proxy.stop()
        upstream.stop()
        base.stop()
    reference = median(speeds["hammal event loop"]) or 1.0
    for name, values in speeds.items():
        best = median(values) or 0.0
        log(
            f"{name}: median {best:.0f} MB/s ({best / reference:.2f}x the event loop's),"
            f" runs {[round(v) for v in values]}, CPU s/GiB {median(cpu[name]):.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
