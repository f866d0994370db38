"""
``--workers N``: N processes serving one port.

The main process binds one listening socket per process on the same
address (C{SO_REUSEPORT}, so that the kernel spreads connections evenly),
serves on the first itself and starts N-1 worker processes that adopt the
others (L{IReactorSocket.adoptStreamPort}, Twisted's multi-process
pattern). A worker's socket stays open in the main process, so connections
queued on it while the worker restarts wait for it. A worker is the same
``twistd hammal`` command line with two extra environment variables,
L{WORKER_ENV} (its index, 1 to N-1) and L{LISTEN_FD_ENV} (the inherited
socket), so TLS, options and the cache directory are the same in every
process.

The main process supervises: a worker that dies is started again after
L{RESTART_DELAY} seconds (longer, up to L{MAX_RESTART_DELAY}, while it
keeps dying soon after its start); on SIGTERM it stops listening, passes the signal
to every worker (each drains its own requests, up to ``--drain-timeout``)
and waits for them, killing those still there a few seconds after the
drain timeout. A worker's standard input is a pipe from the main process:
when the main process dies, however, the pipe closes and the worker stops.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any, Callable, Mapping, Sequence

from twisted.application.service import Service
from twisted.internet import abstract, fdesc
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from hammal.accept import FairListening

#: The worker's index (1..N-1); absent in the main process (worker 0).
WORKER_ENV = "HAMMAL_WORKER"
#: The file descriptor of the inherited listening socket, in a worker.
LISTEN_FD_ENV = "HAMMAL_WORKER_FD"
#: Where the inherited socket is in a worker.
LISTEN_FD = 3
#: Seconds before a dead worker is started again ...
RESTART_DELAY = 1.0
#: ... doubled each time it dies within STABLE_AFTER seconds of its start,
#: up to this (a worker that cannot run is not restarted in a tight loop).
MAX_RESTART_DELAY = 30.0
STABLE_AFTER = 10.0
#: Seconds, beyond the drain timeout, a worker may take to stop before SIGKILL.
STOP_GRACE = 5.0
#: Signals the main process passes on to its workers.
FORWARDED_SIGNALS = (signal.SIGHUP, signal.SIGUSR1)

#: The worker's command: twistd itself, on the argument list that follows.
_BOOT = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"

log = Logger()


def worker_index(environ: Mapping[str, str] | None = None) -> int:
    """This process's worker index: 0 in the main process."""
    environ = os.environ if environ is None else environ
    try:
        return int(environ.get(WORKER_ENV, "0"))
    except ValueError:
        return 0


def inherited_socket(environ: Mapping[str, str] | None = None) -> int | None:
    """The listening socket this worker inherited, or L{None} in the main process."""
    environ = os.environ if environ is None else environ
    value = environ.get(LISTEN_FD_ENV)
    return int(value) if value and value.isdigit() else None


def worker_argv(
    plugin_args: Sequence[str], twistd: Mapping[str, Any] | None, index: int
) -> list[str]:
    """
    Worker C{index}'s command line: ``python -c <twistd> --pidfile= -n
    hammal <the main process's hammal arguments>``, logging as the main
    process does: to the same standard output or syslog, or, with
    ``--logfile PATH``, to ``PATH.worker<index>`` beside it (one file per
    process: each rotates its own).
    """
    argv = [sys.executable, "-c", _BOOT, "--pidfile=", "-n"]
    twistd = twistd or {}
    if twistd.get("syslog"):
        argv.append("--syslog")
        if twistd.get("prefix"):
            argv.append(f"--prefix={twistd['prefix']}")
    elif twistd.get("logfile") and twistd.get("logfile") != "-":
        argv.append(f"--logfile={os.path.abspath(twistd['logfile'])}.worker{index}")
    elif not twistd.get("nodaemon", True):
        # A daemon without --logfile logs to twistd.log: its workers beside it.
        argv.append(f"--logfile={os.path.abspath('twistd.log')}.worker{index}")
    return [*argv, "hammal", *plugin_args]


