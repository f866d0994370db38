"""
Tests for the benchmark's own tools (``bench/``): the machine probe, the
time-to-first-byte client, the paced latency probe and the crowd of slow
readers (over real TCP against Twisted listeners on 127.0.0.1), the
PASS/MISS verdicts and what ``--quick`` runs.
"""

from __future__ import annotations

import hashlib
import math
import os
import resource
import socket
import threading
from typing import Any, Dict, List

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import resource as web_resource
from twisted.web.server import NOT_DONE_YET, Site
from twisted.web.static import Data

from bench import machine
from bench.crowd import slow_crowd
from bench.hashing import hashed_get
from bench.latency import ProbeProcess, paced_gets, percentile
from bench.run import QUICK_SECTIONS, SECTIONS, chosen_sections
from bench.ttfb import first_body_byte
from bench.verdicts import NO_HOLD_TAIL, judge

X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Some CPU @ 2.00GHz
flags\t\t: fpu vme sse sse2 avx avx2 sha_ni aes
processor\t: 1
flags\t\t: fpu
"""

OLD_X86_CPUINFO = "model name\t: Old CPU\nflags\t\t: fpu sse2 avx\n"
ARM_CPUINFO = "processor\t: 0\nFeatures\t: fp asimd aes pmull sha1 sha2 crc32\n"


class FakeTime:
    """A clock that moves only when told: C{sleep} and C{advance}."""

    def __init__(self) -> None:
        self.now = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds

    sleep = advance


class MachineTests(SynchronousTestCase):
    def test_flags_of_the_first_cpu(self) -> None:
        flags = machine.cpu_flags(X86_CPUINFO)
        self.assertEqual(flags, {"sha_ni": True, "avx2": True, "sha2": False})
        self.assertTrue(machine.has_sha_extensions(flags))
        self.assertEqual(machine.describe_flags(flags), "sha_ni yes, avx2 yes")

    def test_no_sha_extensions(self) -> None:
        flags = machine.cpu_flags(OLD_X86_CPUINFO)
        self.assertFalse(machine.has_sha_extensions(flags))
        self.assertEqual(machine.describe_flags(flags), "sha_ni no, avx2 no")

    def test_arm_features(self) -> None:
        flags = machine.cpu_flags(ARM_CPUINFO)
        self.assertTrue(machine.has_sha_extensions(flags))
        self.assertEqual(machine.describe_flags(flags), "sha_ni no, avx2 no, sha2 yes")

    def test_no_cpuinfo(self) -> None:
        self.assertEqual(machine.cpu_flags(""), {"sha_ni": False, "avx2": False, "sha2": False})

    def test_cpu_model(self) -> None:
        self.assertEqual(machine.cpu_model(X86_CPUINFO), "Some CPU @ 2.00GHz")

    def test_sha256_rate_over_1MiB_chunks(self) -> None:
        """Chunks hashed per (clock) second, in 10^6 bytes/s; bounded by time."""
        ticks = iter(i * 0.25 for i in range(100))
        # t0 = 0; after each chunk the clock reads 0.25, 0.5: two chunks in 0.5 s,
        # then one more reading for the elapsed time (0.75 s)
        rate = machine.sha256_speed(seconds=0.5, clock=lambda: next(ticks))
        self.assertEqual(rate, round(2 * (1 << 20) / 0.75 / 1e6, 1))

    def test_sha256_rate_bounded_by_count(self) -> None:
        ticks = iter(i * 1e-6 for i in range(100))
        rate = machine.sha256_speed(seconds=10, max_chunks=3, clock=lambda: next(ticks))
        self.assertEqual(rate, round(3 * (1 << 20) / 4e-6 / 1e6, 1))

    def test_kernel_tcp_memory(self) -> None:
        sockstat = (
            "sockets: used 120\nTCP: inuse 5 orphan 0 tw 2 alloc 9 mem 512\nUDP: inuse 1 mem 3\n"
        )
        page = os.sysconf("SC_PAGE_SIZE")
        self.assertEqual(machine.tcp_kernel_mib(sockstat), round(512 * page / (1 << 20), 1))
        self.assertEqual(machine.tcp_kernel_mib("TCP: inuse 5\n"), 0.0)

    def test_raise_nofile(self) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        low = 256 if hard == resource.RLIM_INFINITY else min(256, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
        wanted = 1024 if hard == resource.RLIM_INFINITY else min(1024, hard)
        now = machine.raise_nofile(wanted)
        self.assertEqual(resource.getrlimit(resource.RLIMIT_NOFILE), now)
        self.assertGreaterEqual(now[0], wanted)


class _HeldBody(web_resource.Resource):
    """Headers at once; the body only when C{release} is called."""

    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body
        self.requests: List[Any] = []

    def render_GET(self, request: Any) -> Any:
        request.setHeader(b"content-length", b"%d" % len(self.body))
        request.write(b"")  # the headers go out now
        self.requests.append(request)
        return NOT_DONE_YET

    def release(self) -> None:
        for request in self.requests:
            request.write(self.body)
            request.finish()


class _Counter:
    """A clock that ticks by one at every reading (thread-safe)."""

    def __init__(self) -> None:
        self._n = 0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            self._n += 1
            return float(self._n)


def _listen(test: TestCase, root: web_resource.Resource) -> int:
    listener: Any = reactor
    port = listener.listenTCP(0, Site(root), interface="127.0.0.1")
    test.addCleanup(port.stopListening)
    return int(port.getHost().port)


class _Short(web_resource.Resource):
    """Announces 1000 bytes, sends 3 and closes."""

    isLeaf = True

    def render_GET(self, request: Any) -> Any:
        request.setHeader(b"content-length", b"1000")
        request.write(b"abc")
        request.loseConnection()
        return NOT_DONE_YET


def _unused_port() -> int:
    """A port on 127.0.0.1 nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FirstBodyByteTests(TestCase):
    """The TTFB client over real TCP."""

    @inlineCallbacks
    def test_first_body_byte_not_headers(self) -> Any:
        """The clock stops at the first body byte, not at the headers."""
        body = b"x" * 300_000
        held = _HeldBody(body)
        port = _listen(self, held)
        released = threading.Event()

        def on_headers() -> None:
            reactor.callFromThread(held.release)  # type: ignore[attr-defined]
            released.set()

        result = yield deferToThread(
            first_body_byte,
            port,
            "/blob",
            [("X-Test", "1")],
            timeout=30,
            clock=_Counter(),
            on_headers=on_headers,
        )
        self.assertTrue(released.is_set())
        self.assertEqual((result.status, result.body_bytes, result.error), (200, len(body), ""))
        self.assertLess(result.headers_s, result.ttfb_s)
        self.assertLessEqual(result.ttfb_s, result.seconds)
        self.assertEqual(held.requests[0].getHeader(b"x-test"), b"1")

    @inlineCallbacks
    def test_short_body_is_an_error(self) -> Any:
        port = _listen(self, _Short())
        result = yield deferToThread(first_body_byte, port, "/", timeout=30)
        self.assertEqual(result.body_bytes, 3)
        self.assertIn("3 of 1000", result.error)

    @inlineCallbacks
    def test_nothing_listening(self) -> Any:
        port = _unused_port()
        result = yield deferToThread(first_body_byte, port, "/", timeout=5)
        self.assertEqual((result.status, result.ttfb_s), (0, 0.0))
        self.assertIn("ConnectionRefused", result.error)


