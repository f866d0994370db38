"""
``--workers``: the option, the main process's pool, a worker's adopted port,
and /metrics of all.
"""

from __future__ import annotations

import os
import signal
import socket
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from twisted.internet.defer import succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.python.failure import Failure
from twisted.trial import unittest

from hammal.config import ConfigError, parse_workers
from hammal.listen import DualStackEndpoint
from hammal.tap import Options
from hammal.worker_metrics import AllWorkers, MetricsSnapshots, registry_for
from hammal.workers import (
    LISTEN_FD,
    LISTEN_FD_ENV,
    WORKER_ENV,
    AdoptedPort,
    WorkerPool,
    inherited_socket,
    reuseport_sockets,
    tcp_address,
    worker_argv,
    worker_index,
)


class WorkersOptionTests(unittest.SynchronousTestCase):
    def settings(self, *argv: str, environ: dict[str, str] | None = None) -> Any:
        options = Options(environ=environ or {})
        options.parseOptions(list(argv))
        return options.settings

    def test_default_is_one(self) -> None:
        self.assertEqual(self.settings().workers, 1)

    def test_number_and_environment(self) -> None:
        self.assertEqual(self.settings("--workers", "3").workers, 3)
        self.assertEqual(self.settings(environ={"HAMMAL_WORKERS": "2"}).workers, 2)
        self.assertEqual(
            self.settings("--workers", "4", environ={"HAMMAL_WORKERS": "2"}).workers, 4
        )

    def test_auto_is_the_usable_cores(self) -> None:
        self.assertEqual(parse_workers("auto"), len(os.sched_getaffinity(0)))

    def test_invalid(self) -> None:
        for bad in ("0", "-1", "many", "1.5"):
            self.assertRaises(ConfigError, parse_workers, bad)

    def test_arguments_are_kept_for_the_workers(self) -> None:
        options = Options(environ={})
        options.parseOptions(["--workers", "2", "--port", "tcp:0"])
        self.assertEqual(options.arguments, ["--workers", "2", "--port", "tcp:0"])


class WorkersNeedTcpTests(unittest.SynchronousTestCase):
    def test_a_unix_port_is_refused_at_start(self) -> None:
        from twisted.python.usage import UsageError

        from hammal.tap import makeService

        options = Options(environ={})
        options.parseOptions(
            ["--workers", "2", "--port", "unix:" + self.mktemp(), "--cache-dir", self.mktemp()]
        )
        before = dict(os.environ)
        error = self.assertRaises(UsageError, makeService, options, MemoryReactor())
        self.assertIn("--workers needs a TCP --port", str(error))
        self.assertEqual(dict(os.environ), before)


class WorkerArgvTests(unittest.SynchronousTestCase):
    def test_foreground_twistd_with_the_same_arguments(self) -> None:
        argv = worker_argv(["--port", "5000"], {"nodaemon": 1, "logfile": None}, 1)
        self.assertEqual(argv[1], "-c")
        self.assertEqual(argv[3:], ["--pidfile=", "-n", "hammal", "--port", "5000"])

    def test_logs_where_the_main_process_logs(self) -> None:
        argv = worker_argv([], {"logfile": "hammal.log"}, 2)
        self.assertIn(f"--logfile={os.path.abspath('hammal.log')}.worker2", argv)
        argv = worker_argv([], {"nodaemon": 0, "logfile": None}, 1)
        self.assertIn(f"--logfile={os.path.abspath('twistd.log')}.worker1", argv)
        argv = worker_argv([], {"syslog": 1, "prefix": "mirror"}, 1)
        self.assertIn("--syslog", argv)
        self.assertIn("--prefix=mirror", argv)

    def test_index_and_socket_from_the_environment(self) -> None:
        self.assertEqual(worker_index({}), 0)
        self.assertEqual(worker_index({WORKER_ENV: "2"}), 2)
        self.assertIsNone(inherited_socket({}))
        self.assertEqual(inherited_socket({LISTEN_FD_ENV: "3"}), 3)


class _Port:
    def __init__(self) -> None:
        self.listening = True

    def stopListening(self) -> Any:
        self.listening = False
        return succeed(None)