class WorkerPool(Service):
    """
    The main process's listeners and its workers.

    @param make_sockets: makes the listening sockets, one per process, all
        bound to the same address (L{reuseport_sockets}); called when the
        service starts (privileged, before twistd drops its rights).
    @param factory: the main process's protocol factory.
    @param count: processes in all, this one included.
    @param argv: worker C{index}'s command line (L{worker_argv}).
    @param environ: the workers' environment (they add their index).
    @param after_stop: called once every worker is gone.
    @param forward: signals passed on to every worker after this process
        handled them (C{SIGHUP} reloads TLS, C{SIGUSR1} reopens logs).
    """

    def __init__(
        self,
        reactor: Any,
        make_sockets: Callable[[], list[socket.socket]],
        factory: Any,
        count: int,
        argv: Callable[[int], Sequence[str]],
        environ: Mapping[str, str],
        drain_timeout: float,
        restart_delay: float = RESTART_DELAY,
        after_stop: Callable[[], None] | None = None,
        forward: Sequence[int] = FORWARDED_SIGNALS,
    ) -> None:
        self._reactor = reactor
        self._forward = tuple(forward)
        self._previous: dict[int, Any] = {}
        self._after_stop = after_stop
        self._make_sockets = make_sockets
        self._factory = factory
        self._count = count
        self._argv = argv
        self._environ = dict(environ)
        self._drain_timeout = drain_timeout
        self._restart_delay = restart_delay
        self._delays: dict[int, float] = {}
        self._sockets: list[socket.socket] = []
        self._port: IListeningPort | None = None
        self._workers: dict[int, _Worker] = {}
        self._stopping = False
        #: How many times each worker was started (tests, the log).
        self.starts: dict[int, int] = {}

    # Service.

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listen()

    def _listen(self) -> None:
        if self._sockets:
            return
        self._sockets = self._make_sockets()
        own = self._sockets[0]
        self._port = FairListening(self._reactor).adoptStreamPort(
            own.fileno(), own.family, self._factory
        )
        address = own.getsockname()
        log.info(
            "listening on {host} port {port} in {count} processes",
            host=address[0],
            port=address[1],
            count=self._count,
        )

    def startService(self) -> None:
        super().startService()
        self._listen()  # when not started privileged (tests)
        for signum in self._forward:
            self._previous[signum] = signal.signal(signum, self._pass_on)
        for index in range(1, self._count):
            self._spawn(index)

    def _pass_on(self, signum: int, frame: Any) -> None:
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, frame)
        name = signal.Signals(signum).name[3:]
        self._reactor.callFromThread(self.signal_workers, name)

    def signal_workers(self, name: str) -> None:
        """Send signal C{name} (C{"HUP"}, ...) to every worker."""
        for worker in list(self._workers.values()):
            worker._signal(name)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        self._stopping = True
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
        stops: list[Deferred[Any]] = []
        if self._port is not None:
            stops.append(_maybe(self._port.stopListening()))
        for worker in list(self._workers.values()):
            stops.append(worker.stop(self._drain_timeout + STOP_GRACE))

        def close(_: object) -> None:
            for sock in self._sockets:
                sock.close()
            if self._after_stop is not None:
                self._after_stop()

        return DeferredList(stops).addCallback(close)

    # Workers.

    def pids(self) -> dict[int, int]:
        """The running workers' process ids, by index."""
        return {i: w.pid for i, w in self._workers.items() if w.pid is not None}

    def _spawn(self, index: int) -> None:
        fd = self._sockets[index].fileno()
        env = {**self._environ, WORKER_ENV: str(index), LISTEN_FD_ENV: str(LISTEN_FD)}
        worker = _Worker(self, index, self._reactor.seconds())
        argv = list(self._argv(index))
        self._reactor.spawnProcess(
            worker,
            argv[0],
            argv,
            env=env,
            path=os.getcwd(),
            childFDs={0: "w", 1: 1, 2: 2, LISTEN_FD: fd},
        )
        self._workers[index] = worker
        self.starts[index] = self.starts.get(index, 0) + 1

    def _ended(self, worker: _Worker, reason: Failure) -> None:
        if self._workers.get(worker.index) is worker:
            del self._workers[worker.index]
        if self._stopping:
            return
        quick = self._reactor.seconds() - worker.started < STABLE_AFTER
        if quick and worker.index in self._delays:
            delay = min(MAX_RESTART_DELAY, self._delays[worker.index] * 2)
        else:
            delay = self._restart_delay
        self._delays[worker.index] = delay
        # Its socket stays open here: connections the kernel queues on it
        # wait for the next worker instead of being refused.
        log.warn(
            "worker {index} (pid {pid}) ended ({reason}); starting it again in {delay:g}s",
            index=worker.index,
            pid=worker.pid,
            reason=reason.getErrorMessage(),
            delay=delay,
        )
        self._reactor.callLater(delay, self._respawn, worker.index)

    def _respawn(self, index: int) -> None:
        if not self._stopping and index not in self._workers:
            self._spawn(index)