class HashedGetTests(TestCase):
    """The hashing client (the ceiling of a hashing proxy) over real TCP."""

    @inlineCallbacks
    def test_digest_of_a_body_over_many_buffers(self) -> Any:
        body = os.urandom(9 * 1024 * 1024 + 12345)  # more than two receive buffers
        seen: List[Any] = []

        class Blob(Data):
            isLeaf = True

            def render_GET(self, request: Any) -> Any:
                seen.append(request.getHeader(b"x-test"))
                return super().render_GET(request)

        port = _listen(self, Blob(body, "application/octet-stream"))
        got = yield deferToThread(hashed_get, port, "/", [("X-Test", "2")], timeout=30)
        self.assertEqual((got.status, got.body_bytes, got.error), (200, len(body), ""))
        self.assertEqual(got.digest, "sha256:" + hashlib.sha256(body).hexdigest())
        self.assertGreater(got.speed, 0)
        self.assertEqual(seen, [b"2"])

    @inlineCallbacks
    def test_short_body_is_an_error(self) -> Any:
        port = _listen(self, _Short())
        got = yield deferToThread(hashed_get, port, "/", timeout=30)
        self.assertEqual(got.body_bytes, 3)
        self.assertIn("3 of 1000", got.error)
        self.assertEqual(got.speed, 0.0)

    @inlineCallbacks
    def test_nothing_listening(self) -> Any:
        port = _unused_port()
        got = yield deferToThread(hashed_get, port, "/", timeout=5)
        self.assertEqual(got.status, 0)
        self.assertIn("ConnectionRefused", got.error)


