"""
``--workers N``: N processes serving one listening socket.

The main process listens (as it would alone), serves on that socket too,
and starts N-1 worker processes that adopt it
(L{IReactorSocket.adoptStreamPort}, Twisted's multi-process pattern): the
kernel spreads the accepted connections over them. A worker is the same
``twistd hammal`` command line with two extra environment variables,
L{WORKER_ENV} (its index, 1 to N-1) and L{LISTEN_FD_ENV} (the inherited
socket), so TLS, options and the cache directory are the same in every
process.

The main process supervises: a worker that dies is started again after
L{RESTART_DELAY} seconds; on SIGTERM it stops listening, passes the signal
to every worker (each drains its own requests, up to ``--drain-timeout``)
and waits for them, killing those still there a few seconds after the
drain timeout. A worker's standard input is a pipe from the main process:
when the main process dies, however, the pipe closes and the worker stops.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any, Mapping, Sequence

from twisted.application.service import Service
from twisted.internet import abstract, fdesc
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

#: The worker's index (1..N-1); absent in the main process (worker 0).
WORKER_ENV = "HAMMAL_WORKER"
#: The file descriptor of the inherited listening socket, in a worker.
LISTEN_FD_ENV = "HAMMAL_WORKER_FD"
#: Where the inherited socket is in a worker.
LISTEN_FD = 3
#: Seconds before a dead worker is started again.
RESTART_DELAY = 1.0
#: Seconds, beyond the drain timeout, a worker may take to stop before SIGKILL.
STOP_GRACE = 5.0

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


def worker_argv(plugin_args: Sequence[str], twistd: Mapping[str, Any] | None) -> list[str]:
    """
    The worker's command line: ``python -c <twistd> --pidfile= -n hammal
    <the main process's hammal arguments>``, logging where the main process
    logs (a file or syslog; standard output otherwise).
    """
    argv = [sys.executable, "-c", _BOOT, "--pidfile=", "-n"]
    twistd = twistd or {}
    if twistd.get("syslog"):
        argv.append("--syslog")
        if twistd.get("prefix"):
            argv.append(f"--prefix={twistd['prefix']}")
    elif twistd.get("logfile") and twistd.get("logfile") != "-":
        argv.append(f"--logfile={os.path.abspath(twistd['logfile'])}")
    return [*argv, "hammal", *plugin_args]


class WorkerPool(Service):
    """
    The main process's listener and its workers.

    @param endpoint: where to listen (the main process serves there too).
    @param factory: the main process's protocol factory.
    @param count: processes in all, this one included.
    @param argv: a worker's command line (L{worker_argv}).
    @param environ: the workers' environment (they add their index).
    """

    def __init__(
        self,
        reactor: Any,
        endpoint: IStreamServerEndpoint,
        factory: Any,
        count: int,
        argv: Sequence[str],
        environ: Mapping[str, str],
        drain_timeout: float,
        restart_delay: float = RESTART_DELAY,
    ) -> None:
        self._reactor = reactor
        self._endpoint = endpoint
        self._factory = factory
        self._count = count
        self._argv = list(argv)
        self._environ = dict(environ)
        self._drain_timeout = drain_timeout
        self._restart_delay = restart_delay
        self._port: IListeningPort | None = None
        self._listening: Deferred[IListeningPort] | None = None
        self._workers: dict[int, _Worker] = {}
        self._stopping = False
        #: How many times each worker was started (tests, the log).
        self.starts: dict[int, int] = {}

    # Service.

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listening = self._endpoint.listen(self._factory)
        self._listening.addCallback(self._listened)

    def _listened(self, port: IListeningPort) -> IListeningPort:
        self._port = port
        return port

    def startService(self) -> None:
        super().startService()
        if self._listening is None:  # not started privileged (tests)
            self.privilegedStartService()
        assert self._listening is not None

        def spawn_all(port: IListeningPort) -> IListeningPort:
            for index in range(1, self._count):
                self._spawn(index)
            log.info(
                "serving with {count} processes (this one and {workers} workers)",
                count=self._count,
                workers=self._count - 1,
            )
            return port

        self._listening.addCallback(spawn_all)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        self._stopping = True
        stops: list[Deferred[Any]] = []
        if self._port is not None:
            stops.append(_maybe(self._port.stopListening()))
        for worker in list(self._workers.values()):
            stops.append(worker.stop(self._drain_timeout + STOP_GRACE))
        return DeferredList(stops).addCallback(lambda _: None)

    # Workers.

    def pids(self) -> dict[int, int]:
        """The running workers' process ids, by index."""
        return {i: w.pid for i, w in self._workers.items() if w.pid is not None}

    def _spawn(self, index: int) -> None:
        assert self._port is not None
        fd = self._port.fileno()  # type: ignore[attr-defined]
        env = {**self._environ, WORKER_ENV: str(index), LISTEN_FD_ENV: str(LISTEN_FD)}
        worker = _Worker(self, index)
        self._reactor.spawnProcess(
            worker,
            self._argv[0],
            self._argv,
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
        log.warn(
            "worker {index} (pid {pid}) ended ({reason}); starting it again in {delay:g}s",
            index=worker.index,
            pid=worker.pid,
            reason=reason.getErrorMessage(),
            delay=self._restart_delay,
        )
        self._reactor.callLater(self._restart_delay, self._respawn, worker.index)

    def _respawn(self, index: int) -> None:
        if not self._stopping and index not in self._workers:
            self._spawn(index)


def _maybe(result: Any) -> Deferred[Any]:
    return result if isinstance(result, Deferred) else succeed(result)


class _Worker(ProcessProtocol):
    """One worker process, as the main process sees it."""

    def __init__(self, pool: WorkerPool, index: int) -> None:
        self._pool = pool
        self.index = index
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
        self._port = self._reactor.adoptStreamPort(self._fd, family, self._factory)
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
    """

    def __init__(self, reactor: Any, fd: int = 0) -> None:
        self._reactor = reactor
        self._fd = fd
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

