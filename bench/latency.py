"""A paced latency probe: GETs at a fixed rate, each timed from when it was
*due*, not from when it could be sent.

wrk's closed loop hides stalls (one 2 s stall is one slow sample among
thousands, because wrk sends nothing meanwhile); here every request that
falls due during a stall waits for it and is counted, so p99 and max
show what a client arriving at that moment would see.

Run as its own process so the harness's other work (thousands of slow
readers in one Python loop) cannot delay it::

    python -m bench.latency --port P --path /v2/x/manifests/1 \\
        --rate 100 --seconds 20 --header "Accept: ..."

It prints ``started`` when its clock starts, then one JSON object (see
L{LatencyResult}) when it is done.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import math
import select
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple


@dataclasses.dataclass
class LatencyResult:
    """Latencies in milliseconds of the requests that fell due."""

    requests: int
    errors: int
    statuses: Dict[str, int]
    p50_ms: float
    p99_ms: float
    max_ms: float
    error: str = ""
    #: the slowest request of each second of the run (by due time)
    max_ms_by_second: List[float] = dataclasses.field(default_factory=list)


def percentile(values: Sequence[float], p: float) -> float:
    """The nearest-rank C{p}th percentile (NaN for no values)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def paced_gets(
    port: int,
    path: str,
    headers: Sequence[Tuple[str, str]] = (),
    rate: float = 100,
    seconds: float = 10,
    host: str = "127.0.0.1",
    timeout: float = 5,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    on_start: Optional[Callable[[], None]] = None,
) -> LatencyResult:
    """
    GET C{path} every C{1/rate} seconds for C{seconds} on one keep-alive
    connection (a new one after an error). A request's latency runs from
    its due time to the end of its response body, so a request held up by
    an earlier slow one counts the wait. A status other than 200, a
    timeout (C{timeout} seconds) or a broken connection is an error; its
    latency is the time it took.
    """
    interval = 1.0 / rate
    latencies: List[float] = []
    by_second: List[float] = []
    statuses: Dict[str, int] = {}
    errors = 0
    last_error = ""
    conn: Optional[http.client.HTTPConnection] = None
    t0 = clock()
    if on_start is not None:
        on_start()
    sent = 0
    try:
        while sent / rate < seconds:
            due = t0 + sent * interval
            now = clock()
            if now < due:
                sleep(due - now)
            if conn is None:
                conn = http.client.HTTPConnection(host, port, timeout=timeout)
            try:
                conn.request("GET", path, headers=dict(headers))
                response = conn.getresponse()
                response.read()
                status = str(response.status)
                if response.status != 200:
                    errors += 1
                    last_error = f"HTTP {status}"
            except (OSError, http.client.HTTPException) as problem:
                status = "error"
                errors += 1
                last_error = f"{type(problem).__name__}: {problem}"
                conn.close()
                conn = None
            statuses[status] = statuses.get(status, 0) + 1
            latency = (clock() - due) * 1000.0
            latencies.append(latency)
            second = int(sent * interval)
            while len(by_second) <= second:
                by_second.append(0.0)
            by_second[second] = max(by_second[second], round(latency, 1))
            sent += 1
    finally:
        if conn is not None:
            conn.close()
    return LatencyResult(
        requests=len(latencies),
        errors=errors,
        statuses=statuses,
        p50_ms=round(percentile(latencies, 50), 2),
        p99_ms=round(percentile(latencies, 99), 2),
        max_ms=round(max(latencies, default=math.nan), 2),
        error=last_error,
        max_ms_by_second=by_second,
    )


class ProbeProcess:
    """L{paced_gets} in a child process: start it, then L{result}."""

    def __init__(
        self,
        port: int,
        path: str,
        headers: Sequence[Tuple[str, str]],
        rate: float,
        seconds: float,
        env: Optional[Dict[str, str]] = None,
    ) -> None:
        argv = [
            sys.executable,
            "-m",
            "bench.latency",
            "--port",
            str(port),
            "--path",
            path,
            "--rate",
            str(rate),
            "--seconds",
            str(seconds),
        ]
        for k, v in headers:
            argv += ["--header", f"{k}: {v}"]
        self.seconds = seconds
        self._proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )

    def wait_started(self, timeout: float = 30) -> bool:
        """Block until the probe's clock started (at most C{timeout} s)."""
        assert self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
        return bool(ready) and self._proc.stdout.readline().strip() == "started"

    def result(self, grace: float = 60) -> LatencyResult:
        """Wait (at most the run plus C{grace} seconds) and parse its answer."""
        try:
            out, err = self._proc.communicate(timeout=self.seconds + grace)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.communicate(timeout=10)
            return LatencyResult(0, 0, {}, math.nan, math.nan, math.nan, "probe timed out")
        try:
            return LatencyResult(**json.loads(out))
        except (ValueError, TypeError):
            return LatencyResult(
                0,
                0,
                {},
                math.nan,
                math.nan,
                math.nan,
                f"probe failed: {(out + err).strip()[-300:]}",
            )

    def kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(10)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="GETs at a fixed rate, latency from due time")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--header", action="append", default=[], help="NAME: VALUE")
    args = parser.parse_args(argv)
    headers = []
    for text in args.header:
        name, _, value = text.partition(":")
        headers.append((name.strip(), value.strip()))
    result = paced_gets(
        args.port,
        args.path,
        headers,
        args.rate,
        args.seconds,
        args.host,
        on_start=lambda: print("started", flush=True),
    )
    print(json.dumps(dataclasses.asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
