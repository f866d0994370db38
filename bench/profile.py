"""Profile hammal under one of the benchmark's loads with py-spy.

    .venv/bin/pip install -r requirements-dev.txt     # py-spy
    PYTHONPATH=. .venv/bin/python -m bench.profile cold [--svg] [--strace] [--out DIR]

Scenarios: ``cold`` (four 128 MiB layers pulled cold, one after another),
``warm`` (the same, from the cache), ``concurrent`` (50 concurrent cold
pulls of one layer), ``manifests`` (``wrk -c50`` on a manifest by tag),
``crowd`` (3,000 readers of a warm layer at 64 KiB/s arriving at once for
10 s, as in ``bench.run``'s crowd row), ``first-byte`` (100 cold 64 KiB
layers, one after another, each timed to its first body byte: the path
before the first byte, repeated until the profiler sees it).

py-spy samples hammal while the load runs and writes collapsed stacks
(``DIR/SCENARIO.txt``; with ``--svg`` a flame graph ``DIR/SCENARIO.svg`` from
a second run). The summary printed is the share of samples per function:
*self* (the function itself was running) and *total* (it was on the stack).
``--strace``: one more run under ``strace -c -f`` (``DIR/SCENARIO.strace``),
the system calls every thread of hammal made, by count and time.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Callable, Dict, List, Tuple

from bench.clients import MiB, curl_get, curl_many, wrk
from bench.crowd import slow_crowd
from bench.machine import raise_nofile
from bench.stack import ACCEPT_ALL, BenchUpstream, HammalBench, bench_workdir, build_image
from bench.ttfb import first_body_byte
from tests.integration.environment import clean_env

PY_SPY = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
STRACE = shutil.which("strace") or "/usr/bin/strace"


def summarize(collapsed: str, top: int = 25) -> str:
    """Where the reactor thread spends its busy time, from py-spy's raw output.

    Only stacks of the reactor thread (those through ``mainLoop``) count;
    samples idle in ``epoll`` are counted apart. *self*: the function was
    running; *total*: it was on the stack. Other threads (the thread pool
    hashing or syncing) are summarized by their leaf functions.
    """
    self_counts: collections.Counter[str] = collections.Counter()
    total_counts: collections.Counter[str] = collections.Counter()
    own_counts: collections.Counter[str] = collections.Counter()
    other: collections.Counter[str] = collections.Counter()
    busy = idle = other_samples = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        leaf = _short(frames[-1])
        if not any("mainLoop" in f for f in frames):
            other_samples += count
            other[leaf] += count
            continue
        # waiting in epoll: Twisted's doPoll, or hammal's bounded poller's poll
        if leaf.split(" ")[0].rsplit(".", 1)[-1] in ("doPoll", "poll"):
            idle += count
            continue
        busy += count
        self_counts[leaf] += count
        for name in {_short(f) for f in frames}:
            total_counts[name] += count
        for name in {_short(f) for f in frames if "hammal/" in f and "twisted/" not in f}:
            own_counts[name] += count
    if not busy:
        return "no busy samples of the reactor thread"
    lines = [
        f"reactor thread: {busy} busy samples, {idle} idle in epoll "
        f"({100 * busy / max(1, busy + idle):.0f}% busy)",
        f"{'self%':>6} {'total%':>7}  function (share of the reactor thread's busy time)",
    ]
    for name, count in self_counts.most_common(top):
        lines.append(f"{100 * count / busy:6.1f} {100 * total_counts[name] / busy:7.1f}  {name}")
    lines += ["", "by total, hammal's own frames:"]
    for name, count in own_counts.most_common(top):
        lines.append(f"{100 * count / busy:7.1f}  {name}")
    if other_samples:
        lines += ["", f"other threads ({other_samples} samples, leaf functions):"]
        for name, count in other.most_common(8):
            lines.append(f"{100 * count / other_samples:7.1f}  {name}")
    return "\n".join(lines)


def _short(frame: str) -> str:
    # "function (path/to/file.py:123)" -> "function (file.py:123)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path, _, line = where.rpartition(":")
    parts = path.split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f"{name} ({short})"


def record(pid: int, out: str, fmt: str, load: Callable[[], None], gil: bool = False) -> None:
    """Run py-spy (or strace, for C{fmt} "strace") on *pid* while *load*
    runs; stop it with SIGINT after."""
    if fmt == "strace":
        argv = [STRACE, "-c", "-f", "-p", str(pid), "-o", out]
    else:
        argv = [
            PY_SPY,
            "record",
            "--pid",
            str(pid),
            "--rate",
            "200",
            "--format",
            fmt,
            "--output",
            out,
            "--idle",
            "--threads",
        ] + (["--gil"] if gil else [])
    spy = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=clean_env())
    try:
        time.sleep(1.0)  # py-spy attaches
        load()
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait(10)


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "scenario", choices=["cold", "warm", "concurrent", "manifests", "crowd", "first-byte"]
    )
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "profiles"))
    parser.add_argument("--svg", action="store_true", help="also record a flame graph")
    parser.add_argument(
        "--strace", action="store_true", help="also count hammal's system calls (strace -c -f)"
    )
    parser.add_argument(
        "--gil",
        action="store_true",
        help="sample only the thread holding the GIL (py-spy --gil): time a"
        " thread spends waiting to get the GIL back drops out",
    )
    parser.add_argument("--buffer-size", default="1M")
    parser.add_argument(
        "--no-hold-tail", action="store_true", help="profile hammal started with --no-hold-tail"
    )
    args = parser.parse_args(argv)
    if not os.access(PY_SPY, os.X_OK):
        print("py-spy is not installed: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    raise_nofile(10_000)  # the crowd, here and in hammal
    workdir = bench_workdir()
    images_dir = os.path.join(workdir, "images")
    image = build_image(images_dir, "bench/prof", "1", [128 * MiB] * 4, seed=21)
    images = [image]
    if args.scenario == "first-byte":
        small = build_image(images_dir, "bench/small", "1", [64 * 1024] * 100, seed=22)
        images.append(small)
    upstream = BenchUpstream(workdir).start(images)
    hammal = HammalBench(
        workdir,
        upstream,
        buffer_size=args.buffer_size,
        extra_args=["--no-hold-tail"] if args.no_hold_tail else [],
    )
    layers = image.layers

    def url(digest: str) -> str:
        return f"{hammal.url}/v2/{image.repo}/blobs/{digest}"

    def cold() -> None:
        for d in layers:
            r = curl_get(url(d))
            print(f"  {d[:19]}: HTTP {r.code}, {r.speed / 1e6:.0f} MB/s", flush=True)

    loads: Dict[str, Tuple[Callable[[], None], Callable[[], None]]] = {
        "cold": (lambda: None, cold),
        "warm": (cold, cold),
        "concurrent": (
            lambda: None,
            lambda: print(f"  50 concurrent: {curl_many(url(layers[0]), 50)[0]:.1f}s", flush=True),
        ),
        "manifests": (
            lambda: (
                None
                if curl_get(f"{hammal.url}/v2/{image.repo}/manifests/1", [("Accept", ACCEPT_ALL)])
                else None
            ),
            lambda: print(
                "  "
                + str(
                    wrk(
                        f"{hammal.url}/v2/{image.repo}/manifests/1",
                        [("Accept", ACCEPT_ALL)],
                        50,
                        10,
                    )
                )[:160],
                flush=True,
            ),
        ),
    }

    def crowd() -> None:
        path = url(layers[0])[len(hammal.url) :]
        print(f"  {slow_crowd(hammal.port, path, [], 3000, 64 * 1024, 10)}", flush=True)

    loads["crowd"] = (lambda: None if curl_get(url(layers[0])) else None, crowd)

    def first_bytes() -> None:
        times = []
        for d in small.layers:
            r = first_body_byte(hammal.port, f"/v2/{small.repo}/blobs/{d}", timeout=30)
            if r.status != 200 or r.error:
                print(f"  {d[:19]}: HTTP {r.status} {r.error}", flush=True)
            times.append(r.ttfb_s * 1000)
        ordered = sorted(times)
        print(
            f"  {len(times)} cold first bytes: first {times[0]:.1f} ms, median"
            f" {ordered[len(ordered) // 2]:.1f} ms, max {ordered[-1]:.1f} ms",
            flush=True,
        )

    loads["first-byte"] = (lambda: None, first_bytes)
    prepare, load = loads[args.scenario]
    try:
        runs = [("raw", os.path.join(args.out, f"{args.scenario}.txt"))]
        if args.svg:
            runs.append(("flamegraph", os.path.join(args.out, f"{args.scenario}.svg")))
        if args.strace:
            runs.append(("strace", os.path.join(args.out, f"{args.scenario}.strace")))
        for fmt, out in runs:
            hammal.restart_fresh()
            prepare()
            print(f"recording {args.scenario} ({fmt}) -> {out}", flush=True)
            record(hammal.pids()[0], out, fmt, load, args.gil)
        with open(runs[0][1]) as f:
            print(summarize(f.read()))
        if args.strace:
            with open(runs[-1][1]) as f:
                print("\nsystem calls (strace -c -f, every thread):\n" + f.read())
    finally:
        hammal.stop()
        upstream.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