class PercentileTests(SynchronousTestCase):
    def test_nearest_rank(self) -> None:
        values = [float(v) for v in range(1, 101)]
        self.assertEqual(percentile(values, 50), 50.0)
        self.assertEqual(percentile(values, 99), 99.0)
        self.assertEqual(percentile(values, 100), 100.0)
        self.assertEqual(percentile([5.0], 99), 5.0)
        self.assertTrue(math.isnan(percentile([], 99)))


class _Manifest(web_resource.Resource):
    """Answers every GET; the C{stall_at}th one moves the fake clock first."""

    isLeaf = True

    def __init__(
        self, clock: FakeTime, stall_at: int = 0, stall: float = 0.0, code: int = 200
    ) -> None:
        super().__init__()
        self.clock = clock
        self.stall_at = stall_at
        self.stall = stall
        self.code = code
        self.count = 0

    def render_GET(self, request: Any) -> bytes:
        self.count += 1
        if self.count == self.stall_at:
            self.clock.advance(self.stall)
        request.setResponseCode(self.code)
        return b'{"schemaVersion": 2}'


class PacedGetsTests(TestCase):
    """The latency probe over real TCP, timed by a fake clock."""

    @inlineCallbacks
    def test_a_stall_delays_the_requests_due_meanwhile(self) -> Any:
        """
        Requests fall due every 100 ms; the third takes one (fake) second.
        Its latency is 1 s, and the ones due meanwhile count their wait:
        a closed loop would show a single slow request.
        """
        clock = FakeTime()
        manifest = _Manifest(clock, stall_at=3, stall=1.0)
        port = _listen(self, manifest)
        result = yield deferToThread(
            paced_gets, port, "/v2/x/manifests/1", [], 10, 1.0, clock=clock, sleep=clock.sleep
        )
        self.assertEqual((result.requests, result.errors, result.statuses), (10, 0, {"200": 10}))
        self.assertEqual(manifest.count, 10)
        self.assertEqual(result.max_ms, 1000.0)
        # due at 0.3 .. 0.9 s, all sent at 1.2 s (after the stall)
        self.assertEqual(result.p99_ms, 1000.0)
        self.assertEqual(result.p50_ms, 500.0)
        self.assertEqual(result.max_ms_by_second, [1000.0])

    @inlineCallbacks
    def test_slowest_by_second(self) -> Any:
        """The 15th request (due at 1.4 s) takes half a (fake) second: the
        second it fell due in shows it, the others do not."""
        clock = FakeTime()
        port = _listen(self, _Manifest(clock, stall_at=15, stall=0.5))
        result = yield deferToThread(
            paced_gets, port, "/m", [], 10, 3.0, clock=clock, sleep=clock.sleep
        )
        self.assertEqual(result.requests, 30)
        self.assertEqual(result.max_ms_by_second, [0.0, 500.0, 0.0])

    @inlineCallbacks
    def test_no_stall(self) -> Any:
        clock = FakeTime()
        port = _listen(self, _Manifest(clock))
        result = yield deferToThread(
            paced_gets, port, "/m", [], 100, 0.5, clock=clock, sleep=clock.sleep
        )
        self.assertEqual((result.requests, result.errors), (50, 0))
        self.assertEqual((result.p50_ms, result.p99_ms, result.max_ms), (0.0, 0.0, 0.0))
        self.assertEqual(result.max_ms_by_second, [0.0])

    @inlineCallbacks
    def test_errors_are_counted(self) -> Any:
        clock = FakeTime()
        port = _listen(self, _Manifest(clock, code=503))
        result = yield deferToThread(
            paced_gets, port, "/m", [], 10, 0.5, clock=clock, sleep=clock.sleep
        )
        self.assertEqual((result.requests, result.errors, result.statuses), (5, 5, {"503": 5}))
        self.assertEqual(result.error, "HTTP 503")