class _Transport:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class _ProcessReactor(Clock):
    """A clock that records spawnProcess and adoptStreamPort calls."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[dict[str, Any]] = []
        self.adopted: list[tuple[int, int, Any]] = []
        self.port = _Port()

    def adoptStreamPort(self, fd: int, family: int, factory: Any) -> _Port:
        self.adopted.append((fd, family, factory))
        return self.port

    def spawnProcess(
        self, protocol: Any, executable: str, args: list[str], env: Any, path: Any, childFDs: Any
    ) -> _Transport:
        transport = _Transport(1000 + len(self.spawned))
        protocol.makeConnection(transport)
        self.spawned.append(
            dict(protocol=protocol, executable=executable, args=args, env=env, childFDs=childFDs)
        )
        return transport


def _ended(code: int = 1) -> Failure:
    return Failure(ProcessTerminated(exitCode=code))


class WorkerPoolTests(unittest.SynchronousTestCase):
    def make(
        self, count: int = 3, forward: tuple[int, ...] = ()
    ) -> tuple[WorkerPool, _ProcessReactor, list[socket.socket]]:
        self.after_stop: list[bool] = []
        reactor = _ProcessReactor()
        sockets = reuseport_sockets(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), count)
        for sock in sockets:
            self.addCleanup(sock.close)
        pool = WorkerPool(
            reactor,
            lambda: sockets,
            "factory",
            count,
            lambda i: ["python", "-c", f"boot {i}"],
            {"PATH": "/bin"},
            drain_timeout=30,
            after_stop=lambda: self.after_stop.append(True),
            forward=forward,
        )
        pool.privilegedStartService()
        pool.startService()
        return pool, reactor, sockets

    def test_serves_the_first_socket_and_starts_workers_on_the_others(self) -> None:
        pool, reactor, sockets = self.make(3)
        self.assertEqual(reactor.adopted, [(sockets[0].fileno(), socket.AF_INET, "factory")])
        self.assertEqual(len(reactor.spawned), 2)
        for index, spawned in enumerate(reactor.spawned, start=1):
            self.assertEqual(spawned["env"][WORKER_ENV], str(index))
            self.assertEqual(spawned["env"][LISTEN_FD_ENV], str(LISTEN_FD))
            self.assertEqual(spawned["env"]["PATH"], "/bin")
            self.assertEqual(spawned["childFDs"][LISTEN_FD], sockets[index].fileno())
            self.assertEqual(spawned["childFDs"][0], "w")  # its lifeline
            self.assertEqual(spawned["args"], ["python", "-c", f"boot {index}"])
        self.assertEqual(pool.pids(), {1: 1000, 2: 1001})

    def test_a_dead_worker_is_started_again(self) -> None:
        pool, reactor, _ = self.make(2)
        reactor.spawned[0]["protocol"].processEnded(_ended(-9))
        self.assertEqual(pool.pids(), {})
        reactor.advance(0.5)
        self.assertEqual(len(reactor.spawned), 1)
        reactor.advance(0.5)
        self.assertEqual(len(reactor.spawned), 2)
        self.assertEqual(reactor.spawned[1]["env"][WORKER_ENV], "1")
        self.assertEqual(reactor.spawned[1]["childFDs"], reactor.spawned[0]["childFDs"])
        self.assertEqual(pool.starts, {1: 2})

    def test_a_worker_dying_at_once_again_and_again_is_restarted_less_often(self) -> None:
        pool, reactor, _ = self.make(2)
        delays = []
        for _ in range(4):
            spawned = len(reactor.spawned)
            reactor.spawned[-1]["protocol"].processEnded(_ended(1))
            waited = 0.0
            while len(reactor.spawned) == spawned:
                reactor.advance(0.5)
                waited += 0.5
            delays.append(waited)
        self.assertEqual(delays, [1.0, 2.0, 4.0, 8.0])
        reactor.advance(60)  # this one runs a while: the next restart is quick again
        spawned = len(reactor.spawned)
        reactor.spawned[-1]["protocol"].processEnded(_ended(1))
        reactor.advance(1.0)
        self.assertEqual(len(reactor.spawned), spawned + 1)

    def test_hangup_is_passed_on_to_every_worker(self) -> None:
        """kill -HUP (TLS reload) and -USR1 (logs) of the main process reach the workers too."""
        before = signal.getsignal(signal.SIGHUP)
        seen: list[int] = []

        def own(signum: int, frame: Any) -> None:
            seen.append(signum)

        signal.signal(signal.SIGHUP, own)
        self.addCleanup(signal.signal, signal.SIGHUP, before)
        pool, reactor, _ = self.make(3, forward=(signal.SIGHUP,))
        reactor.callFromThread = lambda f, *a: f(*a)  # type: ignore[attr-defined]
        os.kill(os.getpid(), signal.SIGHUP)
        self.assertEqual(seen, [signal.SIGHUP])  # this process's own handler still runs
        self.assertEqual(
            [s["protocol"].transport.signals for s in reactor.spawned], [["HUP"], ["HUP"]]
        )
        pool.stopService()
        self.assertIs(signal.getsignal(signal.SIGHUP), own)  # restored

    def test_stop_drains_every_worker_then_kills_stragglers(self) -> None:
        pool, reactor, sockets = self.make(3)
        first, second = (s["protocol"] for s in reactor.spawned)
        stopped = pool.stopService()
        self.assertFalse(reactor.port.listening)
        self.assertEqual(first.transport.signals, ["TERM"])
        self.assertEqual(second.transport.signals, ["TERM"])
        first.processEnded(_ended(0))
        self.assertNoResult(stopped)
        self.assertEqual(self.after_stop, [])
        reactor.advance(34.9)
        self.assertEqual(second.transport.signals, ["TERM"])
        reactor.advance(0.1)
        self.assertEqual(second.transport.signals, ["TERM", "KILL"])
        second.processEnded(_ended(-9))
        self.successResultOf(stopped)
        self.assertEqual([sock.fileno() for sock in sockets], [-1, -1, -1])  # closed
        self.assertEqual(self.after_stop, [True])
        reactor.advance(10)
        self.assertEqual(len(reactor.spawned), 2)  # nothing restarted while stopping


class ReuseportSocketsTests(unittest.SynchronousTestCase):
    def test_one_port_for_all_and_the_kernel_spreads_connections(self) -> None:
        sockets = reuseport_sockets(TCP4ServerEndpoint(Clock(), 0, interface="127.0.0.1"), 2)
        for sock in sockets:
            self.addCleanup(sock.close)
        addresses = {sock.getsockname() for sock in sockets}
        self.assertEqual(len(addresses), 1)
        host, port = addresses.pop()
        self.assertEqual(host, "127.0.0.1")
        clients = []
        for _ in range(32):
            client = socket.create_connection((host, port))
            self.addCleanup(client.close)
            clients.append(client)
        accepted = []
        for sock in sockets:
            count = 0
            while True:
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    break
                conn.close()
                count += 1
            accepted.append(count)
        self.assertEqual(sum(accepted), 32)
        self.assertTrue(all(accepted), accepted)  # both got some (by address hash)

    def test_dual_stack(self) -> None:
        """``--port N``: IPv6 sockets that take IPv4 too (where the machine has IPv6)."""
        sockets = reuseport_sockets(DualStackEndpoint(Clock(), 0, 16), 2)
        for sock in sockets:
            self.addCleanup(sock.close)
        ports = {sock.getsockname()[1] for sock in sockets}
        self.assertEqual(len(ports), 1)
        with socket.create_connection(("127.0.0.1", ports.pop())):
            pass

    def test_tcp_only(self) -> None:
        self.assertRaises(ValueError, tcp_address, object())
        family, host, port, backlog, dual = tcp_address(DualStackEndpoint(Clock(), 5000, 1024))
        self.assertEqual((port, backlog), (5000, 1024))


class AdoptedPortTests(unittest.SynchronousTestCase):
    def test_adopts_the_inherited_socket_with_its_family(self) -> None:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        fd = os.dup(sock.fileno())
        reactor = MemoryReactor()
        service = AdoptedPort(reactor, fd, "factory")
        service.privilegedStartService()
        service.startService()
        self.assertEqual(len(reactor.adoptedPorts), 1)
        port = reactor.adoptedPorts[0]
        self.assertEqual((port[0], port[1], port[2]), (fd, socket.AF_INET6, "factory"))
        self.assertRaises(OSError, os.fstat, fd)  # handed over: closed here


class AllWorkersMetricsTests(unittest.SynchronousTestCase):
    def test_own_series_live_and_the_others_from_snapshots(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        other = CollectorRegistry()
        Counter("hammal_things", "Things.", ["kind"], registry=other).labels("a").inc(5)
        snapshot = MetricsSnapshots(other, directory, 1, Clock())
        snapshot.startService()
        own = CollectorRegistry()
        counter = Counter("hammal_things", "Things.", ["kind"], registry=own)
        counter.labels("a").inc(2)
        text = generate_latest(registry_for(own, 0, {"HAMMAL_WORKER_METRICS_DIR": directory}))
        self.assertIn(b'hammal_things_total{kind="a",worker="0"} 2.0', text)
        self.assertIn(b'hammal_things_total{kind="a",worker="1"} 5.0', text)
        self.assertEqual(text.count(b"# TYPE hammal_things_total counter"), 1)
        counter.labels("a").inc()  # live: no snapshot needed for our own
        text = generate_latest(registry_for(own, 0, {"HAMMAL_WORKER_METRICS_DIR": directory}))
        self.assertIn(b'hammal_things_total{kind="a",worker="0"} 3.0', text)

    def test_snapshots_are_rewritten_periodically_and_at_stop(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        registry = CollectorRegistry()
        counter = Counter("hammal_things", "Things.", registry=registry)
        clock = Clock()
        snapshots = MetricsSnapshots(registry, directory, 2, clock, interval=2.0)
        snapshots.startService()
        path = os.path.join(directory, "worker-2.prom")

        def value() -> bytes:
            with open(path, "rb") as f:
                return [
                    line
                    for line in f.read().splitlines()
                    if line.startswith(b"hammal_things_total")
                ][0]

        self.assertEqual(value(), b"hammal_things_total 0.0")
        counter.inc()
        clock.advance(2.0)
        self.assertEqual(value(), b"hammal_things_total 1.0")
        counter.inc()
        snapshots.stopService()
        self.assertEqual(value(), b"hammal_things_total 2.0")

    def test_one_process_alone_serves_its_registry_unchanged(self) -> None:
        own = CollectorRegistry()
        self.assertIs(registry_for(own, 0, {}), own)

    def test_a_broken_snapshot_is_skipped(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        with open(os.path.join(directory, "worker-1.prom"), "w") as f:
            f.write("this is { not prometheus\n")
        own = CollectorRegistry()
        Counter("hammal_things", "Things.", registry=own).inc()
        text = generate_latest(AllWorkers(own, directory, 0))  # type: ignore[arg-type]
        self.assertIn(b'hammal_things_total{worker="0"} 1.0', text)


class WorkersBenchVerdictTests(unittest.SynchronousTestCase):
    """``make bench``'s workers row: 2 workers >= 1.4x one, p99 < 20 ms."""

    def figures(self, one: float, two: float, p99: float) -> Any:
        def rec(rate: float, p99_ms: float) -> dict[str, Any]:
            return {"median_req_per_s": rate, "median_p99_ms": p99_ms, "p99_ms": [p99_ms]}

        return {"manifest_workers": {"1": rec(one, 12.0), "2": rec(two, p99)}}

    def verdicts(self, figures: Any) -> dict[str, Any]:
        from bench.verdicts import judge

        return {v.target: v for v in judge(figures, 1000.0) if v.issue == "14"}

    def test_pass(self) -> None:
        found = self.verdicts(self.figures(3000, 4500, 15))
        self.assertEqual([v.verdict for v in found.values()], ["PASS", "PASS"])
        self.assertEqual(found["manifest by tag, wrk -c50: req/s 2 workers / 1 worker"].value, 1.5)

    def test_miss(self) -> None:
        found = self.verdicts(self.figures(3000, 3900, 25))
        self.assertEqual([v.verdict for v in found.values()], ["MISS", "MISS"])

    def test_section_runs_in_a_full_bench(self) -> None:
        from bench.run import SECTIONS, chosen_sections

        self.assertIn("workers", SECTIONS)
        self.assertIn("workers", chosen_sections(False, None))
        self.assertNotIn("workers", chosen_sections(True, None))
