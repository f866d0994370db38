"""Load generators and probes for the benchmark: curl, wrk, slow readers, RSS.

Every loop here is bounded in count and in time, and every child process is
waited for (or killed) before a function returns.
"""

from __future__ import annotations

import os
import re
import selectors
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence, Tuple

from bench.ttfb import request_bytes
from tests.integration.environment import _die_with_parent, clean_env

CURL_BIN = shutil.which("curl") or "/usr/bin/curl"
WRK_BIN = shutil.which("wrk") or "/usr/bin/wrk"

MiB = 1024 * 1024


# -- RSS ------------------------------------------------------------------------


def rss_kib(pid: int, field_name: str = "VmRSS") -> int:
    """``VmRSS`` (or ``VmHWM``) of *pid* in KiB; 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds used so far by *pids* (all their threads)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def total_rss_mib(pids: Sequence[int]) -> float:
    return sum(rss_kib(p) for p in pids) / 1024.0


class RSSSampler:
    """Samples the summed RSS of some processes every *interval* seconds."""

    def __init__(
        self, pids_fn: Callable[[], List[int]], interval: float = 0.05, max_seconds: float = 900
    ) -> None:
        self._pids_fn = pids_fn
        self.interval = interval
        self.max_seconds = max_seconds
        self.samples: List[Tuple[float, float]] = []  # (t, MiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")
        self._t0 = 0.0

    def _run(self) -> None:
        deadline = self._t0 + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            self.samples.append((time.monotonic() - self._t0, total_rss_mib(self._pids_fn())))
            self._stop.wait(self.interval)

    def __enter__(self) -> "RSSSampler":
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.samples.append((time.monotonic() - self._t0, total_rss_mib(self._pids_fn())))

    @property
    def peak(self) -> float:
        return max((m for _, m in self.samples), default=0.0)


# -- curl ---------------------------------------------------------------------------


@dataclass
class CurlResult:
    code: int
    size: int
    speed: float  # bytes/s
    seconds: float
    error: str = ""


def _curl_argv(url: str, headers: Sequence[Tuple[str, str]], max_time: float) -> List[str]:
    argv = [
        CURL_BIN,
        "-s",
        "-S",
        "--noproxy",
        "*",
        "-o",
        "/dev/null",
        "--max-time",
        str(int(max_time)),
        "-w",
        "%{http_code} %{size_download} %{speed_download} %{time_total}",
    ]
    for k, v in headers:
        argv += ["-H", f"{k}: {v}"]
    argv.append(url)
    return argv


def _parse_curl(proc_out: str, err: str) -> CurlResult:
    parts = proc_out.split()
    try:
        return CurlResult(
            int(parts[0]), int(parts[1]), float(parts[2]), float(parts[3]), err.strip()[:300]
        )
    except (IndexError, ValueError):
        return CurlResult(0, 0, 0.0, 0.0, (proc_out + err).strip()[:300] or "no output")


def curl_get(
    url: str, headers: Sequence[Tuple[str, str]] = (), max_time: float = 300
) -> CurlResult:
    """One GET to /dev/null: status, bytes, average bytes/s, seconds."""
    proc = subprocess.run(
        _curl_argv(url, headers, max_time),
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=max_time + 30,
        preexec_fn=_die_with_parent,
    )
    return _parse_curl(proc.stdout, proc.stderr)


def curl_many(
    url: str, count: int, headers: Sequence[Tuple[str, str]] = (), max_time: float = 300
) -> Tuple[float, List[CurlResult]]:
    """*count* concurrent GETs (one curl process each): (wall seconds, results)."""
    argv = _curl_argv(url, headers, max_time)
    t0 = time.monotonic()
    procs = [
        subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(),
            preexec_fn=_die_with_parent,
        )
        for _ in range(count)
    ]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, max_time + 30 - (time.monotonic() - t0)))
            results.append(_parse_curl(out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    return time.monotonic() - t0, results


# -- wrk ---------------------------------------------------------------------------


@dataclass
class WrkResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: str
    raw: str = field(repr=False, default="")


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)$", text.strip())
    if not m:
        return float("nan")
    value, unit = float(m.group(1)), m.group(2)
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def wrk(
    url: str,
    headers: Sequence[Tuple[str, str]],
    connections: int = 50,
    seconds: int = 10,
    threads: int = 2,
) -> WrkResult:
    """``wrk --latency -cN -dS``; a non-2xx answer is counted, not hidden."""
    argv = [
        WRK_BIN,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        "--timeout",
        "5s",
    ]
    for k, v in headers:
        argv += ["-H", f"{k}: {v}"]
    argv.append(url)
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=seconds + 60,
        preexec_fn=_die_with_parent,
    )
    out = proc.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    total = re.search(r"(\d+) requests in", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:(.*)", out)
    return WrkResult(
        float(rps.group(1)) if rps else 0.0,
        _ms(p50.group(1)) if p50 else float("nan"),
        _ms(p99.group(1)) if p99 else float("nan"),
        int(total.group(1)) if total else 0,
        int(non2xx.group(1)) if non2xx else 0,
        errors.group(1).strip() if errors else "",
        out + proc.stderr,
    )


# -- slow readers ----------------------------------------------------------------


def _slow_socket(port: int, rcvbuf: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # before connect, so the window never grows past it
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    return s


def slow_reader(
    port: int,
    path: str,
    headers: Sequence[Tuple[str, str]],
    rate: float,
    seconds: float,
    on_tick: Callable[[int], None],
    rcvbuf: int = 64 * 1024,
) -> Dict[str, object]:
    """Read *path* at *rate* bytes/s for *seconds*, calling ``on_tick(i)`` once
    a second (for RSS sampling); then close. Returns what was read."""
    s = _slow_socket(port, rcvbuf)
    try:
        s.sendall(request_bytes(path, f"127.0.0.1:{port}", headers, close=False))
        head = b""
        got = 0
        t0 = time.monotonic()
        next_tick = 0
        chunk = max(1024, int(rate / 16))
        status = b""
        while time.monotonic() - t0 < seconds:
            elapsed = time.monotonic() - t0
            while next_tick <= elapsed and next_tick <= seconds:
                on_tick(next_tick)
                next_tick += 1
            budget = int(rate * elapsed) - got
            if budget <= 0:
                time.sleep(min(0.05, (got + chunk) / rate - elapsed) if rate else 0.05)
                continue
            try:
                data = s.recv(min(budget, chunk))
            except socket.timeout:
                continue
            if not data:
                break
            if not status:
                head += data
                if b"\r\n\r\n" in head:
                    status = head.split(b"\r\n", 1)[0]
                    got += len(head.split(b"\r\n\r\n", 1)[1])
                continue
            got += len(data)
        while next_tick <= seconds:
            on_tick(next_tick)
            next_tick += 1
        return {
            "status": status.decode("latin-1"),
            "bytes": got,
            "seconds": round(time.monotonic() - t0, 1),
        }
    finally:
        s.close()


@dataclass
class _Reader:
    head: bytes = b""
    status: bytes = b""
    bytes: int = 0
    closed: bool = False


def many_slow_readers(
    port: int,
    path: str,
    headers: Sequence[Tuple[str, str]],
    count: int,
    seconds: float,
    on_tick: Callable[[int], None],
    per_client_rate: float = 8192,
    rcvbuf: int = 4096,
) -> Dict[str, object]:
    """*count* connections, each reading *path* at *per_client_rate* bytes/s,
    held for *seconds* (``on_tick(i)`` once a second), then all closed.

    One thread, ``selectors``: connects in batches, sends every request,
    then reads a little from each socket per tick.
    """
    sel = selectors.DefaultSelector()
    socks: List[socket.socket] = []
    state: Dict[int, _Reader] = {}
    connect_errors = 0
    request = request_bytes(path, f"127.0.0.1:{port}", headers, close=False)
    try:
        deadline = time.monotonic() + 60
        for _ in range(count):
            if time.monotonic() > deadline:
                break
            try:
                s = _slow_socket(port, rcvbuf)
                s.sendall(request)
                s.setblocking(False)
            except OSError:
                connect_errors += 1
                continue
            socks.append(s)
            state[s.fileno()] = _Reader()
        for s in socks:
            sel.register(s, selectors.EVENT_READ)
        t0 = time.monotonic()
        tick = 0
        step = 0.25
        quantum = max(1, int(per_client_rate * step))
        while True:
            elapsed = time.monotonic() - t0
            while tick <= elapsed and tick <= seconds:
                on_tick(tick)
                tick += 1
            if elapsed >= seconds:
                break
            round_end = time.monotonic() + step
            for key, _ in sel.select(timeout=0):
                s = key.fileobj  # type: ignore[assignment]
                st = state[s.fileno()]
                if st.closed:
                    continue
                try:
                    data = s.recv(quantum)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    st.closed = True
                    sel.unregister(s)
                    continue
                if not st.status:
                    st.head += data
                    if b"\r\n\r\n" in st.head:
                        st.status = st.head.split(b"\r\n", 1)[0]
                        st.bytes = len(st.head.split(b"\r\n\r\n", 1)[1])
                else:
                    st.bytes += len(data)
            time.sleep(max(0.0, round_end - time.monotonic()))
        statuses: Dict[str, int] = {}
        for st in state.values():
            parts = st.status.split(b" ")
            code = parts[1].decode() if len(parts) > 1 else "none"
            statuses[code] = statuses.get(code, 0) + 1
        held = sum(1 for st in state.values() if st.status and not st.closed)
        return {
            "connections": len(socks),
            "connect_errors": connect_errors,
            "statuses": statuses,
            "held_open": held,
            "bytes_total": sum(st.bytes for st in state.values()),
        }
    finally:
        sel.close()
        for s in socks:
            s.close()