class ProbeProcessTests(TestCase):
    """The probe as the benchmark runs it: a child process, real time."""

    @inlineCallbacks
    def test_child_process(self) -> Any:
        clock = FakeTime()  # only counts requests here
        manifest = _Manifest(clock)
        port = _listen(self, manifest)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        probe = ProbeProcess(
            port,
            "/v2/x/manifests/1",
            [("Accept", "a, b")],
            20,
            0.5,
            env={**os.environ, "PYTHONPATH": root},
        )
        self.addCleanup(probe.kill)
        started = yield deferToThread(probe.wait_started)
        self.assertTrue(started)
        result = yield deferToThread(probe.result)
        self.assertEqual(
            (result.requests, result.errors, result.statuses, result.error),
            (10, 0, {"200": 10}, ""),
        )
        self.assertEqual(manifest.count, 10)


class SlowCrowdTests(TestCase):
    """The crowd of slow readers over real TCP (a short, bounded run)."""

    @inlineCallbacks
    def test_all_connect_read_slowly_and_are_held(self) -> Any:
        root = web_resource.Resource()
        root.putChild(b"blob", Data(b"b" * (4 << 20), "application/octet-stream"))
        port = _listen(self, root)
        count, rate = 20, 32 * 1024
        ticks: List[int] = []
        # held 2 s: ample for this listener to answer 20 requests on a busy machine
        result = yield deferToThread(slow_crowd, port, "/blob", [], count, rate, 2.0, ticks.append)
        self.assertEqual(
            (result.attempted, result.connected, result.held_open), (count, count, count)
        )
        self.assertEqual((result.statuses, result.connect_errors), ({"200": count}, {}))
        self.assertEqual(ticks, [0, 1, 2])
        self.assertGreater(result.body_bytes, 0)
        # the token bucket: never more than the rate allows (plus one read's slack
        # for what came with the headers)
        self.assertLessEqual(result.body_bytes, count * (rate * result.seconds + 4096))

    @inlineCallbacks
    def test_refused(self) -> Any:
        port = _unused_port()
        result = yield deferToThread(slow_crowd, port, "/blob", [], 5, 1024, 0.3)
        self.assertEqual((result.connected, result.held_open), (0, 0))
        self.assertEqual(result.connect_errors, {"ECONNREFUSED": 5})


def _figures(**changes: Any) -> Dict[str, Any]:
    figures: Dict[str, Any] = {
        "cold_MBps": {
            "hammal": {"median": 1000.0},
            "nginx": {"median": 2000.0},
            "distribution": {"median": 900.0},
            NO_HOLD_TAIL: {"median": 1700.0},
        },
        "warm_MBps": {"hammal": {"median": 3000.0}, "distribution": {"median": 1000.0}},
        "ttfb_ms": {
            "hammal": {"median": 3.0},
            "distribution": {"median": 4.0},
            "nginx": {"median": 1.0},
        },
        "concurrent_cold": {
            "hammal": {
                "median_wall_s": 3.0,
                "max_cdn_gets": 1,
                "cdn_gets": [1, 1],
                "peak_rss_MiB": [60.0, 149.9],
            },
            "distribution": {"median_wall_s": 8.0, "max_cdn_gets": 51, "cdn_gets": [51, 50]},
        },
        "crowd": {
            "count": 3000,
            "readers": {"held_open": 3000},
            "probe": {"p50_ms": 2.0, "p99_ms": 12.0, "max_ms": 40.0, "requests": 2100, "errors": 0},
        },
    }
    figures.update(changes)
    return figures