def reuseport_sockets(endpoint: Any, count: int) -> list[socket.socket]:
    """
    C{count} listening sockets on C{endpoint}'s address, bound with
    C{SO_REUSEPORT}: the kernel spreads new connections evenly over them
    (by their addresses), one socket per process. One shared socket would
    leave it to whichever process wakes first, which on a busy machine is
    the same one again and again.

    @param endpoint: a TCP endpoint from C{--port} (L{DualStackEndpoint},
        C{TCP4ServerEndpoint} or C{TCP6ServerEndpoint}).
    @raise ValueError: for any other endpoint.
    """
    family, host, port, backlog, dual = tcp_address(endpoint)
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if dual:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((host, port))
            port = sock.getsockname()[1]  # port 0: the others take the one given
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def tcp_address(endpoint: Any) -> tuple[socket.AddressFamily, str, int, int, bool]:
    """(family, host, port, backlog, dual stack) of a TCP server endpoint."""
    from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint

    from hammal.listen import DualStackEndpoint

    if isinstance(endpoint, DualStackEndpoint):
        if socket.has_ipv6 and _ipv6_usable():
            return socket.AF_INET6, "::", endpoint._port, endpoint._backlog, True
        return socket.AF_INET, "0.0.0.0", endpoint._port, endpoint._backlog, False
    if isinstance(endpoint, TCP6ServerEndpoint):
        return (
            socket.AF_INET6,
            endpoint._interface or "::",
            endpoint._port,
            endpoint._backlog,
            False,
        )
    if isinstance(endpoint, TCP4ServerEndpoint):
        return (
            socket.AF_INET,
            endpoint._interface or "0.0.0.0",
            endpoint._port,
            endpoint._backlog,
            False,
        )
    raise ValueError("--workers needs a TCP --port (a number or a tcp: endpoint)")


def _ipv6_usable() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def _maybe(result: Any) -> Deferred[Any]:
    return result if isinstance(result, Deferred) else succeed(result)


class _Worker(ProcessProtocol):
    """One worker process, as the main process sees it."""

    def __init__(self, pool: WorkerPool, index: int, started: float) -> None:
        self._pool = pool
        self.index = index
        self.started = started
        self.pid: int | None = None
        self._ended: Deferred[None] = Deferred()
        self._kill: Any = None

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]

    def processEnded(self, reason: Failure) -> None:
        if self._kill is not None and self._kill.active():
            self._kill.cancel()
        self._ended.callback(None)
        self._pool._ended(self, reason)

    def stop(self, timeout: float) -> Deferred[None]:
        """SIGTERM (the worker drains), then SIGKILL after C{timeout} seconds."""
        if self._ended.called:
            return succeed(None)
        self._signal("TERM")
        self._kill = self._pool._reactor.callLater(timeout, self._signal, "KILL")
        done: Deferred[None] = Deferred()
        self._ended.addBoth(lambda _: done.callback(None))
        return done

    def _signal(self, name: str) -> None:
        try:
            self.transport.signalProcess(name)  # type: ignore[union-attr]
        except Exception:  # already gone
            pass


class AdoptedPort(Service):
    """A worker's listener: the socket the main process passed down."""

    def __init__(self, reactor: Any, fd: int, factory: Any) -> None:
        self._reactor = reactor
        self._fd = fd
        self._factory = factory
        self._port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._adopt()

    def startService(self) -> None:
        super().startService()
        self._adopt()

    def _adopt(self) -> None:
        if self._port is not None:
            return
        probe = socket.socket(fileno=os.dup(self._fd))
        family = probe.family
        probe.close()
        self._port = FairListening(self._reactor).adoptStreamPort(self._fd, family, self._factory)
        os.close(self._fd)  # the reactor holds its own copy

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        if self._port is None:
            return succeed(None)
        return _maybe(self._port.stopListening())


class ParentWatch(Service):
    """
    Stops a worker when the main process goes: its end of the worker's
    standard input closes, whatever killed it.

    @param orphaned: called first, for what the main process left behind.
    """

    def __init__(
        self, reactor: Any, fd: int = 0, orphaned: Callable[[], None] | None = None
    ) -> None:
        self._reactor = reactor
        self._fd = fd
        self._orphaned = orphaned
        self._reader: _PipeReader | None = None

    def startService(self) -> None:
        super().startService()
        self._reader = _PipeReader(self._reactor, self._fd, self._parent_gone)
        self._reader.startReading()

    def stopService(self) -> None:
        super().stopService()
        if self._reader is not None:
            self._reader.stopReading()
            self._reader = None

    def _parent_gone(self) -> None:
        if not self.running:
            return
        log.warn("the main hammal process is gone: this worker stops")
        if self._orphaned is not None:
            self._orphaned()  # what the main process would have cleaned up
        self._reactor.stop()


class _PipeReader(abstract.FileDescriptor):
    """Reads (and drops) whatever comes on C{fd}; calls C{on_close} at its end."""

    def __init__(self, reactor: Any, fd: int, on_close: Any) -> None:
        super().__init__(reactor)
        self._fd = fd
        self._on_close = on_close
        fdesc.setNonBlocking(fd)

    def fileno(self) -> int:
        return self._fd

    def doRead(self) -> Any:
        return fdesc.readFromFD(self._fd, lambda data: None)

    def connectionLost(self, reason: Failure) -> None:
        abstract.FileDescriptor.connectionLost(self, reason)
        self._on_close()