class VerdictTests(SynchronousTestCase):
    def verdicts(self, figures: Dict[str, Any], sha256: float = 1100.0) -> Dict[str, Any]:
        return {v.target: v for v in judge(figures, sha256)}

    def test_issue_12_targets(self) -> None:
        v = self.verdicts(_figures())
        cold = v["cold blob: hammal / Distribution"]
        self.assertEqual((cold.verdict, cold.value, cold.issue), ("PASS", 1.11, "12"))
        self.assertEqual(v["cold blob: hammal / sha256 on one core"].verdict, "PASS")
        self.assertEqual(v["cold blob: hammal / sha256 on one core"].value, 0.91)
        nht = v["cold blob --no-hold-tail: hammal / nginx"]
        self.assertEqual((nht.verdict, nht.value), ("PASS", 0.85))
        ttfb = v["cold blob time to first byte: hammal / Distribution"]
        self.assertEqual((ttfb.verdict, ttfb.value), ("PASS", 0.75))
        self.assertEqual(v["50 concurrent cold: wall hammal / Distribution"].verdict, "PASS")
        self.assertEqual(
            v["50 concurrent cold: upstream fetches by hammal (worst run)"].verdict, "PASS"
        )
        rss = v["50 concurrent cold: hammal peak RSS MiB (worst run)"]
        self.assertEqual((rss.verdict, rss.value), ("PASS", 149.9))
        crowd = v["manifest by tag p99 ms, 3,000 slow readers arriving"]
        self.assertEqual((crowd.verdict, crowd.value), ("PASS", 12.0))
        self.assertIn("PASS", crowd.line())
        self.assertEqual(v["warm blob: hammal / Distribution warm"].issue, "earlier")

    def test_hashing_ceiling_in_the_sha256_line(self) -> None:
        figures = _figures(hashing_client_MBps={"nginx": {"median": 770}, "cdn": {"median": 1340}})
        line = self.verdicts(figures, sha256=1400.0)["cold blob: hammal / sha256 on one core"]
        self.assertIn("nginx + a hashing client: 770 (0.55x", line.detail)
        plain = self.verdicts(_figures(), sha256=1400.0)["cold blob: hammal / sha256 on one core"]
        self.assertNotIn("hashing client", plain.detail)

    def test_issue_12_first(self) -> None:
        issues = [v.issue for v in judge(_figures(), 1100.0)]
        self.assertEqual(issues, sorted(issues, key=lambda i: i != "12"))

    def test_misses(self) -> None:
        figures = _figures()
        figures["cold_MBps"]["hammal"]["median"] = 500.0
        figures["ttfb_ms"]["hammal"]["median"] = 4.4
        figures["concurrent_cold"]["hammal"]["max_cdn_gets"] = 2
        figures["concurrent_cold"]["hammal"]["peak_rss_MiB"] = [150.0]
        figures["concurrent_cold"]["hammal"]["median_wall_s"] = 4.1
        figures["crowd"]["probe"]["p99_ms"] = 2100.0
        v = self.verdicts(figures, sha256=1200.0)
        self.assertEqual(v["cold blob: hammal / Distribution"].value, 0.56)
        for target in (
            "cold blob: hammal / Distribution",
            "cold blob: hammal / sha256 on one core",
            "cold blob time to first byte: hammal / Distribution",
            "50 concurrent cold: wall hammal / Distribution",
            "50 concurrent cold: upstream fetches by hammal (worst run)",
            "50 concurrent cold: hammal peak RSS MiB (worst run)",
            "manifest by tag p99 ms, 3,000 slow readers arriving",
        ):
            self.assertEqual(v[target].verdict, "MISS", target)

    def test_probe_errors_miss(self) -> None:
        figures = _figures()
        figures["crowd"]["probe"]["errors"] = 3
        v = self.verdicts(figures)
        self.assertEqual(v["manifest by tag p99 ms, 3,000 slow readers arriving"].verdict, "MISS")

    def test_no_hold_tail_refused(self) -> None:
        figures = _figures(
            no_hold_tail={"available": False, "reason": "not available: hammal refuses it"}
        )
        del figures["cold_MBps"][NO_HOLD_TAIL]
        nht = self.verdicts(figures)["cold blob --no-hold-tail: hammal / nginx"]
        self.assertEqual((nht.verdict, nht.value), ("not available", None))
        self.assertEqual(nht.detail, "not available: hammal refuses it")

    def test_only_what_was_measured(self) -> None:
        figures = {"cold_MBps": _figures()["cold_MBps"]}
        targets = {v.target for v in judge(figures, 1100.0)}
        self.assertEqual(
            targets,
            {
                "cold blob: hammal / Distribution",
                "cold blob: hammal / sha256 on one core",
                "cold blob --no-hold-tail: hammal / nginx",
            },
        )


class SectionTests(SynchronousTestCase):
    def test_quick_runs_the_cold_blob_rows(self) -> None:
        self.assertEqual(chosen_sections(True, None), QUICK_SECTIONS)
        self.assertEqual(QUICK_SECTIONS, ["throughput", "ttfb"])

    def test_full_runs_everything(self) -> None:
        self.assertEqual(chosen_sections(False, None), list(SECTIONS))
        self.assertIn("crowd", SECTIONS)

    def test_only(self) -> None:
        self.assertEqual(chosen_sections(True, ["crowd"]), ["crowd"])
